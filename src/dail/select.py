"""`dail select`: the problems an evaluation found hard, written as an expert set.

The paper's training sets are not a random sample of expert problems: e1-verifiable is the
AIME problems (1985-2023) that its base model fails in all 32 samples. `select(cfg)` builds
that set for any model: run `dail eval --n 32` on the expert problems, then
`dail select --eval_dir <that folder> --max_correct 0`.

What it reads, from the evaluation folder (`layout.eval_files`):
- `config.yaml`: the evaluation's resolved config. Its `data` names the problems, which are
  loaded again exactly as `dail eval` loaded them (`data.load_problems`), so every expert field
  (solution, answer, landmarks, meta) comes from the source, not from the samples;
- `samples.jsonl`: each problem's correct count over sample indices 0..n-1 (`correct`, the
  grade at the full budget).
A folder without these, or whose samples are unfinished (a problem with fewer than n, or
shard files of a multi-process run not merged yet), is refused: counting an unfinished
evaluation would select problems the model might still solve.

What it writes: `out`, one expert record per selected problem, in the evaluation's problem
order, with `meta.selected = {eval_dir, model, adapter, n, correct, max_correct, temperature,
max_new_tokens}`; the resolved SelectConfig as `<stem>.config.yaml` next to it (not
`config.yaml`: the expert set often sits in a folder with other outputs). The file is
rewritten atomically; a file that select did not write (no such config next to it) is never
overwritten. A problem without an expert solution (a benchmark file that has none) cannot
be an expert record, so selecting one is an error naming it.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import yaml

from dail.config import DataConfig, SelectConfig, from_dict, save
from dail.data import DataError, load_problems
from dail.layout import eval_files, select_files
from dail.records import read_records, write_records

__all__ = ["correct_counts", "select"]

log = logging.getLogger(__name__)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _saved_eval(eval_dir: Path) -> dict:
    """The evaluation's saved config, checked to be one (`dail eval` writes n and data)."""
    files = eval_files(eval_dir)
    if not eval_dir.is_dir():
        raise DataError(f"{eval_dir}: not a folder (expected a dail eval folder with samples.jsonl and config.yaml)")
    missing = [files[k].name for k in ("config", "samples") if not files[k].exists()]
    if missing:
        raise DataError(f"{eval_dir}: not a dail eval folder (no {' or '.join(missing)}); run `dail eval --out "
                        f"{eval_dir}` first")
    try:
        saved = yaml.safe_load(files["config"].read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{files['config']}: not valid YAML: {e}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict) or not _is_int(saved.get("n")):
        raise DataError(f"{files['config']}: not a dail eval config (expected the fields 'data' and 'n')")
    return saved


def correct_counts(records: list[dict], ids: list[str], n: int, where: str) -> dict[str, int]:
    """Correct samples per problem id over sample indices 0..n-1; every id must have all n.

    A sample without a grade (`correct` missing or null) counts as unfinished: it was written
    before grading completed.
    """
    got: dict[str, dict[int, bool]] = {pid: {} for pid in ids}
    for r in records:
        pid, j = str(r.get("id")), r.get("sample_index")
        if pid in got and _is_int(j) and 0 <= j < n and r.get("correct") is not None:
            got[pid][j] = bool(r["correct"])
    short = [(pid, len(s)) for pid, s in got.items() if len(s) < n]
    if short:
        pid, have = short[0]
        raise DataError(f"{where}: unfinished evaluation: {len(short)} of {len(ids)} problems have fewer than n={n} "
                        f"graded samples (e.g. {pid!r} has {have}); rerun the same `dail eval` to finish it")
    return {pid: sum(s.values()) for pid, s in got.items()}


def select(cfg: SelectConfig) -> Path:
    """Write the expert set of the problems with at most `cfg.max_correct` correct samples; returns its path."""
    eval_dir = Path(cfg.eval_dir)
    saved = _saved_eval(eval_dir)
    files = eval_files(eval_dir)
    shards = sorted(eval_dir.glob("samples.rank*-of-*.jsonl"))
    if shards:
        raise DataError(f"{eval_dir}: unfinished evaluation: shard files of a multi-process run are not merged yet "
                        f"({shards[0].name}); rerun the same `dail eval` to finish it")
    out_files = select_files(cfg.out)
    out = out_files["out"]
    if out.exists() and not out_files["config"].exists():
        raise DataError(f"{out}: exists and was not written by dail select (no {out_files['config'].name} next to "
                        "it); choose another --out, or delete the file")

    n = saved["n"]
    data = from_dict(DataConfig, saved["data"], where=f"{files['config']}: ", path="data.")
    problems = load_problems(data)
    counts = correct_counts(read_records(files["samples"], repair=False), [ex.id for ex in problems], n,
                            str(files["samples"]))
    chosen = [ex for ex in problems if counts[ex.id] <= cfg.max_correct]
    if cfg.max_correct >= n:
        log.warning("max_correct %d >= n %d: every problem is selected", cfg.max_correct, n)
    no_solution = [ex.id for ex in chosen if not ex.solution.strip()]
    if no_solution:
        raise DataError(f"{data.source}: {len(no_solution)} selected problems have no expert solution (e.g. "
                        f"{no_solution[0]!r}), so they cannot go into an expert set; evaluate on a source that "
                        "carries solutions")

    model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    how = {"eval_dir": str(eval_dir), "model": model.get("name"), "adapter": saved.get("adapter") or None, "n": n,
           "max_correct": cfg.max_correct, "temperature": saved.get("temperature"),
           "max_new_tokens": saved.get("max_new_tokens")}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_records(out, (ex.to_dict() | {"meta": dict(ex.meta) | {"selected": how | {"correct": counts[ex.id]}}}
                        for ex in chosen))
    save(cfg, out_files["config"])
    hist = Counter(counts.values())
    log.info("%s: %d of %d problems have at most %d of %d samples correct (correct counts: %s)", out, len(chosen),
             len(problems), cfg.max_correct, n, ", ".join(f"{c}: {hist[c]}" for c in sorted(hist)))
    return out
