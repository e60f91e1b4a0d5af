"""Checkpoints, resume and step logging for any LoRA training loop (SFT, NLL, DAIL, GRPO).

Nothing here knows the objective. A training loop that uses Accelerate, a PEFT model, a torch
optimizer and a `LambdaLR` scheduler gets:

- `lr_lambda`: linear warmup, then cosine or linear decay to 0, or a constant rate;
- `save_checkpoint` / `find_checkpoint` / `load_checkpoint` / `resume_from`: `<out>/checkpoint`
  with the adapter, optimizer, scheduler, step and every process's RNG state, written
  atomically, so a killed run resumes at its last checkpoint and continues bit for bit as if
  never stopped. Nothing is ever unpickled: the adapter is safetensors, the optimizer and
  scheduler state load with `torch.load(weights_only=True)`, and RNG states are JSON;
- `Logger`: one JSON line per optimizer step in `<out>/metrics.jsonl` (cut back to the
  checkpoint's step on resume), plus TensorBoard or W&B if asked.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from dail.config import ConfigError
from dail.records import read_records

__all__ = ["lr_lambda", "save_checkpoint", "find_checkpoint", "load_checkpoint", "resume_from", "Logger"]

log = logging.getLogger(__name__)


def lr_lambda(warmup_steps: int, scheduler: str, total_steps: int) -> Callable[[int], float]:
    """The lr multiplier after `step` optimizer steps: linear warmup over `warmup_steps`, then
    `scheduler` "cosine" or "linear" (to 0 at `total_steps`) or "constant"."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def _rng_state() -> dict:
    """Every RNG's state as plain JSON (lists of ints), so a resume never unpickles anything."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _load_plain(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only. Anything else in a
    checkpoint (a pickled object can run code when loaded) is refused."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: holds objects other than tensors and plain data; refusing to load it (a "
                          f"pickled object can run code). Delete the checkpoint or train without --resume. "
                          f"({str(e).splitlines()[0]})") from None


def save_checkpoint(out: Path, step: int, model: Any, optimizer: Any, scheduler: Any, accelerator: Any) -> None:
    """<out>/checkpoint, written atomically: a temp folder, then renames.

    Rename over a non-empty folder is impossible, so the old checkpoint moves to
    `checkpoint.old` first and is deleted last; `find_checkpoint` falls back to it if a crash
    hits between the two renames. Every process calls this (each saves its RNG state).
    """
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        accelerator.unwrap_model(model).save_pretrained(tmp / "adapter")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "state.pt")
    accelerator.wait_for_everyone()
    (tmp / f"rng{accelerator.process_index}.json").write_text(json.dumps(_rng_state()), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "COMPLETE").write_text(str(step))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint under `out`, or None."""
    for cand in (out / "checkpoint", out / "checkpoint.old"):
        if (cand / "COMPLETE").exists():
            return cand
    return None


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any, accelerator: Any) -> int:
    """Restore adapter, optimizer, scheduler and this process's RNG state; return the step."""
    weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    state = _load_plain(ckpt / "state.pt")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The schedule follows the *current* config (max_steps may have grown): set this step's lr.
    step = int(state["step"])
    for group, base_lr, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * f(step)
    rng = ckpt / f"rng{accelerator.process_index}.json"
    if rng.exists():
        _set_rng_state(json.loads(rng.read_text(encoding="utf-8")))
    else:  # written by an older dail as a pickle, which is never loaded
        log.warning("%s: no RNG state in JSON; resuming with fresh RNG states (the data order does not depend "
                    "on them)", ckpt)
    return step


def resume_from(out: Path, model: Any, optimizer: Any, scheduler: Any, accelerator: Any) -> int:
    """Load the last complete checkpoint under `out` and return its step; with none, warn and
    return 0 (a fresh start)."""
    ckpt = find_checkpoint(out)
    if ckpt is None:
        warnings.warn(f"{out}: resume=true but there is no complete checkpoint; starting from step 0",
                      stacklevel=2)
        return 0
    step = load_checkpoint(ckpt, model, optimizer, scheduler, accelerator)
    log.info("resumed from %s at step %d", ckpt, step)
    return step


class Logger:
    """One line per optimizer step to <out>/metrics.jsonl, plus TensorBoard or W&B if asked.

    Only the process with `enabled` writes. `report_to`: tensorboard (skipped if not
    installed) | wandb | none; `config` is what W&B records for the run.
    """

    def __init__(self, out: Path, resume_step: int, enabled: bool, report_to: str = "none",
                 config: dict | None = None, project: str = "dail") -> None:
        self.enabled, self.tb, self.wandb = enabled, None, None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        # On resume keep the lines up to the checkpoint; a fresh run starts a fresh file.
        kept = [r for r in read_records(path) if r.get("step", 0) <= resume_step] if resume_step else []
        self.fh = open(path, "w", encoding="utf-8")
        for r in kept:
            self.fh.write(json.dumps(r) + "\n")
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional: degrade to console + metrics.jsonl
                self.tb = None
        elif report_to == "wandb":
            try:
                import wandb  # optional
            except ImportError:
                raise ConfigError("config field 'report_to': wandb is not installed (pip install wandb), "
                                  "or use report_to=tensorboard|none") from None
            self.wandb = wandb.init(project=project, dir=str(out), config=config or {}, resume="allow")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        for k, v in row.items():
            if k != "step" and self.tb is not None:
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.fh.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
