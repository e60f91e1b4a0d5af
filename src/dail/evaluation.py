"""Evaluation: n samples per problem, graded, summarized as pass@k by k and by token budget.

`evaluate(cfg)` (docs/design.md "Evaluation"):
- draws `cfg.n` samples per problem with `dail.decoding.decode` (plain sampling on the student
  prompt, stop at end-of-turn). Each (problem, sample) has its own generator, seeded from
  (run seed, id, sample index), so results do not depend on batching, order or sharding. All
  n samples of a problem go into one batch where they fit, so the prompt is prefilled once;
- grades each sample (`dail.grading`: math-verify in a killable process pool, or letters for
  multiple choice) at every token budget. Budgets come from the one run at the largest budget:
  for budget b the token ids are cut at b, decoded and graded again. That is exact for plain
  sampling, since the first b tokens have the same distribution whatever the limit;
- writes `<out>/samples.jsonl` (one record per sample, appended and flushed; a rerun skips
  the (id, sample_index) pairs already there and repairs a torn last line),
  `<out>/summary.json` and `<out>/config.yaml`.

Problems come from `cfg.data` (the same loaders as the expert set), except that an existing
`.jsonl`, `.parquet` or `.csv` file is read with `dail.data.load_benchmark`, which needs only a
problem and an answer (AIME, BeyondAIME, IMO-AnswerBench, GPQA-Diamond; column mapping in
`dail.data.BENCHMARK_FIELDS`, overridable with `data.fields`). Multiple-choice problems
(GPQA) get their options shuffled per (problem, sample) with the sample's seed, so a
position bias of the model averages out over the n samples instead of repeating.

Under `accelerate launch` each rank takes every world-th problem (`dail.dist`), writes its own
shard, and rank 0 merges the shards and writes the summary, which then equals a
single-process run.

`answer_token_index` is the index of the token where the graded answer first appears in the
sample: the first standalone occurrence of the extracted answer string (it is often written
before the final `\\boxed{}`), else the start of the extracted answer. It is null when no
answer was extracted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dail import dist
from dail.config import EvalConfig, check_resumable, save
from dail.data import DataError, Example, load_problems
from dail.lock import output_lock
from dail.records import append_record, merge_shards, read_records
from dail.decoding import decode, generator_for, sample_seed
from dail.layout import eval_files
from dail.grading import extract_answer, extract_choice, grade_many
from dail.models import check_adapter, check_source, context_window, load_adapter_for_inference, load_model, load_tokenizer, model_label
from dail.prompts import PROMPT_VERSION, choice_problem, end_of_turn_ids, render, student_messages

log = logging.getLogger(__name__)

__all__ = ["pass_at_k", "bootstrap_ci", "evaluate", "summarize", "ks_for"]

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_CONFIDENCE = 0.95


# ----------------------------------------------------------------------------- pass@k

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    (Expand C(n-c,k)/C(n,k) = prod_{j=0}^{k-1} (n-c-j)/(n-j) and cancel: what remains is the
    product over the c largest denominators.) Worked case: n=16, c=4, k=4 gives
    1 - (12/16)(11/15)(10/14)(9/13) = 1 - 11880/43680 = 265/364.
    """
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def bootstrap_ci(values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                 confidence: float = BOOTSTRAP_CONFIDENCE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean over problems.

    values: (P,) or (P, K) per-problem scores. Resamples problems with replacement (the same
    draws for every column, so curves stay consistent). Returns (low, high), each (K,) or scalar.
    """
    v = np.asarray(values, dtype=np.float64)
    squeeze = v.ndim == 1
    v = v.reshape(len(v), -1)                                     # (P, K)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(resamples, len(v)))       # (R, P)
    means = v[idx].mean(axis=1)                                   # (R, K)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return (lo[0], hi[0]) if squeeze else (lo, hi)


def ks_for(n: int, ks: list[int]) -> list[int]:
    """The requested ks plus every power of two up to n and n itself (for pass@k curves)."""
    return sorted({int(k) for k in ks} | {2 ** i for i in range(int(math.log2(n)) + 1)} | {n})


def dataset_name(source: str) -> str:
    if source.startswith("hf:"):
        return source[3:]
    return Path(source).stem if (os.path.exists(source) or "/" in source) else source


def _prompt(ex: Example, sample_index: int, seed: int) -> tuple[str, str, str]:
    """(problem text shown to the model, gold answer, kind) for one sample."""
    choices = ex.meta.get("choices") if isinstance(ex.meta, dict) else None
    if choices:
        text, letter = choice_problem(ex.problem, choices, int(ex.meta.get("correct", 0)),
                                      seed=sample_seed(seed, ex.id, sample_index))
        return text, letter, "choice"
    return ex.problem, str(ex.answer), "math"


# ----------------------------------------------------------------------------- grading records

def _decode_text(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def _char_to_token(tok: Any, ids: list[int], char: int) -> int:
    """Index of the token whose text covers character `char` of decode(ids) (binary search)."""
    lo, hi = 1, len(ids)
    while lo < hi:  # smallest k with len(decode(ids[:k])) > char
        mid = (lo + hi) // 2
        if len(_decode_text(tok, ids[:mid])) > char:
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
            if str(b) in r["correct_at_budget"] or b >= r["n_tokens"]:
                continue
            jobs[r["kind"]].append((r, str(b), _decode_text(tok, r["token_ids"][:b])))
    for kind, items in jobs.items():
        if not items:
            continue
        late: list[int] = []
        grades = grade_many([t for _, _, t in items], [r["gold"] for r, _, _ in items], timeout, kind=kind,
                            timed_out=late)
        for i in late:  # graded wrong because math-verify ran past the timeout: counted in the summary
            r = items[i][0]
            r["grade_timeouts"] = r.get("grade_timeouts", 0) + 1
        for (r, b, _), ok in zip(items, grades):
            if b is None:
                r["correct"] = bool(ok)
            else:
                r["correct_at_budget"][b] = bool(ok)
    for r in records:
        for b in budgets:
            if b >= r["n_tokens"]:
                r["correct_at_budget"][str(b)] = r["correct"]
        if "answer_token_index" not in r:
            r["answer_token_index"] = answer_token_index(tok, r["token_ids"], r["text"])
        if "answer" not in r:
            if r["kind"] == "choice":
                r["answer"] = extract_choice(r["text"])
            else:
                ex = extract_answer(r["text"])
                r["answer"] = ex.answer if ex is not None else None


# ----------------------------------------------------------------------------- summary

def summarize(records: list[dict], problem_ids: list[str], n: int, ks: list[int], budgets: list[int],
              seed: int = 0) -> dict:
    """pass@k (mean over problems, bootstrap CI) by k and by budget, plus token statistics."""
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
    out_budgets: dict[str, Any] = {}
    for b in budgets:
        counts = [sum(bool(r["correct_at_budget"][str(b)]) for r in by_id[pid]) for pid in problem_ids]
        table = np.array([[pass_at_k(n, c, k) for k in ks] for c in counts])  # (P, K)
        lo, hi = bootstrap_ci(table, seed=seed)
        mean = table.mean(axis=0)
        out_budgets[str(b)] = {
            "pass_at_k": {str(k): {"mean": float(mean[j]), "ci_low": float(lo[j]), "ci_high": float(hi[j])}
                          for j, k in enumerate(ks)},
            "mean_tokens": float(np.mean([min(r["n_tokens"], b) for rs in by_id.values() for r in rs])),
            "correct_samples": int(sum(counts)),
        }
    top = str(max(budgets))
    samples = [r for rs in by_id.values() for r in rs]
    found = [r["answer_token_index"] for r in samples if r.get("answer_token_index") is not None]
    return {
        "n_problems": len(problem_ids), "n": n, "ks": ks, "budgets": list(budgets),
        "n_samples": len(samples),
        "pass_at_k": out_budgets[top]["pass_at_k"],
        "by_budget": out_budgets,
        "mean_tokens": float(np.mean([r["n_tokens"] for r in samples])),
        "correct_samples": out_budgets[top]["correct_samples"],
        "finish_reasons": dict(Counter(r["finish_reason"] for r in samples)),
        "answer_found_fraction": len(found) / len(samples),
        # Grades that ran past grade_timeout count as wrong; many of them make the figures a lower bound.
        "grade_timeouts": int(sum(r.get("grade_timeouts", 0) for r in samples)),
        "samples_with_grade_timeout": int(sum(bool(r.get("grade_timeouts")) for r in samples)),
        "mean_answer_token_index": float(np.mean(found)) if found else None,
        "per_problem_correct": {pid: sum(bool(r["correct"]) for r in by_id[pid]) for pid in problem_ids},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "confidence": BOOTSTRAP_CONFIDENCE, "over": "problems",
                      "seed": seed},
    }


# ----------------------------------------------------------------------------- sampling

def _batches(todo: list[tuple[Example, int]], batch_size: int) -> list[list[tuple[Example, int]]]:
    """Pack work items into batches, keeping each problem's samples together where they fit."""
    groups: dict[str, list[tuple[Example, int]]] = {}
    for ex, j in todo:
        groups.setdefault(ex.id, []).append((ex, j))
    batches, cur = [], []
    for group in groups.values():
        while group:
            # Start a new batch when the whole group fits in one but not in what is left here;
            # a group larger than a batch cannot stay together anyway, so it fills the gap.
            if cur and len(cur) + len(group) > batch_size and len(group) <= batch_size:
                batches.append(cur)
                cur = []
            take = group[: batch_size - len(cur)]
            cur, group = cur + take, group[len(take):]
            if len(cur) == batch_size:
                batches.append(cur)
                cur = []
    if cur:
        batches.append(cur)
    return batches


def _load(cfg: EvalConfig, rank: int, world_size: int) -> Any:
    device = None
    if world_size > 1 and cfg.model.device == "auto" and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    model = load_model(cfg.model, device)
    if cfg.adapter:
        model = load_adapter_for_inference(model, cfg.adapter)
    return model


def _capped(max_new_tokens: int, prompts: list[list[int]], batch: list[tuple[Example, int]], window: int) -> int:
    """`max_new_tokens`, cut so that the longest prompt of the batch plus it fits the model's
    window (logged where it applies); a prompt that leaves no room is an error."""
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    room = window - len(prompts[longest])
    if room <= 0:
        raise DataError(f"problem {batch[longest][0].id!r}: its prompt has {len(prompts[longest])} tokens, which "
                        f"fills the model's window of {window} positions")
    if room < max_new_tokens:
        log.warning("problem %r: prompt of %d tokens + max_new_tokens %d exceeds the model's window of %d; "
                    "sampling at most %d tokens in its batch", batch[longest][0].id, len(prompts[longest]),
                    max_new_tokens, window, room)
    return min(max_new_tokens, room)


def evaluate(cfg: EvalConfig, model: Any = None, tokenizer: Any = None, label: str | None = None,
             rank: int | None = None, world_size: int | None = None) -> dict:
    """Sample, grade and summarize; returns the summary (also written to <out>/summary.json).

    `model` (already carrying any adapter) and `tokenizer` may be passed in; otherwise they
    are loaded from cfg.model (+ cfg.adapter). `rank`/`world_size` default to the
    `accelerate launch` ones; on ranks other than 0 the summary is read back after rank 0 wrote it.
    """
    if rank is None or world_size is None:
        rank, world_size = dist.world()
    if cfg.adapter:
        check_adapter(cfg.adapter)
    check_source(cfg.model)
    with output_lock(eval_files(cfg.out)["lock"], f"{cfg.out}: evaluation", rank):
        return _evaluate(cfg, model, tokenizer, label, rank, world_size)


def _evaluate(cfg: EvalConfig, model: Any, tokenizer: Any, label: str | None, rank: int, world_size: int) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = eval_files(out)
    samples_path = files["samples"]
    if any(out.glob("samples*.jsonl")):
        check_resumable(files["config"], cfg, "samples")
    if rank == 0:
        save(cfg, files["config"])
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    budgets = sorted({int(b) for b in cfg.budgets} | {cfg.max_new_tokens})
    problems = load_problems(cfg.data)
    mine = dist.shard(problems, rank, world_size)
    shard_file = dist.shard_path(samples_path, rank, world_size)
    done = {(r["id"], r["sample_index"]) for r in read_records(shard_file)}
    if world_size > 1:  # records merged by an earlier run
        done |= {(r["id"], r["sample_index"]) for r in read_records(samples_path)}
    todo = [(ex, j) for ex in mine for j in range(cfg.n) if (ex.id, j) not in done]

    if todo:
        if model is None:
            model = _load(cfg, rank, world_size)
        stop_ids = end_of_turn_ids(tok)
        window = context_window(model)
        t0, n_tok = time.perf_counter(), 0
        bar = tqdm(total=len(todo), desc=f"eval {out.name}", unit="sample", disable=rank != 0)
        with open(shard_file, "a", encoding="utf-8") as fh:
            for batch in _batches(todo, cfg.batch_size):
                shown = [_prompt(ex, j, cfg.seed) for ex, j in batch]
                prompts = [render(tok, student_messages(text)) for text, _, _ in shown]
                decoded = decode(model, prompts, generators=[generator_for(cfg.seed, ex.id, j) for ex, j in batch],
                                 max_new_tokens=_capped(cfg.max_new_tokens, prompts, batch, window), stop_ids=stop_ids, pad_id=tok.pad_token_id,
                                 temperature=cfg.temperature, top_p=cfg.top_p)
                records = [{"id": ex.id, "sample_index": j, "kind": kind, "gold": gold,
                            "text": _decode_text(tok, d.tokens), "n_tokens": len(d.tokens),
                            "finish_reason": d.finish_reason, "token_ids": d.tokens}
                           for (ex, j), (_, gold, kind), d in zip(batch, shown, decoded)]
                grade_records(records, budgets, tok, cfg.grade_timeout)
                for r in records:
                    append_record(fh, r)
                n_tok += sum(r["n_tokens"] for r in records)
                bar.update(len(batch))
        bar.close()
        dt = time.perf_counter() - t0
        log.info("%s: sampled %d sequences, %d tokens in %.1f s (%.1f tok/s)", out, len(todo), n_tok, dt,
                 n_tok / max(dt, 1e-9))

    dist.barrier()
    summary_path = files["summary"]
    if rank == 0:
        order = {ex.id: i for i, ex in enumerate(problems)}
        merge_shards(samples_path, world_size,
                   key=lambda r: (order.get(r["id"], len(order)), str(r["id"]), int(r["sample_index"])))
        records = read_records(samples_path)
        ids = [ex.id for ex in problems]
        wanted = [r for r in records if r["id"] in order and r["sample_index"] < cfg.n]
        missing = [r for r in wanted if any(str(b) not in r.get("correct_at_budget", {}) for b in budgets)]
        if missing:  # budgets added since these samples were drawn: grade the cut texts now
            grade_records(missing, budgets, tok, cfg.grade_timeout)
        summary = {
            "label": label or ("trained" if cfg.adapter else "base"),
            "model": model_label(cfg.model) + (f" + {cfg.adapter}" if cfg.adapter else ""),
            "dataset": dataset_name(cfg.data.source), "split": cfg.data.split,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
            "prompt_version": PROMPT_VERSION,
            **summarize(wanted, ids, cfg.n, cfg.ks, budgets, seed=cfg.seed),
        }
        tmp = summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        os.replace(tmp, summary_path)
        top = summary["pass_at_k"]
        log.info("%s: %s", out, ", ".join(f"pass@{k}={v['mean']:.3f}" for k, v in top.items()))
    dist.barrier()
    if rank != 0:
        return json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    return summary
