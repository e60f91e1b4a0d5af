"""dail's two sampling engines side by side: HF (dail's own loop) against vLLM, in one run.

    python benchmarks/bench_engines.py [--problems 16] [--eval-rows 64,256] [--pairs 32] \\
        [--max-new-tokens 128] [--dtypes float32,bfloat16] [--reps 1]

On the same gsm-symbolic training problems, through `dail.sampler` exactly as the stages call it:
- evaluation: `sample` over student prompts, n rows per problem, the paper's evaluation sampler
  (T 0.6, top-p 0.95, presence 1.5), HF against vLLM at each dtype and row count;
- vLLM's own sampler on the same rows (global seed, no dail processor): what per-row seeds and
  dail's recorded probabilities cost on this engine;
- synthesis, direct (`sample` over the direct-mode teacher contexts) and mixed (`mixed`, tau 0.6,
  `--pairs` student/teacher pairs), HF against vLLM;
- vLLM mixed against vLLM plain sampling of the same number of rows, and the share of mixed
  decoding's wall time spent in dail's logits processor (the decisions) against the engine.

No row may stop early (no stop ids), so every cell produces exactly rows x max-new-tokens tokens
and the ratios compare like with like. Each timing is the median of `--reps`, after a warm-up call on 4 rows x 8 tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import torch

from dail.config import DataConfig, ModelConfig
from dail.data import load_problems
from dail.models import load_tokenizer, model_label
from dail.prompts import direct_messages, render, student_messages, teacher_messages
from dail.sampler import Sampling, open_sampler, release, sample_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--eval-rows", default="64,256")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    tok = load_tokenizer(ModelConfig(name=args.model))
    problems = load_problems(DataConfig(source="gsm-symbolic", split="train", limit=args.problems))
    student = [render(tok, student_messages(p.problem)) for p in problems]
    teacher = [render(tok, teacher_messages(p.problem, p.solution, p.answer)) for p in problems]
    direct = [render(tok, direct_messages(p.problem, p.solution, p.answer)) for p in problems]
    eval_sampling = Sampling(temperature=0.6, top_p=0.95, presence_penalty=1.5, max_new_tokens=args.max_new_tokens)
    synth_sampling = Sampling(temperature=0.7, top_p=1.0, max_new_tokens=args.max_new_tokens)
    T = args.max_new_tokens

    def rows(prompts: list[list[int]], n_rows: int) -> tuple[list[list[int]], list[int]]:
        return ([prompts[i % len(prompts)] for i in range(n_rows)],
                [sample_seed(0, str(i % len(prompts)), i // len(prompts)) for i in range(n_rows)])

    def timed(fn, warm, before=None) -> float:
        # `warm` is the same call on a few rows and tokens: the first call of either engine pays
        # one-off costs (allocator, vLLM's KV blocks), which a full-size warm-up would double the
        # run for. Prefix caching: vLLM caches prompt blocks only, so the timed call reuses the
        # warm-up's prompts as HF's loop reuses nothing; prefill is a few percent of these cells.
        warm()
        if before:
            before()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def small(s: Sampling) -> Sampling:
        return dataclasses.replace(s, max_new_tokens=8)

    eval_rows = [int(r) for r in args.eval_rows.split(",")]
    tps: dict[tuple, float] = {}
    proc_share: dict[str, float] = {}
    for dtype in args.dtypes.split(","):
        for engine in ("hf", "vllm"):
            cfg = ModelConfig(name=args.model, dtype=dtype, device=args.device, engine=engine)
            s = open_sampler(cfg, tokenizer=tok)
            s.stop_ids = []  # no early stops
            for n in eval_rows:
                tps[engine, dtype, "eval", n] = n * T / timed(lambda: s.sample(*rows(student, n), eval_sampling),
                                                              lambda: s.sample(*rows(student, 4), small(eval_sampling)))
            if engine == "vllm":
                from vllm import SamplingParams

                for n in eval_rows:
                    p, _ = rows(student, n)
                    params, warm = (SamplingParams(max_tokens=m, temperature=0.6, top_p=0.95, presence_penalty=1.5,
                                                   ignore_eos=True, detokenize=False) for m in (T, 8))
                    tps["vllm-native", dtype, "eval", n] = n * T / timed(
                        lambda: s.llm.generate([{"prompt_token_ids": x} for x in p], params, use_tqdm=False),
                        lambda: s.llm.generate([{"prompt_token_ids": x} for x in p[:4]],
                                               warm, use_tqdm=False))
            B = args.pairs
            tps[engine, dtype, "direct", B] = B * T / timed(
                lambda: s.sample(*rows(direct, B), synth_sampling, writer="teacher"),
                lambda: s.sample(*rows(direct, 4), small(synth_sampling), writer="teacher"))
            tps[engine, dtype, "plain", 2 * B] = 2 * B * T / timed(
                lambda: s.sample(*rows(student + teacher, 2 * B), synth_sampling),
                lambda: s.sample(*rows(student, 4), small(synth_sampling)))
            sp, seeds = rows(student, B)
            tp, _ = rows(teacher, B)
            reset = None
            if engine == "vllm":
                from dail import vllm_engine

                reset = lambda: vllm_engine.PROFILE.update(apply_s=0.0, steps=0)  # noqa: E731
            t_mixed = timed(lambda: s.mixed(sp, tp, seeds, synth_sampling, 0.6),
                            lambda: s.mixed(sp[:4], tp[:4], seeds[:4], small(synth_sampling), 0.6), reset)
            tps[engine, dtype, "mixed", B] = B * T / t_mixed
            if engine == "vllm":
                proc_share[dtype] = vllm_engine.PROFILE["apply_s"] / (args.reps * t_mixed)
            release(s)
            del s

    print(f"model {model_label(ModelConfig(name=args.model))}; torch {torch.__version__}; "
          f"{os.cpu_count()} cores; {platform.processor() or platform.machine()}; {T} new tokens per row, "
          f"{args.problems} problems; median of {args.reps}")
    print("| stage | dtype | rows | HF tok/s | vLLM tok/s | vLLM / HF |")
    print("|---|---|---|---|---|---|")
    for (engine, dtype, stage, n), v in tps.items():
        if engine == "hf":
            w = tps["vllm", dtype, stage, n]
            name = {"eval": "evaluation", "direct": "synthesis, direct", "plain": "plain sampling (synthesis settings)",
                    "mixed": "synthesis, mixed (pairs)"}[stage]
            print(f"| {name} | {dtype} | {n} | {v:.0f} | {w:.0f} | {w / v:.2f} |")
    print()
    print("| vLLM | dtype | rows | tok/s | ratio |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        for n in eval_rows:
            nat, dl = tps["vllm-native", dtype, "eval", n], tps["vllm", dtype, "eval", n]
            print(f"| evaluation: vLLM's own sampler / dail's processor | {dtype} | {n} | {nat:.0f} / {dl:.0f} | "
                  f"{nat / dl:.2f} |")
        B = args.pairs
        m, p = tps["vllm", dtype, "mixed", B], tps["vllm", dtype, "plain", 2 * B]
        print(f"| mixed ({B} pairs) / plain ({2 * B} rows), trajectory tok/s | {dtype} | {B} | {m:.0f} / {p:.0f} | "
              f"{m / p:.2f} |")
        print(f"| mixed: share of wall time in dail's processor | {dtype} | {B} | | {proc_share[dtype]:.0%} |")


if __name__ == "__main__":
    main()
