"""Where every output lives: the run folder and each stage's files, named in this one place.

A run folder (`dail run`, and each method's folder under `dail compare`):

    <run>/config.yaml                  the run's config (loads back with --config)
    <run>/synth/synthetic.jsonl        stage 1 (+ .rejected/.skipped/.unselected.jsonl, stats.json, student_fraction.png)
    <run>/train/adapter/               stage 2, PEFT format (+ metrics.jsonl, train_info.json, checkpoint/)
    <run>/eval/<name>/summary.json     each evaluation (+ samples.jsonl, config.yaml)
    <run>/report.md                    tables and plots

Each stage also runs alone with its own `--out`; the `*_files` functions name what it writes
there. A bare `dail eval` folder (summary.json at its top) is also a reportable run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunFolder", "shared_synth", "synth_files", "train_files", "grpo_files", "eval_files", "select_files",
           "summaries", "finished_adapter"]


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def synth(self) -> Path:
        """The synthetic set (stage 1's `out`)."""
        return self.root / "synth" / "synthetic.jsonl"

    @property
    def train(self) -> Path:
        """Stage 2's `out` folder."""
        return self.root / "train"

    def eval(self, name: str) -> Path:
        """One evaluation's `out` folder, e.g. `base-test`, `trained-train`."""
        return self.root / "eval" / name

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def shared_synth(root: str | Path, mode: str) -> Path:
    """A synthetic set that several methods of a `dail compare` / `dail sweep` folder share."""
    return Path(root) / "data" / mode / "synthetic.jsonl"


def synth_files(out: str | Path) -> dict[str, Path]:
    """The synthetic set `out` and the files synthesis writes next to it."""
    out = Path(out)
    return {
        "out": out,
        "rejected": out.with_name(f"{out.stem}.rejected.jsonl"),
        "skipped": out.with_name(f"{out.stem}.skipped.jsonl"),
        # kept trajectories that `per_problem` left out of the training set (they move back if it changes)
        "unselected": out.with_name(f"{out.stem}.unselected.jsonl"),
        "stats": out.with_name("stats.json"),
        "histogram": out.with_name("student_fraction.png"),
        "config": out.with_name("config.yaml"),
        "lock": out.with_name(out.name + ".lock"),
    }


def train_files(out: str | Path) -> dict[str, Path]:
    """What a training method writes into its `out` folder."""
    out = Path(out)
    return {
        "adapter": out / "adapter",
        "metrics": out / "metrics.jsonl",
        "info": out / "train_info.json",
        "checkpoint": out / "checkpoint",
        "config": out / "config.yaml",
        "lock": out / ".lock",
    }


def grpo_files(out: str | Path) -> dict[str, Path]:
    """What `dail grpo` writes into its `out` folder: a training method's files (`train_files`), with
    TRL's `checkpoint-N` folders under `checkpoints/`, and the NuRL hints (default place)."""
    out = Path(out)
    return train_files(out) | {"checkpoints": out / "checkpoints", "hints": out / "hints.jsonl"}


def eval_files(out: str | Path) -> dict[str, Path]:
    """What `dail eval` writes into its `out` folder (prompts and export: `dail eval --export-prompts`)."""
    out = Path(out)
    return {"samples": out / "samples.jsonl", "summary": out / "summary.json", "config": out / "config.yaml",
            "lock": out / ".lock", "prompts": out / "prompts.jsonl", "export": out / "export.json"}


def select_files(out: str | Path) -> dict[str, Path]:
    """The expert set `dail select` writes (`out`) and its config, `<stem>.config.yaml` next to it
    (not `config.yaml`: an expert set often shares its folder with other outputs)."""
    out = Path(out)
    return {"out": out, "config": out.with_name(f"{out.stem}.config.yaml")}


def summaries(run: str | Path) -> list[Path]:
    """Every evaluation summary of a run folder: `<run>/summary.json` (a bare `dail eval` folder)
    first, then `<run>/eval/*/summary.json` by name."""
    run = Path(run)
    found = sorted(run.glob("eval/*/summary.json"))
    if (run / "summary.json").exists():
        found.insert(0, run / "summary.json")
    return found


def finished_adapter(train_out: str | Path) -> Path | None:
    """The adapter of a training run that ran to the end, or None."""
    files = train_files(train_out)
    done = files["info"].exists() and (files["adapter"] / "adapter_config.json").exists()
    return files["adapter"] if done else None
