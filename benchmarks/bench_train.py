"""Training-step cost of the DAIL loss against plain NLL, on the embedded model or a real shape.

    python benchmarks/bench_train.py [--batch 2] [--traj 128] [--rounds 3]
    python benchmarks/bench_train.py --shape qwen2.5-1.5b --variants nll,contrastive,ref-cache,refs-only

One optimizer step (forward, backward, AdamW) over the same batch for each variant:
- nll:         student forward only, chunked cross-entropy (the `nll` ablation's step);
- contrastive: DAIL as `dail.training` runs it: student + teacher + NR forwards on one set of
               weights (adapter on / off), chunked loss from hidden states;
- ref-cache:   DAIL with the teacher's and NR's final hidden states precomputed, so the step
               runs only the student (`ref_cache: true`);
- naive:       three model copies (copy.deepcopy) and dense (B, L, V) logits for every role,
               then `contrastive_terms` on them;
- refs-only:   not a step: only the teacher and NR forwards (as `dail.training` runs them) and
               their two LM-head matmuls. nll + refs-only is a lower bound for any exact live
               step, which must do that work on top of the student's.

`--shape` swaps the embedded model for a Qwen2.5 shape with random weights (same token ids).

All variants share one process and one loaded model (the naive one adds its two copies).
Step time: the variants run interleaved, round after round, and the median per variant is
reported, so background load on a shared machine hits all of them alike. Peak memory is the
growth of the process's peak RSS over one step: before the step the kernel's high-water mark
is reset (`echo 5 > /proc/self/clear_refs`) and afterwards VmHWM − VmRSS(before) is read. For
that pass glibc is told to mmap every allocation over 64 KiB and its free heap is trimmed, so
freed tensors go back to the kernel and a step's peak is not hidden by memory cached earlier.
Linux and glibc only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("nll", "contrastive", "ref-cache", "naive", "refs-only")
# Any variant may carry "@bf16": that variant's steps run under bf16 autocast, the others in the
# run's precision, so "nll,nll@bf16" times both precisions side by side on the same weights.

# Realistic shapes, random weights (the tokenizer is the embedded model's: its ids fit every vocabulary).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def random_model(shape: str):
    """A Qwen2 model of `shape` with random weights (fp32), for timing real model shapes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6)
    return Qwen2ForCausalLM(cfg).eval()


