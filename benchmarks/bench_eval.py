"""Sampling throughput of evaluation against plain `model.generate`.

    python benchmarks/bench_eval.py [--problems 4] [--n 8] [--max-new-tokens 128] [--reps 3]

Both sides sample n sequences for each of P problems on the same model, at the same
temperature, in one batch of P*n rows (evaluation's default batch_size is 32):
- dail: exactly the decode call `dail.evaluation.evaluate` makes (student prompts, prefill
  each distinct prompt once and repeat its cache, one torch.Generator per sample, finished
  rows leave the batch), without grading;
- generate: `model.generate(do_sample=True, num_return_sequences=n)` on the left-padded
  prompts (transformers expands the prompts before prefill, so it prefills P*n rows).

Two settings: `eos` stops at end-of-turn (what evaluation does; the two sides sample
different sequences, so lengths differ a little) and `fixed`, where neither side may stop
(min_new_tokens for generate, no stop ids for decode), so both produce exactly P*n*max tokens.
Tokens/s counts generated tokens up to and including the stop token. Each timing is the
median of `--reps` runs after a short warm-up, alternating the two sides.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from dail.config import ModelConfig
from dail.decoding import decode, generator_for
from dail.models import load_model, load_tokenizer, model_label
from dail.prompts import end_of_turn_ids, render, student_messages

PROBLEMS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
    "Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. "
    "How much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "Mark has a garden with flowers. He planted plants of three different colors in it. Ten of them are "
    "yellow, and there are 80% more of those in purple. How many flowers does Mark have in his garden?",
    "Albert is wondering how much pizza he can eat in one day. He buys 2 large pizzas and 2 small pizzas. "
    "A large pizza has 16 slices and a small pizza has 8 slices. How many pieces does he eat that day?",
]


def run_dail(model, tok, prompts, n, max_new, temperature, stop, seed=0):
    rows = [p for p in prompts for _ in range(n)]
    gens = [generator_for(seed, f"p{i}", j) for i in range(len(prompts)) for j in range(n)]
    t = time.perf_counter()
    out = decode(model, rows, generators=gens, max_new_tokens=max_new, stop_ids=stop, pad_id=tok.pad_token_id,
                 temperature=temperature, top_p=1.0)
    dt = time.perf_counter() - t
    return sum(len(d.tokens) for d in out), dt


def run_generate(model, tok, prompts, n, max_new, temperature, stop, fixed, seed=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    torch.manual_seed(seed)
    kw = dict(min_new_tokens=max_new) if fixed else {}
    t = time.perf_counter()
    out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True,
                         temperature=temperature, top_p=1.0, top_k=0, num_return_sequences=n,
                         max_new_tokens=max_new, eos_token_id=stop, pad_token_id=tok.pad_token_id, **kw)
    dt = time.perf_counter() - t
    gen = out[:, width:].tolist()
    n_tok = 0
    for row in gen:  # up to and including the first stop token (the rest is padding)
        cut = next((i + 1 for i, x in enumerate(row) if x in stop), len(row))
        n_tok += cut
    return n_tok, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--settings", default="eos,fixed")
    args = ap.parse_args()

    cfg = ModelConfig(name=args.model)
    t = time.perf_counter()
    tok, model = load_tokenizer(cfg), load_model(cfg)
    print(f"model {model_label(cfg)} on {model.device} ({next(model.parameters()).dtype}), "
          f"loaded in {time.perf_counter() - t:.1f} s")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    prompts = [render(tok, student_messages(p)) for p in PROBLEMS[: args.problems]]
    stop = end_of_turn_ids(tok)
    print(f"{len(prompts)} problems x n={args.n}, {args.max_new_tokens} new tokens, T={args.temperature}")

    for setting in args.settings.split(","):
        fixed = setting == "fixed"
        s = [] if fixed else stop
        sides = {
            "dail": lambda rep, m=args.max_new_tokens: run_dail(model, tok, prompts, args.n, m, args.temperature,
                                                                s, seed=rep),
            "generate": lambda rep, m=args.max_new_tokens: run_generate(model, tok, prompts, args.n, m,
                                                                        args.temperature, stop, fixed, seed=rep),
        }
        for fn in sides.values():  # warm-up (short: allocator and kernels, not a full run)
            fn(-1, 8)
        rates: dict[str, list[float]] = {k: [] for k in sides}
        toks: dict[str, list[int]] = {k: [] for k in sides}
        for rep in range(args.reps):
            for name, fn in sides.items():
                n_tok, dt = fn(rep)
                rates[name].append(n_tok / dt)
                toks[name].append(n_tok)
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k in sides:
            print(f"[{setting}] {k:9s} {med[k]:7.1f} tok/s (runs: {', '.join(f'{r:.1f}' for r in rates[k])}; "
                  f"tokens: {', '.join(map(str, toks[k]))})")
        print(f"[{setting}] ratio dail/generate = {med['dail'] / med['generate']:.3f}")


if __name__ == "__main__":
    main()
