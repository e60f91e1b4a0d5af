"""report.md with tables and plots, from one or more run folders.

`write_report(run_dirs, out)` collects every `<run>/eval/*/summary.json` (a folder that holds
`summary.json` itself also counts, so a bare `dail eval` output can be reported) and labels
each evaluation `<run name>/<eval name>`, e.g. `default/base-test`. So one run folder gives
base against trained (what `dail run` writes at the end), and several run folders compare runs.

It writes into `out`:
- `report.md`: pass@k with bootstrap CIs at the largest budget, pass@k and mean tokens by
  token budget, the train-versus-test gap where both were evaluated, and the synthesis stats
  (`<run>/synth/stats.json`) as found;
- `pass_at_k.png`: pass@k against k (log2 axis), one curve per evaluation with its CI band;
- `pass_at_budget.png`: pass@1 and pass@k_max against the token budget.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from dail.layout import RunFolder, summaries, synth_files

log = logging.getLogger(__name__)

__all__ = ["collect", "write_report"]


def collect(run_dirs: list[Path]) -> list[tuple[str, dict]]:
    """[(label, summary)] for every evaluation in the run folders, in a stable order."""
    found = []
    for run in run_dirs:
        run = Path(run)
        paths = summaries(run)
        if not paths:
            log.warning("%s: no eval/*/summary.json found", run)
        for p in paths:
            try:
                summary = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{p}: not a readable summary.json ({e})") from None
            name = run.resolve().name if p.parent == run else f"{run.resolve().name}/{p.parent.name}"
            found.append((name, summary))
    return found


def _fmt(entry: dict | None) -> str:
    if not entry:
        return "–"
    return f"{entry['mean']:.3f} [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}]"


def _names(evals: list[tuple[str, dict]], key: str) -> str:
    seen = []
    for _, s in evals:
        v = str(s.get(key, "?"))
        if key == "model":  # "base + adapter/path" is still the same base model
            v = v.split(" + ")[0]
        if v not in seen:
            seen.append(v)
    return ", ".join(seen)


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _style(summary: dict) -> str:
    """Training-problem evaluations are dashed, held-out ones solid."""
    return "--" if summary.get("split") == "train" else "-"


def _plots(evals: list[tuple[str, dict]], out: Path, subtitle: str) -> list[str]:
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    # pass@k against k at the largest budget
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    all_ks = set()
    for i, (label, s) in enumerate(evals):
        ks = [int(k) for k in s["pass_at_k"]]
        all_ks |= set(ks)
        mean = [s["pass_at_k"][str(k)]["mean"] for k in ks]
        lo = [s["pass_at_k"][str(k)]["ci_low"] for k in ks]
        hi = [s["pass_at_k"][str(k)]["ci_high"] for k in ks]
        c = colors[i % len(colors)]
        ax.plot(ks, mean, marker="o", color=c, linestyle=_style(s),
                label=f"{label} ({s.get('split', '?')}, n={s.get('n')})")
        ax.fill_between(ks, lo, hi, color=c, alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_ks))
    ax.set_xticklabels([str(k) for k in sorted(all_ks)])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k (mean over problems, 95% CI)")
    ax.set_title(f"pass@k at the full token budget\n{subtitle}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png")
    written.append("pass_at_k.png")

    # pass@k against the token budget, for k = 1 and the largest k
    k_max = max(all_ks)
    k_panels = [1] if k_max == 1 else [1, k_max]
    fig = Figure(figsize=(6 * len(k_panels), 4.5), dpi=120)
    axes = fig.subplots(1, len(k_panels), squeeze=False)
    for ax, k in zip(axes[0], k_panels):
        all_budgets: set[int] = set()
        for i, (label, s) in enumerate(evals):
            budgets = sorted(int(b) for b in s["by_budget"])
            rows = [s["by_budget"][str(b)]["pass_at_k"].get(str(k)) for b in budgets]
            pts = [(b, r) for b, r in zip(budgets, rows) if r is not None]
            if not pts:
                continue
            c = colors[i % len(colors)]
            xs = [b for b, _ in pts]
            ax.plot(xs, [r["mean"] for _, r in pts], marker="o", color=c, linestyle=_style(s), label=label)
            all_budgets |= set(xs)
            ax.fill_between(xs, [r["ci_low"] for _, r in pts], [r["ci_high"] for _, r in pts], color=c,
                            alpha=0.15, linewidth=0)
        ax.set_ylim(-0.02, 1.02)
        if 0 < len(all_budgets) <= 12:
            ax.set_xticks(sorted(all_budgets))
        ax.set_xlabel("token budget (new tokens)")
        ax.set_ylabel(f"pass@{k} (95% CI)")
        ax.set_title(f"pass@{k} by token budget", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "pass_at_budget.png")
    written.append("pass_at_budget.png")
    return written


def _stats_lines(stats: dict, indent: str = "") -> list[str]:
    lines = []
    for k, v in stats.items():
        if isinstance(v, dict):
            lines.append(f"{indent}- {k}: " + ", ".join(f"{a}={b}" for a, b in v.items()))
        else:
            lines.append(f"{indent}- {k}: {v}")
    return lines


def write_report(run_dirs: list[Path], out: Path, title: str | None = None) -> Path:
    """Write `out/report.md` (and its PNGs) comparing every evaluation in `run_dirs`."""
    run_dirs = [Path(r) for r in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evals = collect(run_dirs)
    subtitle = _short(f"model: {_names(evals, 'model')}", 90) + f"\ndata: {_names(evals, 'dataset')}" if evals \
        else ""
    title = title or (f"DAIL report: {_short(_names(evals, 'model'), 80)} on {_names(evals, 'dataset')}"
                      if evals else "DAIL report")
    md = [f"# {title}", ""]
    md += [f"Runs: {', '.join(f'`{r}`' for r in run_dirs)}", ""]
    if not evals:
        md += ["No evaluation found (expected `<run>/eval/*/summary.json`).", ""]
    else:
        ks = sorted({int(k) for _, s in evals for k in s["pass_at_k"]})
        md += ["## pass@k at the full token budget", "",
               "Mean over problems of the unbiased pass@k estimator; brackets: 95% bootstrap CI over problems.", ""]
        head = ["evaluation", "model", "data (split)", "problems", "n", "budget"] + [f"pass@{k}" for k in ks] + \
            ["mean tokens"]
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, s in evals:
            row = [f"`{label}`", _short(str(s.get("model", "?")), 50), f"{s.get('dataset', '?')} ({s.get('split', '?')})",
                   str(s.get("n_problems")), str(s.get("n")), str(max(int(b) for b in s["by_budget"]))]
            row += [_fmt(s["pass_at_k"].get(str(k))) for k in ks]
            row += [f"{s.get('mean_tokens', float('nan')):.1f}"]
            md.append("| " + " | ".join(row) + " |")
        md.append("")

        md += ["## By token budget", "",
               "Graded from the same samples cut at each budget (exact for plain sampling).", ""]
        head = ["evaluation", "budget", "pass@1"] + ([f"pass@{ks[-1]}"] if ks[-1] != 1 else []) + \
            ["mean tokens", "correct samples"]
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, s in evals:
            for b in sorted(int(x) for x in s["by_budget"]):
                e = s["by_budget"][str(b)]
                row = [f"`{label}`", str(b), _fmt(e["pass_at_k"].get("1"))]
                if ks[-1] != 1:
                    row.append(_fmt(e["pass_at_k"].get(str(ks[-1]))))
                row += [f"{e.get('mean_tokens', float('nan')):.1f}", str(e.get("correct_samples", "–"))]
                md.append("| " + " | ".join(row) + " |")
        md.append("")

        gaps = []
        by_label = {label: s for label, s in evals}
        for label, s in evals:
            if label.endswith("-train") and label[: -len("-train")] + "-test" in by_label:
                t = by_label[label[: -len("-train")] + "-test"]
                a, b = s["pass_at_k"].get("1"), t["pass_at_k"].get("1")
                if a and b:
                    gaps.append(f"| `{label[: -len('-train')]}` | {a['mean']:.3f} | {b['mean']:.3f} | "
                                f"{a['mean'] - b['mean']:+.3f} |")
        if gaps:
            md += ["## Train versus test", "", "| evaluation | pass@1 train | pass@1 test | gap |",
                   "|---|---|---|---|", *gaps, ""]

        for png in _plots(evals, out, subtitle):
            md += [f"![{png[:-4]}]({png})", ""]

    for run in run_dirs:
        stats_path = synth_files(RunFolder(Path(run)).synth)["stats"]
        if stats_path.exists():
            try:
                stats = json.loads(stats_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                md += [f"## Synthesis: `{run.resolve().name}`", "", f"(could not read {stats_path}: {e})", ""]
                continue
            md += [f"## Synthesis: `{run.resolve().name}`", "", *_stats_lines(stats), ""]
    path = RunFolder(out).report
    path.write_text("\n".join(md), encoding="utf-8")
    return path