def _status(field: str) -> int:
    """A /proc/self/status field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def write_data(tok, path: Path, batch: int, traj: int, problems: int) -> None:
    """`batch` synthetic records over `problems` problems (samples of a problem are adjacent,
    as `group_by_problem` orders them), each trajectory `traj` tokens long, end-of-turn last."""
    from dail.prompts import end_of_turn_id

    text = ("First, Tom has 3 apples. He buys 4 more, so he has 3 + 4 = 7 apples. Then he gives away 2, "
            "leaving 7 - 2 = 5. Each apple costs 2 dollars, so 5 apples cost 5 * 2 = 10 dollars. ") * 40
    per_problem = -(-batch // problems)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(batch):
            p = i // per_problem
            ids = tok(text, add_special_tokens=False)["input_ids"][i: i + traj - 1] + [end_of_turn_id(tok)]
            fh.write(json.dumps({
                "id": f"b{p}", "problem": f"Tom has {3 + p} apples and buys 4 more. He gives 2 away and sells "
                "the rest for 2 dollars each. How much money does he get?",
                "solution": f"{3 + p}+4={7 + p}. {7 + p}-2={5 + p}. {5 + p}*2={10 + 2 * p}. #### {10 + 2 * p}",
                "landmarks": None, "trajectory_ids": ids, "teacher_mask": [0] * len(ids),
                "finish_reason": "stop", "sample_index": i % per_problem, "correct": None}) + "\n")


def _libc():
    import ctypes
    return ctypes.CDLL("libc.so.6")


def run(batch: int, traj: int, rounds: int, variants: list[str], bf16: bool = False,
        shape: str = "embedded", problems: int = 1) -> dict:
    import torch

    from dail.config import ModelConfig, TrainConfig
    from dail.losses import contrastive_terms, free_workspace
    from dail.models import attach_lora, load_model, load_tokenizer
    from dail.reference import ROLES, collate, lm_head_params, reference_hidden
    from dail.training import batch_loss, build_sequences

    torch.manual_seed(0)
    tok = load_tokenizer(ModelConfig())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic.jsonl"
        write_data(tok, data, batch, traj, problems)
        cfg = TrainConfig(model=ModelConfig(device="cpu"), data=str(data), out=tmp, batch_size=batch,
                          micro_batch_size=batch)
        seqs = build_sequences(cfg, tok)
    base = load_model(cfg.model, device=torch.device("cpu")) if shape == "embedded" else random_model(shape)
    copies = [copy.deepcopy(base), copy.deepcopy(base)] if "naive" in variants else []  # naive only
    model = attach_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    model.train()
    with torch.no_grad():  # LoRA B starts at 0; a trained-looking adapter makes the student differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    b = collate(seqs, tok.pad_token_id, ROLES)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        refs = reference_hidden(model, b)  # the cache: computed once, outside the timed steps
    T = b.targets.shape[1]
    nll_cfg = dataclasses.replace(cfg, loss="nll")

    def dense_role_logits(m, inputs):
        ids, attn, start = inputs
        logits = m(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, L, V)
        pos = (start[:, None] + torch.arange(T)).clamp(max=logits.shape[1] - 1)
        return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))

    def step(variant: str) -> float:
        name, _, precision = variant.partition("@")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 or precision == "bf16"):
            return _step(name)

    def _step(variant: str) -> float:
        if variant == "naive":
            s = dense_role_logits(model, b.inputs["student"])
            with torch.no_grad():
                t = dense_role_logits(copies[0], b.inputs["teacher"])
                n = dense_role_logits(copies[1], b.inputs["negative"])
            sums = contrastive_terms(s, t, n, b.mask, cfg.gamma)
        elif variant == "refs-only":
            # The work no exact live implementation can skip beyond the nll step: both reference
            # forwards, and the two reference LM-head matmuls (no student, no loss, no step).
            with torch.no_grad():
                weight, _ = lm_head_params(model)
                for h in reference_hidden(model, b):
                    h[b.mask] @ weight.T
            return float("nan")
        elif variant == "nll":
            sums = batch_loss(model, b, nll_cfg)
        else:
            sums = batch_loss(model, b, cfg, refs if variant == "ref-cache" else None)
        (sums.loss / sums.count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(sums.loss.detach() / sums.count)

    # Timing: variants interleaved round by round, so load from other processes on the machine
    # hits all of them alike; the median over rounds is reported. Round 0 is a warm-up.
    # Both wall time and this process's CPU time are recorded: on a shared machine the CPU time
    # is the steadier number (with one thread, waiting for a core costs wall time, not CPU time).
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, float] = {}
    for r in range(rounds + 1):
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            losses[v] = step(v)
            if r:
                times[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
        if r:
            print(f"  round {r}: " + ", ".join(f"{v} {times[v][-1]:.2f}s wall {cpu[v][-1]:.2f}s cpu"
                                               for v in variants), file=sys.stderr)

    # Peak memory: from here on glibc mmaps every allocation over 64 KiB (and returns it on free),
    # and the free heap is trimmed, so each step's growth of the kernel's RSS high-water mark is
    # the memory that step needed on top of what was resident before it.
    libc = _libc()
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    peaks = {}
    for v in variants:
        free_workspace()  # the loss's kept CPU buffers count in the step that builds them
        libc.malloc_trim(0)
        rss = _status("VmRSS")
        _reset_peak()
        step(v)
        peaks[v] = (_status("VmHWM") - rss) / 2**20
    return {"results": {v: {"step_s": statistics.median(times[v]), "step_s_all": times[v],
                            "cpu_s": statistics.median(cpu[v]),
                            "peak_mib": peaks[v], "loss": losses[v]} for v in variants},
            "tokens": int(b.mask.sum()), "rows": b.targets.shape[0],
            "lens": {r: int(b.inputs[r][0].shape[1]) for r in b.inputs}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2, help="sequences per step (one micro-batch)")
    ap.add_argument("--problems", type=int, default=0, help="distinct problems in the batch (default "
                    "batch / 2: dail synth's 2 samples per problem, kept together by group_by_problem)")
    ap.add_argument("--traj", type=int, default=128, help="trajectory tokens per sequence")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; a variant with "
                    "'@bf16' (nll@bf16) runs under bf16 autocast, next to the fp32 ones")
    ap.add_argument("--shape", default="embedded", choices=["embedded", *SHAPES],
                    help="the embedded model, or a Qwen2.5 shape with random weights")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for every variant (train.precision bf16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps CPU-time ratios steady "
                    "on a shared machine)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    variants = args.variants.split(",")
    problems = args.problems or max(1, args.batch // 2)
    out = run(args.batch, args.traj, args.rounds, variants, args.bf16, args.shape, problems)

    res = out["results"]
    ref = res.get("nll")
    print(f"machine: {platform.machine()} {_cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"load average at end {os.getloadavg()[0]:.1f}")
    print(f"model: {args.shape}{'' if args.shape == 'embedded' else ' (random weights)'}")
    print(f"batch: {out['rows']} sequences ({problems} problems) x {args.traj} trajectory tokens = "
          f"{out['tokens']} loss tokens; "
          f"input lengths {json.dumps(out['lens'])}")
    print(f"{'variant':<12} {'cpu s':>7} {'x nll':>6} {'wall s':>7} {'x nll':>6} {'peak MiB':>9} {'x nll':>6}"
          "  all wall times")
    for v, r in res.items():
        cr = f"{r['cpu_s'] / ref['cpu_s']:.2f}" if ref else "-"
        tr = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        mr = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref else "-"
        print(f"{v:<12} {r['cpu_s']:>7.2f} {cr:>6} {r['step_s']:>7.2f} {tr:>6} {r['peak_mib']:>9.0f} {mr:>6}  "
              + " ".join(f"{t:.2f}" for t in r["step_s_all"]))
    for v, r in res.items():
        base = res.get(v.partition("@")[0])
        if v.endswith("@bf16") and base is not None:
            print(f"{v}: cpu time x {r['cpu_s'] / base['cpu_s']:.2f} of fp32 ({base['cpu_s'] / r['cpu_s']:.2f}x faster); "
                  f"loss {r['loss']:.5f} vs {base['loss']:.5f} (relative difference "
                  f"{abs(r['loss'] - base['loss']) / abs(base['loss']):.1e}; the weights move by lr 1e-6 between steps)")
    if ref and "refs-only" in res:
        floor = (ref["cpu_s"] + res["refs-only"]["cpu_s"]) / ref["cpu_s"]
        print(f"lower bound for live contrastive (nll step + refs-only) / nll: {floor:.2f} (cpu time)")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
