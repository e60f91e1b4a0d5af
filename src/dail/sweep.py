"""`dail sweep`: DAIL over a grid of tau and gamma, scored on the validation split.

The paper fixes tau and gamma without scanning them. The sweep synthesizes one set per tau
(the share of teacher tokens and the trajectories' correctness are measured there), trains
one adapter per (tau, gamma), and evaluates each on the validation split only, so the chosen
values never see the test problems.

    <out>/data/tau<τ>/synthetic.jsonl     one synthetic set per tau
    <out>/base/eval/val/                  the base model on the validation split
    <out>/tau<τ>-gamma<γ>/train, eval/val ordinary run folders
    <out>/sweep.json, report.md           the grid, sweep_heatmap.png, sweep_tau.png
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dail import dist
from dail.config import EvalConfig, SweepConfig, SynthConfig, TrainConfig
from dail.evaluation import evaluate
from dail.layout import RunFolder, eval_files, shared_synth, synth_files
from dail.sampler import open_sampler, release, with_dtype
from dail.stages import command_folder, stage_config
from dail.stats import paired_difference, per_problem_pass, resample_indices
from dail.synthesis import synthesize
from dail.training import train_or_reuse

__all__ = ["sweep", "choose_cell", "write_sweep_report"]

log = logging.getLogger(__name__)


def _tag(x: float) -> str:
    return f"{x:g}"


def _synth_cfg(cfg: SweepConfig, tau: float) -> SynthConfig:
    return stage_config(cfg, "synth", data=cfg.data, tau=float(tau), out=str(shared_synth(cfg.out, f"tau{_tag(tau)}")))


def _train_cfg(cfg: SweepConfig, tau: float, gamma: float, folder: Path) -> TrainConfig:
    return stage_config(cfg, "train", expert=cfg.data, gamma=float(gamma),
                        data=str(shared_synth(cfg.out, f"tau{_tag(tau)}")), out=str(RunFolder(folder).train))


def _eval_cfg(cfg: SweepConfig, folder: Path, adapter: str) -> EvalConfig:
    val = dataclasses.replace(cfg.data, split="val", limit=cfg.val_limit)
    return stage_config(cfg, "eval", data=val, adapter=adapter, out=str(RunFolder(folder).eval("val")))


def sweep(cfg: SweepConfig) -> Path:
    out = Path(cfg.out)
    with command_folder(cfg, "sweep") as tok:
        sampler = open_sampler(cfg.model, tokenizer=tok)  # the base model
        evaluate(_eval_cfg(cfg, out / "base", ""), sampler, tok, label="base")
        for tau in cfg.taus:
            synthesize(_synth_cfg(cfg, tau), sampler, tok)
        release(sampler)
        del sampler
        for tau in cfg.taus:
            for gamma in cfg.gammas:
                folder = out / f"tau{_tag(tau)}-gamma{_tag(gamma)}"
                adapter = train_or_reuse(_train_cfg(cfg, tau, gamma, folder))
                trained = open_sampler(with_dtype(cfg.model, cfg.eval.dtype), str(adapter), tokenizer=tok)
                evaluate(_eval_cfg(cfg, folder, str(adapter)), trained, tok, label=folder.name)
                release(trained)
                del trained
    if dist.world()[0] == 0:
        write_sweep_report(cfg)
    return out / "report.md"


def choose_cell(counts: dict[tuple[float, float], list[int]], n: int, k: int,
                default: tuple[float, float]) -> dict:
    """The (tau, gamma) the validation split supports, from each cell's per-problem correct counts.

    The best cell by pass@k replaces `default` only if the paired bootstrap CI of its difference
    to `default` (the same resampled problems for both) lies above 0. A tie, or a lead inside the
    noise, keeps the default: with few validation problems most leads are noise, and a choice
    that chases them would be a choice made by chance.
    """
    if default not in counts:
        raise ValueError(f"choose_cell: the default cell {default} has no validation result")
    passk = {cell: per_problem_pass(c, n, k) for cell, c in counts.items()}
    best = max(passk, key=lambda cell: (passk[cell].mean(), cell == default))
    diff = paired_difference(passk[best], passk[default], resample_indices(len(passk[default])))
    chosen = best if best != default and diff["ci_low"] > 0 else default
    tied = sum(passk[cell].mean() == passk[default].mean() for cell in passk if cell != default)
    if best == default and tied:
        why = (f"{tied} of the other {len(passk) - 1} cells tie with the default at validation pass@{k} "
               f"{passk[default].mean():.3f}: validation does not separate them, so the default stays")
    elif best == default:
        why = f"the default cell has the highest validation pass@{k}"
    elif chosen == best:
        why = (f"tau {_tag(best[0])}, gamma {_tag(best[1])} beats the default by {diff['mean']:+.3f} "
               f"[{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}] (paired 95% CI above 0)")
    else:
        why = (f"the best cell, tau {_tag(best[0])}, gamma {_tag(best[1])}, leads the default by {diff['mean']:+.3f} "
               f"[{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]: the paired 95% CI includes 0, so the default stays")
    return {"tau": chosen[0], "gamma": chosen[1], "best": {"tau": best[0], "gamma": best[1]},
            "difference_to_default": diff, "why": why}


def write_sweep_report(cfg: SweepConfig) -> Path:
    out = Path(cfg.out)
    base = json.loads(eval_files(RunFolder(out / "base").eval("val"))["summary"].read_text())
    k = str(max(base["ks"]))
    grid = np.full((len(cfg.gammas), len(cfg.taus)), np.nan)
    correct = np.full_like(grid, np.nan)
    counts: dict[tuple[float, float], list[int]] = {}
    synth = {}
    for j, tau in enumerate(cfg.taus):
        stats_path = synth_files(shared_synth(out, f"tau{_tag(tau)}"))["stats"]
        if stats_path.exists():
            synth[_tag(tau)] = json.loads(stats_path.read_text())
        for i, gamma in enumerate(cfg.gammas):
            summary = eval_files(RunFolder(out / f"tau{_tag(tau)}-gamma{_tag(gamma)}").eval("val"))["summary"]
            if summary.exists():
                cell = json.loads(summary.read_text())
                grid[i, j] = cell["pass_at_k"][k]["mean"]
                correct[i, j] = cell["correct_samples"]
                counts[(float(tau), float(gamma))] = list(cell["per_problem_correct"].values())
    default = (float(cfg.default_tau), float(cfg.default_gamma))
    chosen = choose_cell(counts, base["n"], int(k), default) if default in counts else None
    result = {"k": int(k), "taus": cfg.taus, "gammas": cfg.gammas, "base": base["pass_at_k"][k]["mean"],
              "n_problems": base["n_problems"], "n": base["n"],
              "pass_at_k": [[None if np.isnan(v) else float(v) for v in row] for row in grid],
              "correct_samples": [[None if np.isnan(v) else int(v) for v in row] for row in correct],
              "default": {"tau": default[0], "gamma": default[1]}, "chosen": chosen,
              "synthesis": {t: {key: st.get(key) for key in ("student_token_fraction", "correct_fraction", "kept")}
                            for t, st in synth.items()}}
    (out / "sweep.json").write_text(json.dumps(result, indent=2), encoding="utf-8")

    fig = Figure(figsize=(1.6 * len(cfg.taus) + 3, 1.0 * len(cfg.gammas) + 2.4), dpi=120, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(cfg.taus)), [_tag(t) for t in cfg.taus])
    ax.set_yticks(range(len(cfg.gammas)), [_tag(g) for g in cfg.gammas])
    ax.set_xlabel("tau (synthesis)")
    ax.set_ylabel("gamma (training)")
    total = base["n_problems"] * base["n"]
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}\n({int(correct[i, j])}/{total})", ha="center", va="center",
                        color="white", fontsize=9)
    fig.colorbar(im, ax=ax, label=f"validation pass@{k}")
    ax.set_title(f"DAIL on the validation split (base pass@{k} = {result['base']:.3f})", fontsize=10)
    fig.savefig(out / "sweep_heatmap.png")

    fig = Figure(figsize=(6, 4.2), dpi=120, layout="constrained")
    ax = fig.subplots()
    taus = [t for t in cfg.taus if _tag(t) in synth]
    teacher = [1 - (synth[_tag(t)]["student_token_fraction"] or 0) for t in taus]
    share_correct = [synth[_tag(t)]["correct_fraction"] or 0 for t in taus]
    ax.plot(taus, teacher, marker="o", label="teacher-token share")
    ax.plot(taus, share_correct, marker="s", label="trajectories correct")
    ax.set_xlabel("tau")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("synthesis against tau", fontsize=10)
    fig.savefig(out / "sweep_tau.png")

    md = ["# Sweep: tau × gamma on the validation split", "",
          f"Model `{cfg.model.name}`, {base['n_problems']} validation problems, n = {base['n']}, "
          f"{base['max_new_tokens']} tokens. Base pass@{k}: {result['base']:.3f} "
          f"({base['correct_samples']}/{total} samples correct).", ""]
    if chosen is not None:
        md += [f"**Chosen: tau {_tag(chosen['tau'])}, gamma {_tag(chosen['gamma'])}.** {chosen['why'][0].upper()}"
               f"{chosen['why'][1:]}.", ""]
    else:
        md += [f"No choice yet: the default cell (tau {_tag(default[0])}, gamma {_tag(default[1])}) has no "
               "validation result.", ""]
    md += [f"pass@{k} (correct samples of {total}):", "",
           "| gamma \\ tau | " + " | ".join(_tag(t) for t in cfg.taus) + " |",
           "|---|" + "---|" * len(cfg.taus)]
    for i, gamma in enumerate(cfg.gammas):
        md.append(f"| {_tag(gamma)} | " + " | ".join(
            "–" if np.isnan(v) else f"{v:.3f} ({int(c)})" for v, c in zip(grid[i], correct[i])) + " |")
    md += ["", "| tau | teacher-token share | trajectories correct | kept |", "|---|---|---|---|"]
    md += [f"| {t} | {1 - (st['student_token_fraction'] or 0):.3f} | {st['correct_fraction'] or 0:.3f} | {st['kept']} |"
           for t, st in result["synthesis"].items()]
    md += ["", "![sweep_heatmap](sweep_heatmap.png)", "", "![sweep_tau](sweep_tau.png)", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    return out / "report.md"
