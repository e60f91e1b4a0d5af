"""GRPO with and without NuRL hints: wall time per step, tokens/s, and all-zero groups.

    python benchmarks/bench_methods.py [--steps 2] [--G 4] [--max-new-tokens 64] [--hints none,self]
    python benchmarks/bench_methods.py --steps 20 --G 8 --max-new-tokens 256 --hints none,landmarks,self

Each variant is one `dail grpo` run (`dail.grpo.train_grpo`, the code the CLI calls) on the
embedded model (SmolLM2-135M-Instruct) and the 16 gsm-symbolic training problems
(DataConfig(source='gsm-symbolic', split='train', limit=16)), into a fresh temporary folder,
with the same seed, so every variant starts from the same adapter and sees the same problems
in the same order. What is reported comes from the run's own metrics.jsonl:

- step_s: wall time of an optimizer step (sampling, grading, the hint resampling, backward,
  update); the median over steps, and the first step separately (warm-up: the grading
  process starts on first use);
- tokens/s: completion tokens trained on per second of the step (median); resampled
  completions that were replaced by hinted ones are not counted;
- zero: the fraction of problems whose G completions all scored 0 (no gradient), averaged
  over steps; with hints, before the hint resampling (`zero_before`) and after (`zero`);
- setup_s: everything else in the run: loading the model, collecting hints (self: the model
  explains each gold answer, then writes a hint), building the trainer, saving. `hints_s` is
  the hint collection alone.

Variants run one after another in one process (the model loads from the de-quantized cache
after the first), so background load on a shared machine can favour one of them; rerun on a
quiet machine for numbers to keep.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import dail.grpo as grpo
from dail.config import DataConfig, GRPOConfig, ModelConfig


def run(hints: str, args: argparse.Namespace, root: Path) -> dict:
    out = root / hints
    timed = {"hints_s": 0.0}
    real_collect = grpo.collect_hints

    def collect(*a, **k):  # time the hint collection alone
        t0 = time.perf_counter()
        try:
            return real_collect(*a, **k)
        finally:
            timed["hints_s"] += time.perf_counter() - t0

    grpo.collect_hints = collect
    cfg = GRPOConfig(model=ModelConfig(name=args.model, device=args.device),
                     data=DataConfig(source="gsm-symbolic", split="train", limit=args.problems),
                     out=str(out), hints=hints, num_generations=args.G, problems_per_step=args.problems_per_step,
                     micro_batch_size=args.micro_batch_size, max_steps=args.steps, max_new_tokens=args.max_new_tokens,
                     hint_tokens=args.hint_tokens, save_every=0, seed=args.seed)
    t0 = time.perf_counter()
    try:
        grpo.train_grpo(cfg)
    finally:
        grpo.collect_hints = real_collect
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_s"] for r in rows]
    info = json.loads((out / "train_info.json").read_text())
    result = {
        "hints": hints, "steps": len(rows), "first_step_s": steps[0],
        "step_s": statistics.median(steps[1:] or steps),
        "tokens_per_s": statistics.median([r["tokens_per_s"] for r in rows[1:] or rows]),
        "completion_tokens": statistics.mean(r["completion_length"] for r in rows),
        "zero": statistics.mean(r["zero_groups"] for r in rows),
        "zero_before": statistics.mean(r.get("zero_groups_before_hints", r["zero_groups"]) for r in rows),
        "hinted": statistics.mean(r.get("hinted_groups", 0.0) for r in rows),
        "reward": statistics.mean(r["reward"] for r in rows),
        "setup_s": total - sum(steps), "hints_s": timed["hints_s"], "hints_used": info.get("hints_used", 0),
    }
    if hints == "self":
        recs = [json.loads(x) for x in (out / "hints.jsonl").read_text().splitlines()]
        result["hint_example"] = next((r["hint"] for r in recs if r["hint"]), None)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--device", default="cpu", help="cpu | auto | cuda (model.device)")
    p.add_argument("--problems", type=int, default=16, help="gsm-symbolic training problems (data.limit)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--G", type=int, default=4, help="group size (num_generations)")
    p.add_argument("--problems-per-step", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--hint-tokens", type=int, default=64)
    p.add_argument("--hints", default="none,self", help="variants, comma-separated: none,landmarks,self")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    gpu = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "no GPU"
    print(f"# {platform.processor() or platform.machine()}, {gpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {args.model}, {args.problems} gsm-symbolic problems, "
          f"G={args.G}, {args.problems_per_step} problems/step, {args.max_new_tokens} new tokens, {args.steps} steps")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for hints in args.hints.split(","):
            results.append(run(hints.strip(), args, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    print()
    print("| hints | step s (median) | first step s | tokens/s | all-zero groups before hints | after | "
          "groups hinted | reward | setup s | hint collection s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['hints']} | {r['step_s']:.1f} | {r['first_step_s']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['zero_before']:.2f} | {r['zero']:.2f} | {r['hinted']:.2f} | {r['reward']:.3f} | "
              f"{r['setup_s']:.1f} | {r['hints_s']:.1f} |")


if __name__ == "__main__":
    main()
