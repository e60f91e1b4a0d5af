"""Record I/O: the resumable JSONL files every stage writes (synthetic sets, samples, metrics).

A record is one JSON object per line. Stages append one record at a time and flush it, so a
killed process loses at most the line it was writing; `read_records` cuts such a torn last line
off before the next append. Under `accelerate launch`, each rank appends to its own shard file
(`dist.shard_path`) and rank 0 folds the shards into the output with `merge_shards`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

from dail import dist
from dail.data import DataError

__all__ = ["read_records", "append_record", "merge_shards"]


def read_records(path: str | Path, repair: bool = True) -> list[dict]:
    """All complete records of an output JSONL file.

    A process killed mid-write can leave a torn last line. With `repair`, that line is cut
    off the file (with a warning) so appends continue cleanly. A bad line anywhere else is an
    error: something other than an interrupted append wrote it.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if repair and data and not data.endswith(b"\n") and _complete(data.rsplit(b"\n", 1)[-1]):
        # A complete last record without its newline (written by hand or by another tool): the
        # next append would glue a record onto it. Close the line.
        with open(path, "ab") as fh:
            fh.write(b"\n")
        data += b"\n"
    records, offset = [], 0
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        last = lineno == len(lines)
        if raw.strip():
            try:
                records.append(json.loads(raw.decode("utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                torn = last or all(not x.strip() for x in lines[lineno:])
                if not torn:
                    raise DataError(f"{path}:{lineno}: not a valid JSON record") from None
                if not repair:
                    break
                warnings.warn(f"{path}:{lineno}: torn last line ({len(raw)} bytes) from an interrupted "
                              "write; removing it and continuing", stacklevel=2)
                with open(path, "r+b") as fh:
                    fh.truncate(offset)
                break
        offset += len(raw) + 1
    return records


def _complete(raw: bytes) -> bool:
    try:
        json.loads(raw.decode("utf-8"))
        return True
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False


def append_record(fh: Any, record: dict) -> None:
    """Append one record and flush it to disk, so a crash loses at most the line being written."""
    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def merge_shards(out: str | Path, world_size: int, key: Callable[[dict], Any]) -> None:
    """Rank 0: fold every shard file into `out` (keeping records already there), sorted by key."""
    out = Path(out)
    if world_size == 1:
        return
    records = {key(r): r for r in read_records(out)}
    shards = [dist.shard_path(out, r, world_size) for r in range(world_size)]
    for p in shards:
        for r in read_records(p):
            records.setdefault(key(r), r)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for k in sorted(records):
            fh.write(json.dumps(records[k], ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    for p in shards:
        p.unlink(missing_ok=True)
