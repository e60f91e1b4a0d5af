"""Why a trained adapter does or does not follow its own training trajectories.

    python benchmarks/diagnose_fit.py --train runs/compare-gsm/dail/train \
        --adapters base,runs/compare-gsm/nll/train/adapter,runs/compare-gsm/dail/train/adapter \
        [--out runs/diagnose-fit]

It reads the training set of `--train` (its saved config.yaml: data, prompts, model) the way
training does (`dail.training.build_sequences` with the contrastive loss, so every example has
its student, teacher and negative-reference context), and scores every trajectory token under:

- each of `--adapters` (`base` = no adapter) in the student's context: what sampling without
  the solution would do at that position;
- the base model in the teacher's context (solution shown), the target the contrastive loss
  pulls the student toward.

Per model it prints, over all trajectory tokens and over the tokens of the final answer (the
last occurrence of the gold answer's text in the trajectory):

- mean log-probability of the trajectory's own token (what cross-entropy raises);
- the share of positions where that token is the model's argmax;
- mean KL(model ‖ teacher) per token (what the contrastive loss lowers);
- for the teacher: mean entropy.

A student can match the teacher's distribution (low KL) and still give the trajectory's tokens,
among them the answer, no more probability than the teacher does; cross-entropy instead drives
them toward 1. The table separates the two. Writes <out>/diagnosis.json and prints a Markdown
table. Forward passes only: about 3 minutes on 2 CPU cores for 36 trajectories and 4 models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dail.config import TrainConfig, build
from dail.models import load_adapter_for_inference, load_model, load_tokenizer
from dail.records import read_records
from dail.training import build_sequences


def answer_span(tok, target: list[int], answer: str | None) -> list[int]:
    """Indices of the target tokens that overlap the last occurrence of `answer` in its text."""
    if not answer:
        return []
    ends, text = [], ""
    for i in range(len(target)):
        text = tok.decode(target[: i + 1], skip_special_tokens=False)
        ends.append(len(text))
    at = text.rfind(answer)
    if at < 0:
        return []
    starts = [0] + ends[:-1]
    return [i for i, (s, e) in enumerate(zip(starts, ends)) if s < at + len(answer) and e > at]


@torch.no_grad()
def target_logprobs(model, context: list[int], target: list[int]) -> torch.Tensor:
    """(T, V) log-probabilities of each target position given the context and the target before it."""
    ids = torch.tensor([context + target[:-1]])
    logits = model(input_ids=ids).logits[0, len(context) - 1:].float()
    return torch.log_softmax(logits, dim=-1)


def summarize(logp: torch.Tensor, teacher: torch.Tensor, target: list[int], span: list[int]) -> dict:
    t = torch.tensor(target)
    own = logp.gather(1, t[:, None])[:, 0]
    argmax = logp.argmax(-1) == t
    kl = (logp.exp() * (logp - teacher)).sum(-1)
    ent = -(logp.exp() * logp).sum(-1)
    out = {"logp": own.tolist(), "argmax": argmax.tolist(), "kl_to_teacher": kl.tolist(), "entropy": ent.tolist()}
    out["span"] = span
    return out


def aggregate(rows: list[dict]) -> dict:
    def mean(key: str, answer: bool) -> float:
        vals = [r[key][i] for r in rows for i in (r["span"] if answer else range(len(r[key])))]
        return float(sum(float(v) for v in vals) / len(vals)) if vals else float("nan")
    return {f"{key}{'_answer' if a else ''}": mean(key, a) for key in ("logp", "argmax", "kl_to_teacher", "entropy")
            for a in (False, True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="a training run folder (its config.yaml names the data)")
    p.add_argument("--adapters", default="base", help="comma-separated: base and/or adapter folders")
    p.add_argument("--out", default="runs/diagnose-fit")
    args = p.parse_args()

    cfg = build(TrainConfig, str(Path(args.train) / "config.yaml"), {"loss": "contrastive"})
    tok = load_tokenizer(cfg.model)
    seqs = build_sequences(cfg, tok)
    answers = {str(r["id"]): r.get("answer") for r in read_records(cfg.data)}
    spans = [answer_span(tok, s.target, None if answers.get(s.problem) is None else str(answers[s.problem]))
             for s in seqs]

    base = load_model(cfg.model)
    teacher = [target_logprobs(base, s.contexts["teacher"], s.target) for s in seqs]
    result = {"train": args.train, "examples": len(seqs),
              "answer_found": sum(bool(sp) for sp in spans), "models": {}}
    result["models"]["teacher (solution shown)"] = aggregate(
        [summarize(t, t, s.target, sp) for t, s, sp in zip(teacher, seqs, spans)])
    for name in args.adapters.split(","):
        model = base if name == "base" else load_adapter_for_inference(load_model(cfg.model), name)
        rows = [summarize(target_logprobs(model, s.contexts["student"], s.target), t, s.target, sp)
                for s, t, sp in zip(seqs, teacher, spans)]
        result["models"][f"student: {name}"] = aggregate(rows)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"{len(seqs)} trajectories of {cfg.data}; the answer's tokens found in {result['answer_found']}\n")
    print("| model | log p(token) | argmax = token | KL to teacher | entropy | answer: log p | answer: argmax "
          "| answer: KL to teacher |")
    print("|---|---|---|---|---|---|---|---|")
    for name, a in result["models"].items():
        print(f"| {name} | {a['logp']:.3f} | {a['argmax']:.3f} | {a['kl_to_teacher']:.3f} | {a['entropy']:.3f} | "
              f"{a['logp_answer']:.3f} | {a['argmax_answer']:.3f} | {a['kl_to_teacher_answer']:.3f} |")


if __name__ == "__main__":
    main()
