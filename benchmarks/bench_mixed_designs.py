"""Two designs of exact mixed decoding on vLLM, side by side on the same pairs, in one run.

    python benchmarks/bench_mixed_designs.py [--pairs 32] [--steps 32] [--dtype float32]

- **lockstep** (dail's, `VLLMSampler.mixed`): each pair's student and teacher contexts are two
  long-lived requests; one batch-level logits processor takes every step's accept/veto decision
  from both rows' logits (`decoding.choose`) and forces the chosen token into both.
- **per-token** (the authors' released code): every step sends, for every pair, one student
  request and one teacher request over its context plus the trajectory so far, each with
  `max_tokens=1`; the teacher's returns its top-20 log-probabilities. The student's sampled token
  is kept if the teacher gives it probability >= tau (exact for tau >= 0.05: at most 20 tokens
  can reach 0.05), else the teacher's sampled token. Prefix caching is on, so each request
  prefills only the trajectory's newest token beyond the cached blocks.

Both decode `--pairs` pairs for exactly `--steps` tokens (no stop ids), tau 0.6, T 0.7, on the
first gsm-symbolic training problems. Printed: trajectory tokens/s of each, and their ratio.
The per-token design here draws with vLLM's global seed, so its tokens are not dail's; the
comparison is of cost, at the same shapes.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

from dail.config import DataConfig, ModelConfig
from dail.data import load_problems
from dail.models import load_tokenizer, model_label
from dail.prompts import render, student_messages, teacher_messages
from dail.sampler import Sampling, open_sampler, release, sample_seed


def per_token(llm, params_cls, students: list[list[int]], teachers: list[list[int]], steps: int, tau: float,
              temperature: float) -> list[list[int]]:
    trajectories: list[list[int]] = [[] for _ in students]
    s_params = params_cls(max_tokens=1, temperature=temperature, logprobs=0, detokenize=False, ignore_eos=True)
    t_params = params_cls(max_tokens=1, temperature=temperature, logprobs=20, detokenize=False, ignore_eos=True)
    log_tau = math.log(tau)
    for _ in range(steps):
        requests = [{"prompt_token_ids": c + t} for c, t in zip(students, trajectories)]
        requests += [{"prompt_token_ids": c + t} for c, t in zip(teachers, trajectories)]
        outs = llm.generate(requests, [s_params] * len(students) + [t_params] * len(teachers), use_tqdm=False)
        for i, traj in enumerate(trajectories):
            proposal = outs[i].outputs[0].token_ids[0]
            teacher = outs[len(students) + i].outputs[0]
            top = teacher.logprobs[0]  # {token id: Logprob}, the teacher's top 20 (and its own sample)
            accept = proposal in top and top[proposal].logprob >= log_tau
            traj.append(proposal if accept else teacher.token_ids[0])
    return trajectories


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tau", type=float, default=0.6)
    args = ap.parse_args()

    tok = load_tokenizer(ModelConfig(name=args.model))
    problems = load_problems(DataConfig(source="gsm-symbolic", split="train", limit=args.pairs))
    students = [render(tok, student_messages(p.problem)) for p in problems]
    teachers = [render(tok, teacher_messages(p.problem, p.solution, p.answer)) for p in problems]
    B = len(students)
    s = open_sampler(ModelConfig(name=args.model, dtype=args.dtype, device="cpu", engine="vllm"), tokenizer=tok)
    s.stop_ids = []  # every pair runs exactly --steps tokens
    sampling = Sampling(temperature=0.7, top_p=1.0, max_new_tokens=args.steps)
    seeds = [sample_seed(0, p.id, 0) for p in problems]

    s.mixed(students[:4], teachers[:4], seeds[:4], Sampling(temperature=0.7, max_new_tokens=4), args.tau)  # warm-up
    t0 = time.perf_counter()
    s.mixed(students, teachers, seeds, sampling, args.tau)
    lockstep = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_token(s.llm, s._sampling_params, students, teachers, args.steps, args.tau, 0.7)
    authors = time.perf_counter() - t0
    release(s)

    print(f"model {model_label(ModelConfig(name=args.model))}, {args.dtype}; torch {torch.__version__}; "
          f"{os.cpu_count()} cores; {platform.processor() or platform.machine()}; {B} pairs x {args.steps} tokens, "
          f"tau {args.tau}")
    print("| design | seconds | trajectory tok/s |")
    print("|---|---|---|")
    print(f"| lockstep (dail: one logits processor, two long-lived requests per pair) | {lockstep:.1f} | "
          f"{B * args.steps / lockstep:.1f} |")
    print(f"| per-token (the authors': two max_tokens=1 requests per pair per token) | {authors:.1f} | "
          f"{B * args.steps / authors:.1f} |")
    print(f"lockstep / per-token: {authors / lockstep:.1f}x")


if __name__ == "__main__":
    main()
