"""Wiring for the commands that chain stages (`dail run`, `dail compare`, `dail sweep`).

Such a command owns some fields of each stage's config: the model, the prompts, the data, the
output folder, and per method or cell a few more. Its config declares them as the `run_sets`
of the stage field (dail.config), which keeps users from setting them. `stage_config` is the
one place that sets them, and it refuses a field the stage field does not declare, so the
declaration and the wiring cannot drift apart: a field a user may set is never overwritten
behind their back.

`command_folder` is the prelude every such command shares: its folder and saved config, the
output lock and the tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dail import dist
from dail.config import save
from dail.lock import output_lock
from dail.models import load_tokenizer

__all__ = ["stage_config", "command_folder"]

# Fields every stage takes from the command's top level when its stage field declares them.
_FROM_TOP = ("model", "prompts")


def stage_config(parent: Any, stage: str, base: Any = None, **sets: Any) -> Any:
    """A copy of `parent.<stage>` (or of `base`, a variant of it) with the fields the command owns set.

    The stage's model and prompts come from `parent`; `sets` gives the rest. Every name must be
    one of the stage field's `run_sets`. The copy is checked again (`__post_init__`), so a
    combination no config file could hold is refused here too.
    """
    fields = {f.name: f for f in dataclasses.fields(parent)}
    if stage not in fields:
        raise TypeError(f"{type(parent).__name__} has no stage field {stage!r}")
    owned = fields[stage].metadata.get("run_sets", ())
    stray = sorted(set(sets) - set(owned))
    if stray:
        raise TypeError(f"{type(parent).__name__}.{stage}: {', '.join(stray)} not in its run_sets {owned}; a field a "
                        "user may set is not the command's to set")
    values = {k: getattr(parent, k) for k in _FROM_TOP if k in owned} | sets
    return dataclasses.replace(copy.deepcopy(getattr(parent, stage) if base is None else base),
                               **copy.deepcopy(values))


def command_lock(cfg: Any, what: str) -> Any:
    """The lock a command `what` (compare, sweep, run) holds on its folder `cfg.out` (rank 0 only)."""
    out = Path(cfg.out)
    return output_lock(out / f".{what}.lock", f"{out}: {what}", dist.world()[0])


@contextmanager
def command_folder(cfg: Any, what: str) -> Iterator[Any]:
    """Create `cfg.out`, save the command's config there (rank 0), hold the folder's lock for
    `what` (a second command on the same folder waits or fails, never interleaves), and yield
    the tokenizer of `cfg.model`."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, _ = dist.world()
    if rank == 0:
        save(cfg, out / "config.yaml")
    with command_lock(cfg, what):
        yield load_tokenizer(cfg.model)
