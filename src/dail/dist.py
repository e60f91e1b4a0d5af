"""Sharding work across processes started by `accelerate launch`.

Synthesis and evaluation split their (problem, sample) work items across ranks: rank r takes
items r, r+N, r+2N, ... Each rank appends to its own shard file `<out>.rank<r>-of-<N>.jsonl`
(no two processes ever write one file), and after a barrier rank 0 merges all shards into
`<out>` in a canonical order, dropping duplicates. Without `accelerate launch` there is one
rank and the output file is written directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch
from accelerate import PartialState

T = TypeVar("T")


def state() -> Any:
    """accelerate's PartialState (initializes torch.distributed with gloo on CPU when launched).

    On a machine without a GPU, accelerate only sets up gloo when asked for the CPU explicitly;
    otherwise every process of `accelerate launch --multi_gpu --num_processes N` believes it is
    alone.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def world() -> tuple[int, int]:
    """(rank, world size) without initializing anything when not launched distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        s = state()
        return s.process_index, s.num_processes
    return 0, 1


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    return list(items[rank::world_size])


def shard_path(out: str | Path, rank: int, world_size: int) -> Path:
    out = Path(out)
    if world_size == 1:
        return out
    return out.with_name(f"{out.stem}.rank{rank}-of-{world_size}{out.suffix}")


def barrier() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        state().wait_for_everyone()
