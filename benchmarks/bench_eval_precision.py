"""Evaluation sampling in fp32 against bf16 weights (`eval.dtype`), and by rows per batch.

    python benchmarks/bench_eval_precision.py [--problems 4] [--rows 32,64] [--max-new-tokens 128] [--reps 1]

Every cell runs the sampling call `dail eval` makes (through `dail.sampler`, student prompts,
n samples per problem prefilled once, one seed per sample) with the paper's evaluation sampler
(T 0.6, top-p 0.95, presence penalty 1.5). No row may stop early (no stop ids), so every cell
produces exactly rows x max-new-tokens tokens and the ratios compare like with like. The cells
alternate dtypes within each repetition; each timing is the median over `--reps` after a
warm-up. It prints tokens/s per cell and the bf16 / fp32 ratio at each row count, plus how far
bf16's samples drift from fp32's (the share of rows whose tokens differ anywhere).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from dail.config import ModelConfig
from dail.models import load_tokenizer, model_label
from dail.prompts import render, student_messages
from dail.sampler import Sampling, open_sampler, sample_seed

from bench_eval import PROBLEMS  # the same four GSM8K problems (python puts benchmarks/ on the path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--rows", default="32,64", help="rows per batch to time (each a multiple of --problems)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()

    tok = load_tokenizer(ModelConfig(name=args.model))
    samplers = {dtype: open_sampler(ModelConfig(name=args.model, dtype=dtype, device="cpu"), tokenizer=tok)
                for dtype in ("float32", "bfloat16")}
    for s in samplers.values():
        s.stop_ids = []  # no early stops: every cell decodes rows x max-new-tokens tokens
    sampling = Sampling(temperature=0.6, top_p=0.95, presence_penalty=1.5, max_new_tokens=args.max_new_tokens)
    problems = PROBLEMS[: args.problems]
    prompts = [render(tok, student_messages(p)) for p in problems]
    rows = [int(r) for r in args.rows.split(",")]

    def batch(n_rows: int) -> tuple[list[list[int]], list[int]]:
        n = n_rows // len(problems)
        return ([prompts[i] for i in range(len(problems)) for _ in range(n)],
                [sample_seed(0, str(i), j) for i in range(len(problems)) for j in range(n)])

    samplers["float32"].sample(*batch(len(problems)), sampling.with_budget(8))  # warm-up
    samplers["bfloat16"].sample(*batch(len(problems)), sampling.with_budget(8))
    times: dict[tuple[str, int], list[float]] = {}
    drift: dict[int, float] = {}
    for _ in range(args.reps):
        for n_rows in rows:
            out = {}
            for dtype, sampler in samplers.items():
                t0 = time.perf_counter()
                out[dtype] = sampler.sample(*batch(n_rows), sampling)
                times.setdefault((dtype, n_rows), []).append(time.perf_counter() - t0)
            drift[n_rows] = sum(a.tokens != b.tokens for a, b in zip(out["float32"], out["bfloat16"])) / n_rows

    print(f"model {model_label(ModelConfig(name=args.model))}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {platform.processor() or platform.machine()}; {args.max_new_tokens} new tokens per row, "
          f"T 0.6, top-p 0.95, presence 1.5; median of {args.reps}")
    print("| rows | fp32 tok/s | bf16 tok/s | bf16 / fp32 | rows whose bf16 tokens differ |")
    print("|---|---|---|---|---|")
    for n_rows in rows:
        tps = {d: n_rows * args.max_new_tokens / statistics.median(times[d, n_rows]) for d in samplers}
        print(f"| {n_rows} | {tps['float32']:.0f} | {tps['bfloat16']:.0f} | {tps['bfloat16'] / tps['float32']:.2f} | "
              f"{drift[n_rows]:.0%} |")


if __name__ == "__main__":
    main()
