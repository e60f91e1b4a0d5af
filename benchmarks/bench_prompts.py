"""Prompt files side by side: what each one does to mixed-policy synthesis on the same problems.

    python benchmarks/bench_prompts.py [--prompts built-in,configs/prompts/authors-style.yaml]
                                       [--problems 8] [--samples 4] [--new-tokens 256] [--tau 0.6]
                                       [--teacher-context answer_only] [--out runs/bench-prompts]

Each prompt file gets one `dail synth` run (`dail.synthesis.synthesize`, the code the CLI calls):
mixed mode, keep all, on the first N gsm-symbolic training problems x S samples, into
<out>/<name>/synthetic.jsonl (<name>: `built-in`, or the file's stem; `-answer-only` added with
--teacher-context answer_only, the teacher that sees only the final answer). Every run has the same
model, problems, seed and settings, so the student draws from the same random streams and only
the prompts differ. One row per file:

- teacher tokens: the share of trajectory tokens the teacher wrote (the student's token was
  vetoed: its teacher probability was below tau);
- correct: graded trajectories whose answer is right, of all of them;
- mention the reference: the share of trajectories that speak of a solution or reference they
  were shown, by the regex `MENTIONS` (case-insensitive; coarse: "the solution" also counts
  where the model means its own);
- tok/s: trajectory tokens decoded per second in this invocation (stats.json); "-" where
  everything was already there.

Resumable: synthesis skips what is written, so a rerun after an interruption decodes only the
rest, and a rerun with a larger --problems or --samples adds only the new trajectories.
The model loads once and serves every file.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import torch

MENTIONS = re.compile(r"\b(the |given |provided |reference |expert )(solution|reference)\b|\breference\b",
                      re.IGNORECASE)
BUILT_IN = "built-in"


def row(name: str, prompts: str, out: Path, ids: set[str], samples: int) -> str:
    """The table row of one run, over this invocation's problems (`ids`) and samples only: the
    folder may hold more from an earlier, larger run."""
    from dail.prompts import load_prompts
    from dail.records import read_records

    records = [r for r in read_records(out) + read_records(out.with_name("synthetic.rejected.jsonl"))
               if str(r["id"]) in ids and r["sample_index"] < samples]
    stats = json.loads(out.with_name("stats.json").read_text(encoding="utf-8"))
    tokens = sum(len(r["teacher_mask"]) for r in records)
    teacher = sum(sum(r["teacher_mask"]) for r in records)
    graded = [r["correct"] for r in records if r.get("correct") is not None]
    mention = sum(bool(MENTIONS.search(r["trajectory"])) for r in records)
    p = load_prompts(prompts)
    tps = stats.get("tokens_per_second")
    return (f"| {name} | {p.version} ({p.hash}) | {teacher / max(tokens, 1):.0%} | {sum(graded)}/{len(graded)} "
            f"| {mention}/{len(records)} ({mention / max(len(records), 1):.0%}) "
            f"| {f'{tps:.1f}' if tps else '-'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=f"{BUILT_IN},configs/prompts/authors-style.yaml",
                    help=f"Comma-separated prompt files; '{BUILT_IN}' is dail's own texts.")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default="gsm-symbolic", help="Expert problems (split train), as synth's data.source.")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--tau", type=float, default=0.6)
    ap.add_argument("--temperature", type=float, default=None, help="Default: SynthConfig's.")
    ap.add_argument("--teacher-context", default="solution", choices=["solution", "answer_only"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="runs/bench-prompts")
    args = ap.parse_args()

    from dail.config import DataConfig, ModelConfig, SynthConfig
    from dail.data import load_examples
    from dail.models import load_model, load_tokenizer
    from dail.synthesis import synthesize

    files = [f.strip() for f in args.prompts.split(",") if f.strip()]
    model_cfg = ModelConfig(name=args.model, device=args.device)
    model, tok = load_model(model_cfg), load_tokenizer(model_cfg)
    rows = []
    for f in files:
        prompts = "" if f == BUILT_IN else f
        name = BUILT_IN if f == BUILT_IN else Path(f).stem
        if args.teacher_context == "answer_only":
            name += "-answer-only"
        out = Path(args.out) / name / "synthetic.jsonl"
        cfg = SynthConfig(model=model_cfg, data=DataConfig(source=args.data, split="train", limit=args.problems),
                          out=str(out), mode="mixed", tau=args.tau, max_new_tokens=args.new_tokens,
                          temperature=SynthConfig.temperature if args.temperature is None else args.temperature,
                          samples_per_problem=args.samples, batch_size=args.batch_size, keep="all",
                          teacher_context=args.teacher_context, prompts=prompts)
        synthesize(cfg, model, tok)
        rows.append(row(f, prompts, out, {ex.id for ex in load_examples(cfg.data)}, args.samples))

    print(f"# model={args.model} data={args.data} problems={args.problems} samples={args.samples} "
          f"new_tokens={args.new_tokens} tau={args.tau} temperature={cfg.temperature} "
          f"teacher_context={args.teacher_context} threads={torch.get_num_threads()} "
          f"cpu={platform.processor() or platform.machine()}")
    print("| prompt file | version (hash) | teacher tokens | correct | mention the reference | tok/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
