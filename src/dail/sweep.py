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

import copy
import json
import logging
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dail import dist
from dail.config import EvalConfig, SweepConfig, SynthConfig, TrainConfig, save
from dail.evaluation import evaluate
from dail.layout import RunFolder, eval_files, shared_synth, synth_files
from dail.lock import output_lock
from dail.models import load_adapter_for_inference, load_model, load_tokenizer
from dail.synthesis import synthesize
from dail.training import train_or_reuse

__all__ = ["sweep", "write_sweep_report"]

log = logging.getLogger(__name__)


def _tag(x: float) -> str:
    return f"{x:g}"


def _synth_cfg(cfg: SweepConfig, tau: float) -> SynthConfig:
    s = copy.deepcopy(cfg.synth)
    s.model, s.data, s.tau, s.prompts = cfg.model, cfg.data, float(tau), cfg.prompts
    s.out = str(shared_synth(cfg.out, f"tau{_tag(tau)}"))
    return s


def _train_cfg(cfg: SweepConfig, tau: float, gamma: float, folder: Path) -> TrainConfig:
    t = copy.deepcopy(cfg.train)
    t.model, t.expert, t.gamma, t.prompts = cfg.model, cfg.data, float(gamma), cfg.prompts
    t.data, t.out = str(shared_synth(cfg.out, f"tau{_tag(tau)}")), str(RunFolder(folder).train)
    return t


def _eval_cfg(cfg: SweepConfig, folder: Path, adapter: str) -> EvalConfig:
    e = copy.deepcopy(cfg.eval)
    e.model, e.adapter, e.out, e.prompts = cfg.model, adapter, str(RunFolder(folder).eval("val")), cfg.prompts
    e.data = copy.deepcopy(cfg.data)
    e.data.split, e.data.limit = "val", cfg.val_limit
    return e


def sweep(cfg: SweepConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, _ = dist.world()
    if rank == 0:
        save(cfg, out / "config.yaml")
    with output_lock(out / ".sweep.lock", f"{out}: sweep", rank):
        tok = load_tokenizer(cfg.model)
        model = load_model(cfg.model)
        evaluate(_eval_cfg(cfg, out / "base", ""), model, tok, label="base")
        for tau in cfg.taus:
            synthesize(_synth_cfg(cfg, tau), model, tok)
        del model
        for tau in cfg.taus:
            for gamma in cfg.gammas:
                folder = out / f"tau{_tag(tau)}-gamma{_tag(gamma)}"
                adapter = train_or_reuse(_train_cfg(cfg, tau, gamma, folder))
                trained = load_adapter_for_inference(load_model(cfg.model), str(adapter))
                evaluate(_eval_cfg(cfg, folder, str(adapter)), trained, tok, label=folder.name)
                del trained
    if rank == 0:
        write_sweep_report(cfg)
    return out / "report.md"


def write_sweep_report(cfg: SweepConfig) -> Path:
    out = Path(cfg.out)
    base = json.loads(eval_files(RunFolder(out / "base").eval("val"))["summary"].read_text())
    k = str(max(base["ks"]))
    grid = np.full((len(cfg.gammas), len(cfg.taus)), np.nan)
    synth = {}
    for j, tau in enumerate(cfg.taus):
        stats_path = synth_files(shared_synth(out, f"tau{_tag(tau)}"))["stats"]
        if stats_path.exists():
            synth[_tag(tau)] = json.loads(stats_path.read_text())
        for i, gamma in enumerate(cfg.gammas):
            summary = eval_files(RunFolder(out / f"tau{_tag(tau)}-gamma{_tag(gamma)}").eval("val"))["summary"]
            if summary.exists():
                grid[i, j] = json.loads(summary.read_text())["pass_at_k"][k]["mean"]
    result = {"k": int(k), "taus": cfg.taus, "gammas": cfg.gammas, "base": base["pass_at_k"][k]["mean"],
              "pass_at_k": [[None if np.isnan(v) else float(v) for v in row] for row in grid],
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
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(im, ax=ax, label=f"validation pass@{k}")
    ax.set_title(f"DAIL on the validation split (base pass@{k} = {result['base']:.3f})", fontsize=10)
    fig.savefig(out / "sweep_heatmap.png")

    fig = Figure(figsize=(6, 4.2), dpi=120, layout="constrained")
    ax = fig.subplots()
    taus = [t for t in cfg.taus if _tag(t) in synth]
    teacher = [1 - (synth[_tag(t)]["student_token_fraction"] or 0) for t in taus]
    correct = [synth[_tag(t)]["correct_fraction"] or 0 for t in taus]
    ax.plot(taus, teacher, marker="o", label="teacher-token share")
    ax.plot(taus, correct, marker="s", label="trajectories correct")
    ax.set_xlabel("tau")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("synthesis against tau", fontsize=10)
    fig.savefig(out / "sweep_tau.png")

    md = ["# Sweep: tau × gamma on the validation split", "",
          f"Model `{cfg.model.name}`, {base['n_problems']} validation problems, n = {base['n']}, "
          f"{base['max_new_tokens']} tokens. Base pass@{k}: {result['base']:.3f}.", "",
          "| gamma \\ tau | " + " | ".join(_tag(t) for t in cfg.taus) + " |",
          "|---|" + "---|" * len(cfg.taus)]
    for i, gamma in enumerate(cfg.gammas):
        md.append(f"| {_tag(gamma)} | " + " | ".join("–" if np.isnan(v) else f"{v:.3f}" for v in grid[i]) + " |")
    md += ["", "| tau | teacher-token share | trajectories correct | kept |", "|---|---|---|---|"]
    md += [f"| {t} | {1 - (st['student_token_fraction'] or 0):.3f} | {st['correct_fraction']} | {st['kept']} |"
           for t, st in result["synthesis"].items()]
    md += ["", "![sweep_heatmap](sweep_heatmap.png)", "", "![sweep_tau](sweep_tau.png)", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    return out / "report.md"
