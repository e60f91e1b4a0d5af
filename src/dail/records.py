"""Record I/O: the JSONL files every stage writes and reads (synthetic sets, samples, hints, metrics).

A record is one JSON object per line. Three ways in and out, each written once:
- appending: stages append one record at a time and fsync it (`append_record`), so a killed
  process loses at most the line it was writing; `read_records` cuts such a torn last line off
  before the next append;
- rewriting: a whole file is replaced in one step (`write_records`: temporary file, fsync,
  rename, fsync of the folder), so a crash leaves the old file or the new one, whole;
- checked reading of a file a person or another tool wrote (`read_jsonl`): nothing is
  repaired, and an error names the file and the line.

Under `accelerate launch`, each rank appends to its own shard file (`dist.shard_path`) and rank 0
folds the shards into the output with `merge_shards`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from dail import dist
from dail.data import DataError

__all__ = ["read_records", "read_jsonl", "append_record", "write_records", "merge_shards"]


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


def write_records(path: str | Path, records: Iterable[dict]) -> None:
    """Replace `path` with `records` in one step: a crash leaves the old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSONL file a person or another tool wrote.

    Strict: a line that is not a JSON object raises DataError naming the file and the line, and
    nothing is repaired (unlike `read_records`, which owns the files dail appends to). The
    caller checks the fields, naming them as `f"{path}:{line}: field 'x': ..."`.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise DataError(f"{path}:{lineno}: not a valid JSON record ({e}); fix or delete the line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


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
    write_records(out, (records[k] for k in sorted(records)))
    for p in shards:
        p.unlink(missing_ok=True)
