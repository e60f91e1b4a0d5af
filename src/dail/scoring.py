"""Scoring samples: grades at every token budget, forced-answer grades, and the summary.

Shared by a native evaluation (`dail.evaluation`) and another engine's samples
(`dail.exchange`), so both grade and summarize the same way:
- `grade_records` grades each sample (`dail.grading`: math-verify in a killable process pool,
  or letters for multiple choice) at every token budget. Budgets come from the one run at the
  largest budget: for budget b the token ids are cut at b, decoded and graded again. That is
  exact for plain sampling, since the first b tokens have the same distribution whatever the
  limit;
- `grade_forced` grades the forced answers of thinking models (`evaluation.force_answers`);
- `summarize` turns the grades into pass@k (mean over problems, bootstrap CI; `dail.stats`) by
  k and by budget, plus token statistics.

`answer_token_index` is the index of the token where the graded answer first appears in the
sample: the first standalone occurrence of the extracted answer string (it is often written
before the final `\\boxed{}`), else the start of the extracted answer. It is null when no
answer was extracted.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dail.data import DataError, Example
from dail.grading import extract_answer, extract_choice, grade_many
from dail.prompts import Prompts, choice_problem, render, student_messages, teacher_messages
from dail.records import read_records
from dail.sampler import sample_seed
from dail.stats import BOOTSTRAP_CONFIDENCE, BOOTSTRAP_RESAMPLES, bootstrap_ci, ks_for, pass_at_k

__all__ = ["budgets_of", "shown_problem", "sample_prompt", "dataset_name", "sample_text", "answer_token_index", "grade_records",
           "grade_forced", "summarize", "write_summary"]


def budgets_of(cfg: Any) -> list[int]:
    """The token budgets an evaluation grades at: `cfg.budgets` and `cfg.max_new_tokens`, sorted."""
    return sorted({int(b) for b in cfg.budgets} | {cfg.max_new_tokens})


def shown_problem(ex: Example, sample_index: int, seed: int) -> tuple[str, str, str]:
    """(problem text shown to the model, gold answer, kind) for one sample."""
    choices = ex.meta.get("choices") if isinstance(ex.meta, dict) else None
    if choices:
        text, letter = choice_problem(ex.problem, choices, int(ex.meta.get("correct", 0)),
                                      seed=sample_seed(seed, ex.id, sample_index))
        return text, letter, "choice"
    return ex.problem, str(ex.answer), "math"


def sample_prompt(tok: Any, ex: Example, sample_index: int, seed: int, context: str, prompts: Prompts) -> list[int]:
    """The prompt ids one sample is drawn from: the student text on the shown problem, or with
    context teacher the teacher text (problem and expert solution; `eval.context`)."""
    text = shown_problem(ex, sample_index, seed)[0]
    if context == "teacher":
        if not (ex.solution or "").strip():
            raise DataError(f"problem {ex.id!r}: eval.context teacher shows the expert solution, and it has none")
        return render(tok, teacher_messages(text, ex.solution, ex.answer, prompts))
    return render(tok, student_messages(text, prompts))


def dataset_name(source: str) -> str:
    if source.startswith("hf:"):
        return source[3:]
    return Path(source).stem if (os.path.exists(source) or "/" in source) else source


# ----------------------------------------------------------------------------- grading records

def sample_text(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def _char_to_token(tok: Any, ids: list[int], char: int) -> int:
    """Index of the token whose text covers character `char` of decode(ids) (binary search)."""
    lo, hi = 1, len(ids)
    while lo < hi:  # smallest k with len(decode(ids[:k])) > char
        mid = (lo + hi) // 2
        if len(sample_text(tok, ids[:mid])) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def answer_token_index(tok: Any, ids: list[int], text: str) -> int | None:
    ex = extract_answer(text)
    if ex is None or not ids:
        return None
    answer = ex.answer.strip()
    first = re.search(r"(?<![\w.])" + re.escape(answer) + r"(?![\w])", text) if answer else None
    char = first.start() if first is not None and first.start() < ex.start else ex.start
    return _char_to_token(tok, ids, char)


def _fits(r: dict, b: int) -> bool:
    """Whether budget b holds the whole sample (a sample of unknown length is taken to fit)."""
    return r["n_tokens"] is None or b >= r["n_tokens"]


def _grade_jobs(jobs: dict[str, list[tuple[dict, Any, str]]], timeout: float) -> list[tuple[dict, Any, bool]]:
    """Grade every (record, key, text) job, one grade_many call per kind, and return (record, key,
    correct). A grade that ran past the timeout counts as wrong and adds one to the record's
    `grade_timeouts` (reported in the summary)."""
    out = []
    for kind, items in jobs.items():
        if not items:
            continue
        late: list[int] = []
        grades = grade_many([t for _, _, t in items], [r["gold"] for r, _, _ in items], timeout, kind=kind,
                            timed_out=late)
        for i in late:
            items[i][0]["grade_timeouts"] = items[i][0].get("grade_timeouts", 0) + 1
        out += [(r, key, bool(ok)) for (r, key, _), ok in zip(items, grades)]
    return out


def grade_records(records: list[dict], budgets: list[int], tok: Any, timeout: float) -> None:
    """Fill `correct`, `correct_at_budget` (missing budgets only) and `answer_token_index` in place.

    Every (record, budget) that needs a grade goes into one grade_many call per kind. A budget
    at or past the sample's length reuses the full-length grade.
    """
    jobs: dict[str, list[tuple[dict, str | None, str]]] = {"math": [], "choice": []}
    for r in records:
        r.setdefault("correct_at_budget", {})
        if r.get("correct") is None:
            jobs[r["kind"]].append((r, None, r["text"]))
        for b in budgets:
            if str(b) in r["correct_at_budget"] or _fits(r, b):
                continue
            jobs[r["kind"]].append((r, str(b), sample_text(tok, r["token_ids"][:b])))
    for r, b, ok in _grade_jobs(jobs, timeout):
        if b is None:
            r["correct"] = ok
        else:
            r["correct_at_budget"][b] = ok
    for r in records:
        for b in budgets:
            if _fits(r, b):
                r["correct_at_budget"][str(b)] = r["correct"]
        if "answer_token_index" not in r:
            r["answer_token_index"] = answer_token_index(tok, r.get("token_ids") or [], r["text"])
        if "answer" not in r:
            if r["kind"] == "choice":
                r["answer"] = extract_choice(r["text"])
            else:
                ex = extract_answer(r["text"])
                r["answer"] = ex.answer if ex is not None else None


def grade_forced(records: list[dict], budgets: list[int], timeout: float) -> None:
    """Fill `correct_forced_at_budget` (budgets not yet there): the grade of the forced text where
    one exists, else the sample's unforced grade at that budget. Needs `correct_at_budget`."""
    jobs: dict[str, list[tuple[dict, str, str]]] = {"math": [], "choice": []}
    for r in records:
        got = r.setdefault("correct_forced_at_budget", {})
        forced = r.get("forced_at_budget") or {}
        for b in map(str, budgets):
            if b in got:
                continue
            got[b] = r["correct_at_budget"][b]
            if forced.get(b) is not None:
                jobs[r["kind"]].append((r, b, forced[b]))
    for r, b, ok in _grade_jobs(jobs, timeout):
        r["correct_forced_at_budget"][b] = ok


