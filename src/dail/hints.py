"""NuRL hints (Chen et al., 2025, "Nudging the Boundaries of LLM Reasoning"): collected once,
stored in a JSONL you can read and edit, used only inside GRPO rollouts, never at evaluation.

The hints file (`<out>/hints.jsonl` unless `hints_file` names another), one object per line:

    {"id": "gsm-12", "hint": "Find how many pages he writes per week first.", "source": "self",
     "states_answer": false, "reasoning": "...", "model": "...", "hint_prompt_version": "..."}

Only `id` and `hint` are read back; the rest is there to inspect. `hint` is a string or null
(no hint: the problem trains as plain GRPO). Every id must be a training problem. Hints missing
from the file are collected and appended before training, so an edited file is never
overwritten, and deleting a line makes the next run collect that hint again.

Two ways to collect a hint (`GRPOConfig.hints`):
- `self` (NuRL): the base model, in one chat, first sees the problem and its gold answer and
  explains how to reach it (up to `max_new_tokens`), then is asked for a short, abstract hint
  that does not state the answer (up to `hint_tokens`). Greedy decoding, so a rerun collects
  the same hints. One hint per problem.
- `landmarks` (ours): the problem's landmarks (`dail.landmarks`: the record's own list, else
  the `math` extractor on its solution), minus those equal to the gold answer. Free.

A hint that states the gold answer (it appears in the hint as a standalone token) is not used;
it stays in the file with `states_answer: true`, to be edited. The check runs again on every
load, so a fixed hint is used on the next run. NuRL asks the model not to reveal the answer;
the string check is ours.

The wordings (`dail.prompts`: `hinted_messages`, `hint_explain_messages`, `hint_request_messages`)
serve NuRL alone, so they have their own version (`HINT_PROMPT_VERSION`, saved in each record),
following `dail.prompts`' rule for single-method prompts.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from dail import dist
from dail.data import DataError, Example
from dail.grading import normalize
from dail.landmarks import extract_landmarks
from dail.prompts import HINT_PROMPT_VERSION, hint_explain_messages, hint_request_messages, render
from dail.records import append_record, merge_shards, read_jsonl, read_records
from dail.sampler import Sampler, Sampling, sample_seed

__all__ = ["states_answer", "landmark_hint", "read_hints",
           "usable_hints", "collect_hints"]

log = logging.getLogger(__name__)

def states_answer(hint: str, answer: str) -> bool:
    """Whether `hint` states the gold `answer`: it appears as a standalone token (as written, or
    in grading's normalized form), e.g. answer 56 in "... which gives 56 pages" but not in "560"."""
    forms = {answer.strip(), normalize(answer)} - {""}
    return any(re.search(r"(?<![\w.])" + re.escape(f) + r"(?![\w]|\.\d)", hint, re.IGNORECASE) for f in forms)


def landmark_hint(ex: Example) -> str | None:
    """The landmarks of `ex` that are not its gold answer, as one hint line; None if none are left."""
    marks = ex.landmarks if ex.landmarks is not None else extract_landmarks(ex.solution, "math")
    gold = normalize(ex.answer or "")
    kept = [m for m in marks if normalize(m) != gold and not states_answer(m, ex.answer or "")]
    return f"Useful intermediate results: {'; '.join(kept)}." if kept else None


# ----------------------------------------------------------------------------- the file

def read_hints(path: str | Path, problems: list[Example]) -> dict[str, str | None]:
    """{id: hint or None} from a hints file (empty if it does not exist). Errors name the file,
    the line and the field: a line that is not JSON, an id that is not a training problem, a
    repeated id, a hint that is not a string or null. Nothing is repaired or dropped: the file
    may hold hand edits."""
    path = Path(path)
    if not path.exists():
        return {}
    known = {ex.id for ex in problems}
    out: dict[str, str | None] = {}
    seen: dict[str, int] = {}
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        hid = rec.get("id")
        if isinstance(hid, int) and not isinstance(hid, bool):
            hid = str(hid)
        if not isinstance(hid, str) or not hid:
            raise DataError(f"{where}: field 'id': expected a problem id (string), got {rec.get('id')!r}")
        if hid not in known:
            raise DataError(f"{where}: field 'id': {hid!r} is not one of the {len(known)} training problems "
                            "(check data.source, data.split and data.limit, or delete the line)")
        if hid in seen:
            raise DataError(f"{where}: field 'id': {hid!r} already has a hint at line {seen[hid]}")
        if "hint" not in rec:
            raise DataError(f"{where}: missing field 'hint' (a string, or null for no hint)")
        hint = rec["hint"]
        if hint is not None and not isinstance(hint, str):
            raise DataError(f"{where}: field 'hint': expected a string or null, got {hint!r}")
        seen[hid] = lineno
        out[hid] = hint.strip() if isinstance(hint, str) and hint.strip() else None
    return out


def usable_hints(hints: dict[str, str | None], problems: list[Example]) -> dict[str, str]:
    """The hints training may use: present, and not stating the gold answer (logged)."""
    gold = {ex.id: ex.answer or "" for ex in problems}
    usable = {k: h for k, h in hints.items() if h is not None and not states_answer(h, gold[k])}
    leaked = sorted(k for k, h in hints.items() if h is not None and k not in usable)
    if leaked:
        log.warning("%d hints state the gold answer and are not used (e.g. %r); edit them in the hints file",
                    len(leaked), leaked[0])
    log.info("hints: %d of %d problems have a usable hint", len(usable), len(problems))
    return usable


# ----------------------------------------------------------------------------- collection

def collect_hints(kind: str, path: str | Path, problems: list[Example], have: dict[str, Any], sampler: Sampler,
                  max_new_tokens: int, hint_tokens: int, seed: int, model_name: str, batch_size: int = 16) -> None:
    """Append a record for every problem without one in `path` (kind self: written by `sampler`,
    the base model). Under `accelerate launch` each rank collects its share into its own shard and
    rank 0 merges the shards (`dail.dist`)."""
    rank, world = dist.world()
    todo = [ex for ex in problems if ex.id not in have]
    mine = dist.shard(todo, rank, world)
    shard = dist.shard_path(path, rank, world)
    if todo and rank == 0:
        log.info("hints (%s): collecting %d of %d into %s", kind, len(todo), len(problems), path)
    if mine:
        shard.parent.mkdir(parents=True, exist_ok=True)
        # Also closes a hand-edited last line that lacks its newline, so the next append starts a line.
        done = {r.get("id") for r in read_records(shard)}
        with open(shard, "a", encoding="utf-8") as fh:
            for i in range(0, len(mine), batch_size):
                batch = [ex for ex in mine[i:i + batch_size] if ex.id not in done]
                if kind == "landmarks":
                    recs = [{"id": ex.id, "hint": landmark_hint(ex), "source": "landmarks"} for ex in batch]
                else:
                    recs = _self_hints(batch, sampler, max_new_tokens, hint_tokens, seed)
                for rec in recs:
                    hint = rec["hint"]
                    append_record(fh, rec | {"states_answer": bool(hint) and states_answer(hint, _gold(batch, rec)),
                                             "model": model_name, "hint_prompt_version": HINT_PROMPT_VERSION})
    dist.barrier()
    if rank == 0:
        order = {ex.id: i for i, ex in enumerate(problems)}
        merge_shards(path, world, key=lambda r: (order.get(r["id"], len(order)), str(r["id"])))
    dist.barrier()


def _gold(batch: list[Example], rec: dict) -> str:
    return next(ex.answer or "" for ex in batch if ex.id == rec["id"])


def _self_hints(batch: list[Example], sampler: Sampler, max_new_tokens: int, hint_tokens: int,
                seed: int) -> list[dict]:
    """NuRL's two turns for a batch of problems: explain the gold answer, then hint at it (greedy)."""
    tok = sampler.tokenizer

    def greedy(prompts: list[list[int]], limit: int, tag: int) -> list[str]:
        seeds = [sample_seed(seed, ex.id, tag) for ex in batch]  # unused at temperature 0
        out = sampler.sample(prompts, seeds, Sampling(temperature=0.0, max_new_tokens=limit))
        return [tok.decode(d.tokens, skip_special_tokens=True).strip() for d in out]

    reasoning = greedy([render(tok, hint_explain_messages(ex.problem, ex.answer)) for ex in batch], max_new_tokens, 0)
    hints = greedy([render(tok, hint_request_messages(ex.problem, ex.answer, r)) for ex, r in zip(batch, reasoning)],
                   hint_tokens, 1)
    hints = [re.sub(r"^\s*\**hint\**\s*[:：]\s*", "", h, flags=re.IGNORECASE).strip() for h in hints]
    return [{"id": ex.id, "hint": h or None, "source": "self", "reasoning": r}
            for ex, h, r in zip(batch, hints, reasoning)]
