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

Thinking models (`model.thinking`, docs/design.md "Thinking models"). The prompt opens the
thinking block, and a sample cut at budget b inside it rarely holds an answer. So, with
`force_answer`, every sample that reaches b before closing the block is continued from its cut
prefix: `prompts.FORCED_ANSWER_CUE` (close the block, "The final answer is \\boxed{") and at
most `force_tokens` sampled tokens, one short batched decode over all (sample, budget) pairs,
each with its own seed; the cue plus that continuation is graded alone. A sample that closed
its block, or ended, before b keeps its unforced grade as its forced one. Records carry
`forced_at_budget` (the forced text, null where nothing was forced) and
`correct_forced_at_budget`; the summary adds `forced_pass_at_k` next to `pass_at_k` for every
budget. The sampling run itself is unchanged, so one run still gives every budget. The
forced continuation counts its penalties over its own tokens only, as a fresh engine request
from the cut prefix would (vLLM counts a request's output tokens, not its prompt).

Bring your own samples. `samples=FILE.jsonl` skips sampling: each line gives one (problem
id, sample index) completion from another engine (schema in the README), and the same grading
and summary run on it (`evaluate_samples`). `export_prompts` writes the prompts such an engine
needs, as text and ids (`export_prompts`).
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
from dail.prompts import (FORCED_ANSWER_CUE, FORCED_ANSWER_VERSION, choice_problem, end_of_turn_ids, load_prompts,
                          render, set_thinking, student_messages, think_close_ids)

log = logging.getLogger(__name__)

__all__ = ["pass_at_k", "bootstrap_ci", "evaluate", "summarize", "ks_for", "force_answers", "grade_forced",
           "read_samples", "evaluate_samples", "export_prompts"]

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
            jobs[r["kind"]].append((r, str(b), _decode_text(tok, r["token_ids"][:b])))
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


# ----------------------------------------------------------------------------- forced answers

def _cut_in_thinking(r: dict, b: int, close: set[int]) -> bool:
    """Whether sample `r` reached budget b (it has more tokens, or was stopped by the length cap
    at exactly b) with its thinking block still open (no closing-tag token among the first b)."""
    ids = r["token_ids"]
    reached = len(ids) > b or (len(ids) == b and r["finish_reason"] == "length")
    return reached and close.isdisjoint(ids[:b])


def force_answers(model: Any, tok: Any, records: list[dict], prompts: list[list[int]], budgets: list[int],
                  cfg: EvalConfig, stop_ids: list[int], window: int) -> None:
    """Fill `forced_at_budget` (budgets not yet there): the cue plus the forced continuation
    where the sample was cut inside its thinking block, None elsewhere.

    `prompts[i]` is the prompt `records[i]` was sampled from. Every forced (sample, budget)
    continues `prompt + ids[:b] + cue` for at most `cfg.force_tokens` tokens; all of them are
    decoded together in batches of `cfg.batch_size`, shortest first (less padding), each row with
    its own generator (run seed, id + budget, sample index), so batching does not change them.
    """
    close = set(think_close_ids(tok))
    cue = list(tok(FORCED_ANSWER_CUE, add_special_tokens=False)["input_ids"])
    jobs: list[tuple[dict, int, list[int]]] = []
    for r, prompt in zip(records, prompts):
        forced = r.setdefault("forced_at_budget", {})
        for b in budgets:
            if str(b) in forced:
                continue
            forced[str(b)] = None
            if _cut_in_thinking(r, b, close):
                jobs.append((r, b, prompt + r["token_ids"][:b] + cue))
    jobs.sort(key=lambda job: len(job[2]))
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start:start + cfg.batch_size]
        room = min(cfg.force_tokens, window - len(chunk[-1][2]))
        if room <= 0:  # prompt + cut + cue already fill the window: these keep their unforced grade
            log.warning("%d forced answers skipped: prompt + budget + cue reach the model's window of %d", len(chunk),
                        window)
            continue
        decoded = decode(model, [p for _, _, p in chunk], max_new_tokens=room, stop_ids=stop_ids,
                         pad_id=tok.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
                         presence_penalty=cfg.presence_penalty, frequency_penalty=cfg.frequency_penalty,
                         generators=[generator_for(cfg.seed, f"{r['id']}\x00forced@{b}", r["sample_index"])
                                     for r, b, _ in chunk])
        for (r, b, _), d in zip(chunk, decoded):
            r["forced_at_budget"][str(b)] = FORCED_ANSWER_CUE + _decode_text(tok, d.tokens)


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
    if cfg.samples:
        _check_samples_path(cfg, files)
    if any(out.glob("samples*.jsonl")):
        check_resumable(files["config"], cfg, "samples")
    if rank == 0:
        save(cfg, files["config"])
    if cfg.samples:
        return evaluate_samples(cfg, tokenizer, label, rank)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    thinking = set_thinking(tok, cfg.model.thinking)
    forcing = cfg.force_answer and thinking
    if cfg.export_prompts:
        return export_prompts(cfg, tok, rank)
    budgets = sorted({int(b) for b in cfg.budgets} | {cfg.max_new_tokens})
    problems = load_problems(cfg.data)
    prompt_set = load_prompts(cfg.prompts)
    mine = dist.shard(problems, rank, world_size)
    shard_file = dist.shard_path(samples_path, rank, world_size)
    done = {(r["id"], r["sample_index"]) for r in read_records(shard_file)}
    if world_size > 1:  # records merged by an earlier run
        done |= {(r["id"], r["sample_index"]) for r in read_records(samples_path)}
    todo = [(ex, j) for ex in mine for j in range(cfg.n) if (ex.id, j) not in done]
    stop_ids = end_of_turn_ids(tok)

    if todo:
        if model is None:
            model = _load(cfg, rank, world_size)
        window = context_window(model)
        t0, n_tok = time.perf_counter(), 0
        bar = tqdm(total=len(todo), desc=f"eval {out.name}", unit="sample", disable=rank != 0)
        with open(shard_file, "a", encoding="utf-8") as fh:
            for batch in _batches(todo, cfg.batch_size):
                shown = [_prompt(ex, j, cfg.seed) for ex, j in batch]
                prompts = [render(tok, student_messages(text, prompt_set)) for text, _, _ in shown]
                decoded = decode(model, prompts, generators=[generator_for(cfg.seed, ex.id, j) for ex, j in batch],
                                 max_new_tokens=_capped(cfg.max_new_tokens, prompts, batch, window), stop_ids=stop_ids, pad_id=tok.pad_token_id,
                                 temperature=cfg.temperature, top_p=cfg.top_p,
                                 presence_penalty=cfg.presence_penalty, frequency_penalty=cfg.frequency_penalty)
                records = [{"id": ex.id, "sample_index": j, "kind": kind, "gold": gold,
                            "text": _decode_text(tok, d.tokens), "n_tokens": len(d.tokens),
                            "finish_reason": d.finish_reason, "token_ids": d.tokens, "thinking": thinking,
                            "prompt_hash": prompt_set.hash}
                           for (ex, j), (_, gold, kind), d in zip(batch, shown, decoded)]
                grade_records(records, budgets, tok, cfg.grade_timeout)
                if forcing:
                    force_answers(model, tok, records, prompts, budgets, cfg, stop_ids, window)
                    grade_forced(records, budgets, cfg.grade_timeout)
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
        unforced = [r for r in wanted if forcing and any(str(b) not in r.get("correct_forced_at_budget", {})
                                                         for b in budgets)]
        if unforced:  # forcing turned on, or budgets added, since these samples were drawn
            model = model if model is not None else _load(cfg, rank, world_size)
            by_id = {ex.id: ex for ex in problems}
            prompts = [render(tok, student_messages(_prompt(by_id[r["id"]], r["sample_index"], cfg.seed)[0],
                                                    prompt_set)) for r in unforced]
            force_answers(model, tok, unforced, prompts, budgets, cfg, stop_ids, context_window(model))
            grade_forced(unforced, budgets, cfg.grade_timeout)
        if missing or unforced:  # keep the new grades (the records were updated in place)
            _rewrite(samples_path, records)
        summary = {
            "label": label or ("trained" if cfg.adapter else "base"),
            "model": model_label(cfg.model) + (f" + {cfg.adapter}" if cfg.adapter else ""),
            "dataset": dataset_name(cfg.data.source), "split": cfg.data.split,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
            "presence_penalty": cfg.presence_penalty, "frequency_penalty": cfg.frequency_penalty,
            "thinking": thinking,
            "prompt_version": prompt_set.version, "prompt_hash": prompt_set.hash,
            **({"force_tokens": cfg.force_tokens, "forced_answer_version": FORCED_ANSWER_VERSION} if forcing else {}),
            **summarize(wanted, ids, cfg.n, cfg.ks, budgets, seed=cfg.seed, forced=forcing),
        }
        _write_summary(summary_path, summary)
        top = summary["pass_at_k"]
        log.info("%s: %s", out, ", ".join(f"pass@{k}={v['mean']:.3f}" for k, v in top.items()))
    dist.barrier()
    if rank != 0:
        return json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    return summary


