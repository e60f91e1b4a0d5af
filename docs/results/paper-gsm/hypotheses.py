"""Mark the pre-registered hypotheses H1-H5 from a comparison.json (README, "Pre-registered
hypotheses and analysis"), by the rules written there before any trained model was evaluated:

- "below": the paired 95% CI of the difference lies under 0 (supported), above 0 (contradicted),
  or contains 0 (undecided); "above" the mirror image;
- "at least" (non-inferiority, margin -0.05): supported if the CI's lower end is above -0.05,
  contradicted if its upper end is below 0, undecided otherwise.

A hypothesis with two parts is supported when both are, contradicted when either is, and
undecided otherwise; a part whose runs have not been evaluated yet is "not run".

    python docs/results/paper-gsm/hypotheses.py [runs/paper-gsm/comparison.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARGIN = -0.05
BUDGET = "512"

# (hypothesis, [(part, split, k, run, reference, rule)])
HYPOTHESES = [
    ("H1: SFT and NLL have a lower far pass@64 than base",
     [("SFT - base", "far", "64", "sft", "base", "below"), ("NLL - base", "far", "64", "nll", "base", "below")]),
    ("H2: DAIL's far pass@64 is at least base's, and above NLL's",
     [("DAIL - base", "far", "64", "dail", "base", "at least"), ("DAIL - NLL", "far", "64", "dail", "nll", "above")]),
    ("H3: on its training problems DAIL is below NLL (train pass@8)",
     [("DAIL - NLL", "train", "8", "dail", "nll", "below")]),
    ("H4: DAIL direct is at least DAIL mixed (far pass@64)",
     [("direct - mixed", "far", "64", "dail_direct", "dail", "at least")]),
    ("H5: the forward KL fits the training problems better than the reverse (train pass@8)",
     [("forward - reverse", "train", "8", "dail_forward", "dail", "above")]),
]


def verdict(rule: str, lo: float, hi: float) -> str:
    if rule == "below":
        return "supported" if hi < 0 else "contradicted" if lo > 0 else "undecided"
    if rule == "above":
        return "supported" if lo > 0 else "contradicted" if hi < 0 else "undecided"
    return "supported" if lo > MARGIN else "contradicted" if hi < 0 else "undecided"  # at least


def combine(parts: list[str]) -> str:
    if "not run" in parts:
        return "not run" if all(p == "not run" for p in parts) else "incomplete"
    if all(p == "supported" for p in parts):
        return "supported"
    return "contradicted" if "contradicted" in parts else "undecided"


def main(path: str) -> None:
    comp = json.loads(Path(path).read_text(encoding="utf-8"))
    print("| hypothesis | part | difference [paired 95% CI] | rule | part's verdict | verdict |")
    print("|---|---|---|---|---|---|")
    for name, parts in HYPOTHESES:
        rows, verdicts = [], []
        for part, split, k, run, ref, rule in parts:
            entry = comp["splits"].get(split, {}).get("runs", {}).get(run, {}).get("vs", {}).get(ref)
            if entry is None:
                rows.append((f"{part} ({split}, pass@{k})", "–", rule, "not run"))
                verdicts.append("not run")
                continue
            d = entry[BUDGET][k]
            v = verdict(rule, d["ci_low"], d["ci_high"])
            rows.append((f"{part} ({split}, pass@{k})",
                         f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]", rule, v))
            verdicts.append(v)
        overall = combine(verdicts)
        for i, (part, diff, rule, v) in enumerate(rows):
            print(f"| {name if i == 0 else ''} | {part} | {diff} | {rule} | {v} | {overall if i == 0 else ''} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/paper-gsm/comparison.json")
