"""Synthesis speed: fused mixed-policy decoding against plain `generate`, side by side.

For each batch size B, on the same model, problems and number of new tokens:
1. tokens/s of `model.generate` sampling on the student prompts (B rows);
2. tokens/s of `dail.decoding.decode` in mixed mode (B student + B teacher rows, fused);
3. the floor ratio: time of one B-row decode step / time of one 2B-row decode step at the
   same context length. Mixed decoding is that 2B-row work plus sampling, so it cannot beat
   `floor × generate tok/s`. Target: mixed ≥ 0.9 × floor × generate.

Every row runs exactly `--new-tokens` tokens (no stop token) so both sides do equal work.

    python benchmarks/bench_synth.py [--model embedded] [--batch-sizes 1,4,16,32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def step_time(model, prompts, pad_id, reps: int) -> float:
    """Median seconds of one single-token decode step for these rows (cache prefilled)."""
    from transformers import DynamicCache

    from dail.decoding import _left_pad
    from dail.padding import cache_arg

    ids, mask = _left_pad(prompts, pad_id, torch.device("cpu"))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_arg(cache), logits_to_keep=1)
        tok = torch.full((len(prompts), 1), 1000)
        m = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            model(input_ids=tok, attention_mask=m, position_ids=pos[:, -1:] + 1, use_cache=True, **cache_arg(cache))
            times.append(time.perf_counter() - t0)
            cache.crop(-1)  # drop the token again: every rep runs at the same context length
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--batch-sizes", default="1,4,16,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.3)
    ap.add_argument("--profile", action="store_true", help="Print a torch.profiler table for the largest B.")
    args = ap.parse_args()

    from dail.config import DataConfig, ModelConfig
    from dail.data import load_examples
    from dail.decoding import _left_pad, decode
    from dail.models import load_model, load_tokenizer
    from dail.prompts import render, student_messages, teacher_messages

    model_cfg = ModelConfig(name=args.model, device="cpu")
    model, tok = load_model(model_cfg), load_tokenizer(model_cfg)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    examples = load_examples(DataConfig(source="gsm-symbolic", split="train", limit=max(sizes)))
    student = [render(tok, student_messages(e.problem)) for e in examples]
    teacher = [render(tok, teacher_messages(e.problem, e.solution)) for e in examples]
    N = args.new_tokens
    print(f"# model={args.model} threads={torch.get_num_threads()} new_tokens={N} tau={args.tau} "
          f"cpu={platform.processor() or platform.machine()} torch={torch.__version__}")
    print(f"# mean prompt tokens: student {statistics.mean(map(len, student)):.0f}, "
          f"teacher {statistics.mean(map(len, teacher)):.0f}")
    print("| B | generate tok/s | mixed tok/s | mixed / generate | floor (B-row step / 2B-row step) "
          "| mixed / (floor x generate) | teacher tokens |")
    print("|---|---|---|---|---|---|---|")
    for B in sizes:
        s, t = student[:B], teacher[:B]
        ids, mask = _left_pad(s, tok.pad_token_id, torch.device("cpu"))
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
                           max_new_tokens=N, min_new_tokens=N, pad_token_id=tok.pad_token_id)
        gen_tps = B * N / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        out = decode(model, s, teacher_prompts=t, tau=args.tau, temperature=0.7, top_p=1.0, max_new_tokens=N,
                     stop_ids=[], pad_id=tok.pad_token_id,
                     generators=[torch.Generator().manual_seed(i) for i in range(B)])
        mix_tps = B * N / (time.perf_counter() - t0)
        teacher_share = sum(sum(o.teacher_mask) for o in out) / (B * N)

        # Floor at the mid-generation context length, for the mixed rows' actual prompts.
        ctx = [p + [1000] * (N // 2) for p in s]
        ctx_t = [p + [1000] * (N // 2) for p in t]
        one = step_time(model, ctx, tok.pad_token_id, reps=5)
        two = step_time(model, ctx + ctx_t, tok.pad_token_id, reps=5)
        floor = one / two
        print(f"| {B} | {gen_tps:.1f} | {mix_tps:.1f} | {mix_tps / gen_tps:.2f} | {floor:.2f} "
              f"| {mix_tps / (floor * gen_tps):.2f} | {teacher_share:.0%} |", flush=True)

    if args.profile:
        B = sizes[-1]
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(model, student[:B], teacher_prompts=teacher[:B], tau=args.tau, temperature=0.7, top_p=1.0,
                   max_new_tokens=16, stop_ids=[], pad_id=tok.pad_token_id,
                   generators=[torch.Generator().manual_seed(i) for i in range(B)])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