def _rewrite(path: Path, records: list[dict]) -> None:
    """Replace a records file in one step (a crash leaves the old file or the new one, whole)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_summary(path: Path, summary: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- other engines

def export_prompts(cfg: EvalConfig, tok: Any, rank: int = 0) -> dict:
    """Write `<out>/prompts.jsonl` and `<out>/export.json` for another engine (vLLM, SGLang).

    One line per distinct prompt: `id`, `sample_indices` (the samples to draw from it: all n of
    a problem, or one for a multiple-choice sample, whose options are shuffled per sample),
    `prompt` (the chat-formatted text, special tokens included) and `prompt_ids` (the exact ids
    dail samples from; give these to the engine, so no second template run can differ).
    export.json holds the sampling settings and stop ids. Returns export.json's content.
    """
    files = eval_files(cfg.out)
    problems = load_problems(cfg.data)
    prompt_set = load_prompts(cfg.prompts)
    thinking = set_thinking(tok, cfg.model.thinking)
    lines = 0
    if rank == 0:
        with open(files["prompts"], "w", encoding="utf-8") as fh:
            for ex in problems:
                groups: dict[tuple[int, ...], list[int]] = {}
                choice = bool(isinstance(ex.meta, dict) and ex.meta.get("choices"))
                for j in range(cfg.n) if choice else [0]:
                    ids = tuple(render(tok, student_messages(_prompt(ex, j, cfg.seed)[0], prompt_set)))
                    groups.setdefault(ids, []).append(j)
                for ids, js in groups.items():
                    indices = js if choice else list(range(cfg.n))
                    fh.write(json.dumps({"id": ex.id, "sample_indices": indices,
                                         "prompt": tok.decode(list(ids), skip_special_tokens=False),
                                         "prompt_ids": list(ids)}) + "\n")
                    lines += 1
    info = {
        "prompts": str(files["prompts"]), "lines": lines, "problems": len(problems), "n": cfg.n,
        "model": model_label(cfg.model), "dataset": dataset_name(cfg.data.source), "split": cfg.data.split,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "presence_penalty": cfg.presence_penalty,
        "frequency_penalty": cfg.frequency_penalty, "max_tokens": cfg.max_new_tokens,
        "stop_token_ids": end_of_turn_ids(tok), "budgets": sorted({int(b) for b in cfg.budgets} | {cfg.max_new_tokens}),
        "thinking": thinking, "prompt_version": prompt_set.version, "prompt_hash": prompt_set.hash,
        # With thinking: where a sample reaches a budget inside its block, continue prompt + its
        # first b token ids + the cue's ids for at most force_tokens tokens, and send the cue plus
        # that text back as forced[b].
        **({"forced_answer_cue": FORCED_ANSWER_CUE,
            "forced_answer_cue_ids": list(tok(FORCED_ANSWER_CUE, add_special_tokens=False)["input_ids"]),
            "think_close_ids": think_close_ids(tok), "force_tokens": cfg.force_tokens,
            "forced_answer_version": FORCED_ANSWER_VERSION} if thinking else {}),
    }
    if rank == 0:
        files["export"].write_text(json.dumps(info, indent=2), encoding="utf-8")
        log.info("%s: %d prompts of %d problems for another engine; settings in %s", files["prompts"], lines,
                 len(problems), files["export"])
    return info


_SAMPLE_FIELDS = "id, sample_index, text; optional n_tokens, token_ids, finish_reason, forced"


def _check_samples_path(cfg: EvalConfig, files: dict[str, Path]) -> None:
    src = Path(cfg.samples)
    if not src.is_file():
        raise DataError(f"config field 'samples': no such file {cfg.samples} (expected a JSONL file of "
                        f"completions: {_SAMPLE_FIELDS})")
    if src.resolve().parent == Path(cfg.out).resolve() and src.name.startswith("samples"):
        raise DataError(f"config field 'samples': {cfg.samples} is where this evaluation writes its own graded "
                        "samples; put the engine's file elsewhere")


def read_samples(path: str | Path, problems: list[Example], budgets: list[int], max_new_tokens: int,
                 seed: int) -> tuple[list[dict], int]:
    """Read and check an external samples file; returns (records ready for grading, n).

    Every line: `id` (a problem of the evaluated set), `sample_index` (0, 1, ...), `text` (the
    completion); optional `n_tokens`, `token_ids` (the completion's ids: budgets then cut them
    exactly, as a native run does; with `n_tokens` alone a sample longer than a budget counts as
    wrong there), `finish_reason`, `forced` ({budget: the cue plus the forced continuation}).
    Every problem needs the same indices 0..c-1; n is the smallest c (more are left out, with a
    warning). Budgets other than the largest need a token count on every line. Nothing is graded
    before the whole file has passed, and an error names the file, the line and the field.
    """
    by_id = {ex.id: ex for ex in problems}
    keys = {str(b) for b in budgets}
    cut = len(budgets) > 1
    records: list[dict] = []
    seen: dict[tuple[str, int], int] = {}
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object with {_SAMPLE_FIELDS}")
            for name, types in (("id", (str, int)), ("sample_index", int), ("text", str)):
                if name not in rec:
                    raise DataError(f"{where}: field '{name}' is missing (each line needs {_SAMPLE_FIELDS})")
                if not isinstance(rec[name], types) or isinstance(rec[name], bool):
                    expected = "an integer" if name == "sample_index" else "a string"
                    raise DataError(f"{where}: field '{name}': expected {expected}, got {rec[name]!r}")
            pid, j = str(rec["id"]), rec["sample_index"]
            if pid not in by_id:
                raise DataError(f"{where}: field 'id': unknown problem id {pid!r} (not among the {len(by_id)} "
                                "problems of data; check data.source, data.split and data.limit)")
            if j < 0:
                raise DataError(f"{where}: field 'sample_index': expected an integer >= 0, got {j}")
            if (pid, j) in seen:
                raise DataError(f"{where}: field 'sample_index': ({pid!r}, {j}) is already on line {seen[pid, j]}")
            seen[pid, j] = line_no
            ids, count = rec.get("token_ids"), rec.get("n_tokens")
            if ids is not None and not (isinstance(ids, list) and all(_is_id(t) for t in ids)):
                raise DataError(f"{where}: field 'token_ids': expected a list of token ids")
            if count is not None and not (_is_id(count)):
                raise DataError(f"{where}: field 'n_tokens': expected an integer >= 0, got {count!r}")
            if ids is not None and count is not None and count != len(ids):
                raise DataError(f"{where}: field 'n_tokens': {count}, but token_ids has {len(ids)} ids")
            count = len(ids) if ids is not None else count
            if count is None and cut:
                raise DataError(f"{where}: field 'n_tokens' (or 'token_ids') is missing: grading at budgets "
                                f"{budgets} needs every sample's length in tokens (or leave budgets empty)")
            if count is not None and count > max_new_tokens:
                raise DataError(f"{where}: field 'n_tokens': {count} tokens, more than max_new_tokens "
                                f"{max_new_tokens} (set max_new_tokens to the engine's max_tokens)")
            forced = rec.get("forced")
            if forced is not None:
                if not isinstance(forced, dict) or not all(isinstance(t, str) for t in forced.values()):
                    raise DataError(f"{where}: field 'forced': expected {{budget: text}}, got {forced!r}")
                extra = sorted(set(map(str, forced)) - keys)
                if extra:
                    raise DataError(f"{where}: field 'forced': budget {extra[0]} is not one of the budgets "
                                    f"{budgets}")
            finish = rec.get("finish_reason")
            if finish is not None and not isinstance(finish, str):
                raise DataError(f"{where}: field 'finish_reason': expected a string, got {finish!r}")
            _, gold, kind = _prompt(by_id[pid], j, seed)
            record = {"id": pid, "sample_index": j, "kind": kind, "gold": gold, "text": rec["text"],
                      "n_tokens": count, "finish_reason": finish or "unknown", "source_line": line_no}
            if ids is not None:
                record["token_ids"] = ids
            if forced is not None:
                record["forced_at_budget"] = {str(b): forced[str(b)] for b in budgets if str(b) in forced}
            records.append(record)
    if not records:
        raise DataError(f"{path}: no samples (the file is empty)")
    per: dict[str, list[int]] = {}
    for pid, j in seen:
        per.setdefault(pid, []).append(j)
    for ex in problems:
        js = sorted(per.get(ex.id, []))
        if js != list(range(len(js))):
            gap = next(i for i, j in enumerate(js + [None]) if i != j)
            raise DataError(f"{path}: field 'sample_index': problem {ex.id!r} has indices {js[:3]}..., but sample "
                            f"{gap} is missing (each problem needs indices 0, 1, ..., c-1)")
    n = min(len(per.get(ex.id, [])) for ex in problems)
    if len({len(js) for js in per.values()}) > 1 or len(per) < len(problems):
        log.warning("%s: problems have %d to %d samples; the summary uses the first %d of each", path, n,
                    max(len(js) for js in per.values()), n)
    return records, n


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def evaluate_samples(cfg: EvalConfig, tokenizer: Any = None, label: str | None = None, rank: int = 0) -> dict:
    """Grade `cfg.samples` (another engine's completions) and write the summary a native run would.

    Grades are appended to <out>/samples.jsonl in chunks, so an interrupted run resumes. The
    tokenizer (cfg.model) is loaded only when lines carry token_ids, to cut them at budgets.
    """
    files = eval_files(cfg.out)
    problems = load_problems(cfg.data)
    budgets = sorted({int(b) for b in cfg.budgets} | {cfg.max_new_tokens})
    records, n = read_samples(cfg.samples, problems, budgets, cfg.max_new_tokens, cfg.seed)
    by_count = {pid: c for pid, c in Counter(r["id"] for r in records).items()}
    fewest = min(problems, key=lambda ex: by_count.get(ex.id, 0))
    if n < max(cfg.ks):
        last = max((r["source_line"] for r in records if r["id"] == fewest.id), default=None)
        raise DataError(f"{cfg.samples}{f' line {last}' if last else ''}: field 'sample_index': problem "
                        f"{fewest.id!r} has {by_count.get(fewest.id, 0)} samples, fewer than the largest k "
                        f"({max(cfg.ks)}) in ks {cfg.ks}")
    forced = any("forced_at_budget" in r for r in records)
    if rank != 0:
        return {}
    tok = tokenizer
    if tok is None and any("token_ids" in r for r in records):
        tok = load_tokenizer(cfg.model)
    done = {(r["id"], r["sample_index"]) for r in read_records(files["samples"])}
    todo = [r for r in records if (r["id"], r["sample_index"]) not in done and r["sample_index"] < n]
    with open(files["samples"], "a", encoding="utf-8") as fh:
        for start in tqdm(range(0, len(todo), 256), desc=f"grade {Path(cfg.samples).name}", unit="chunk"):
            chunk = todo[start:start + 256]
            for r in chunk:  # without ids, a sample longer than a budget had not finished there
                if "token_ids" not in r and r["n_tokens"] is not None:
                    r["correct_at_budget"] = {str(b): False for b in budgets if b < r["n_tokens"]}
            grade_records(chunk, budgets, tok, cfg.grade_timeout)
            if forced:
                grade_forced(chunk, budgets, cfg.grade_timeout)
            for r in chunk:
                append_record(fh, r)
    order = {ex.id: i for i, ex in enumerate(problems)}
    graded = sorted((r for r in read_records(files["samples"]) if r["id"] in order and r["sample_index"] < n),
                    key=lambda r: (order[r["id"]], r["sample_index"]))
    rules = Counter("cut" if "token_ids" in r else "finished" if r["n_tokens"] is not None else "none"
                    for r in graded)
    summary = {
        "label": label or "external",
        "model": model_label(cfg.model), "samples_file": str(cfg.samples),
        "dataset": dataset_name(cfg.data.source), "split": cfg.data.split,
        "max_new_tokens": cfg.max_new_tokens,
        # the prompts `--export-prompts` writes under this config (another engine's samples carry no hash)
        "prompt_version": load_prompts(cfg.prompts).version, "prompt_hash": load_prompts(cfg.prompts).hash,
        # how budgets were applied: cut (token_ids, as a native run), finished (n_tokens only: wrong
        # past the budget), none (no token counts: every sample taken to fit)
        "budget_rule": dict(rules),
        **summarize(graded, [ex.id for ex in problems], n, cfg.ks, budgets, seed=cfg.seed, forced=forced),
    }
    _write_summary(files["summary"], summary)
    log.info("%s: %s", cfg.out, ", ".join(f"pass@{k}={v['mean']:.3f}" for k, v in summary["pass_at_k"].items()))
    return summary