# ----------------------------------------------------------------------------- summary

def _pass_table(by_id: dict[str, list[dict]], problem_ids: list[str], n: int, ks: list[int], field: str, b: int,
                seed: int) -> tuple[dict, int]:
    """pass@k by k (mean, CI) from the grades `r[field][str(b)]`, and the number of correct samples."""
    counts = [sum(bool(r[field][str(b)]) for r in by_id[pid]) for pid in problem_ids]
    table = np.array([[pass_at_k(n, c, k) for k in ks] for c in counts])  # (P, K)
    lo, hi = bootstrap_ci(table, seed=seed)
    mean = table.mean(axis=0)
    return ({str(k): {"mean": float(mean[j]), "ci_low": float(lo[j]), "ci_high": float(hi[j])}
             for j, k in enumerate(ks)}, int(sum(counts)))


def samples_written(path: str | Path) -> set[tuple[Any, int]]:
    """The (problem id, sample index) pairs already in a samples file: what a resumed evaluation
    or grading skips."""
    return {(r["id"], r["sample_index"]) for r in read_records(path)}


def summarize(records: list[dict], problem_ids: list[str], n: int, ks: list[int], budgets: list[int],
              seed: int = 0, forced: bool = False) -> dict:
    """pass@k (mean over problems, bootstrap CI) by k and by budget, plus token statistics.

    With `forced`, also the forced-answer pass@k (`correct_forced_at_budget`) at every budget,
    from the same bootstrap draws. A sample of unknown length (`n_tokens` null: external
    samples without token counts) is left out of the token means."""
    by_id: dict[str, list[dict]] = {pid: [] for pid in problem_ids}
    seen = Counter((r["id"], r["sample_index"]) for r in records)
    doubled = [key for key, count in seen.items() if count > 1]
    if doubled:  # two writers on one file; counting both copies would inflate pass@k
        raise DataError(f"summary: {len(doubled)} (id, sample_index) pairs occur more than once (e.g. "
                        f"{doubled[0]!r}); the samples file was written twice")
    for r in records:
        if r["id"] in by_id and r["sample_index"] < n:
            by_id[r["id"]].append(r)
    short = [pid for pid, rs in by_id.items() if len(rs) < n]
    if short:
        raise ValueError(f"summary: {len(short)} problems have fewer than n={n} samples (e.g. {short[0]!r}); "
                         "rerun evaluate to finish them")
    ks = ks_for(n, ks)
    samples = [r for rs in by_id.values() for r in rs]
    lengths = [r["n_tokens"] for r in samples if r["n_tokens"] is not None]
    out_budgets: dict[str, Any] = {}
    for b in budgets:
        table, correct = _pass_table(by_id, problem_ids, n, ks, "correct_at_budget", b, seed)
        out_budgets[str(b)] = {
            "pass_at_k": table,
            "mean_tokens": float(np.mean([min(t, b) for t in lengths])) if lengths else None,
            "correct_samples": correct,
        }
        if forced:
            table, correct = _pass_table(by_id, problem_ids, n, ks, "correct_forced_at_budget", b, seed)
            out_budgets[str(b)] |= {
                "forced_pass_at_k": table, "forced_correct_samples": correct,
                # samples whose answer at this budget was forced (cut inside the thinking block)
                "forced_samples": sum((r.get("forced_at_budget") or {}).get(str(b)) is not None for r in samples),
            }
    top = str(max(budgets))
    found = [r["answer_token_index"] for r in samples if r.get("answer_token_index") is not None]
    head = {"pass_at_k": out_budgets[top]["pass_at_k"]}
    if forced:
        head["forced_pass_at_k"] = out_budgets[top]["forced_pass_at_k"]
    return {
        "n_problems": len(problem_ids), "n": n, "ks": ks, "budgets": list(budgets),
        "n_samples": len(samples),
        **head,
        "by_budget": out_budgets,
        "mean_tokens": float(np.mean(lengths)) if lengths else None,
        "correct_samples": out_budgets[top]["correct_samples"],
        "finish_reasons": dict(Counter(r["finish_reason"] for r in samples)),
        "answer_found_fraction": len(found) / len(samples),
        # Grades that ran past grade_timeout count as wrong; many of them make the figures a lower bound.
        "grade_timeouts": int(sum(r.get("grade_timeouts", 0) for r in samples)),
        "samples_with_grade_timeout": int(sum(bool(r.get("grade_timeouts")) for r in samples)),
        "mean_answer_token_index": float(np.mean(found)) if found else None,
        "per_problem_correct": {pid: sum(bool(r["correct"]) for r in by_id[pid]) for pid in problem_ids},
        # Diversity: distinct final answers among a problem's n samples (mean over problems), and
        # with eval.entropy the token-weighted mean entropy of the model where it wrote.
        "distinct_answers": float(np.mean([len({r["answer"] for r in by_id[pid] if r.get("answer") is not None})
                                           for pid in problem_ids])),
        **({"mean_entropy": float(sum(r["entropy"] * r["n_tokens"] for r in samples)
                                  / max(sum(r["n_tokens"] for r in samples), 1))}
           if samples and all("entropy" in r and r["n_tokens"] is not None for r in samples) else {}),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "confidence": BOOTSTRAP_CONFIDENCE, "over": "problems",
                      "seed": seed},
    }


def write_summary(path: Path, summary: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, path)
