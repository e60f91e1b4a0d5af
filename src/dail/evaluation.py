"""Evaluation: n samples per problem, graded, summarized as pass@k by k and by token budget.

`evaluate(cfg)` (docs/design.md "Evaluation"):
- draws `cfg.n` samples per problem through the sampler seam (`dail.sampler`: plain sampling on
  the student prompt, stop at end-of-turn). Each (problem, sample) has its own generator, seeded from
  (run seed, id, sample index), so results do not depend on batching, order or sharding. All
  n samples of a problem go into one batch where they fit, so the prompt is prefilled once;
- grades each sample at every token budget and summarizes the grades (`dail.scoring`; pass@k
  and its bootstrap CI in `dail.stats`);
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

Bring your own samples: `samples=FILE.jsonl` grades another engine's completions instead of
sampling, and `export_prompts` writes the prompts such an engine needs (`dail.exchange`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dail import dist
from dail.config import EvalConfig, check_resumable, save
from dail.data import DataError, Example, load_problems
from dail.exchange import check_samples_path, evaluate_samples, export_prompts, read_samples
from dail.layout import eval_files
from dail.lock import output_lock
from dail.models import check_adapter, check_source, load_tokenizer, model_label
from dail.prompts import FORCED_ANSWER_CUE, FORCED_ANSWER_VERSION, load_prompts, set_thinking, think_close_ids
from dail.records import append_record, merge_shards, read_records, write_records
from dail.sampler import Sampler, Sampling, open_sampler, release, sample_seed, with_dtype
from dail.scoring import (budgets_of, dataset_name, grade_forced, grade_records, sample_prompt, sample_text,
                          samples_written, shown_problem, summarize, write_summary)
from dail.stats import BOOTSTRAP_RESAMPLES, bootstrap_ci, ks_for, pass_at_k

log = logging.getLogger(__name__)

# The scoring and statistics this module's results are made of stay importable from here.
__all__ = ["evaluate", "finished", "force_answers", "pass_at_k", "bootstrap_ci", "ks_for", "summarize",
           "grade_records", "grade_forced", "read_samples", "evaluate_samples", "export_prompts",
           "BOOTSTRAP_RESAMPLES"]


# ----------------------------------------------------------------------------- forced answers

def _cut_in_thinking(r: dict, b: int, close: set[int]) -> bool:
    """Whether sample `r` reached budget b (it has more tokens, or was stopped by the length cap
    at exactly b) with its thinking block still open (no closing-tag token among the first b)."""
    ids = r["token_ids"]
    reached = len(ids) > b or (len(ids) == b and r["finish_reason"] == "length")
    return reached and close.isdisjoint(ids[:b])


def force_answers(sampler: Sampler, records: list[dict], prompts: list[list[int]], budgets: list[int],
                  cfg: EvalConfig) -> None:
    """Fill `forced_at_budget` (budgets not yet there): the cue plus the forced continuation
    where the sample was cut inside its thinking block, None elsewhere.

    `prompts[i]` is the prompt `records[i]` was sampled from. Every forced (sample, budget)
    continues `prompt + ids[:b] + cue` for at most `cfg.force_tokens` tokens; all of them are
    decoded together in batches of `cfg.batch_size`, shortest first (less padding), each row with
    its own seed (run seed, id + budget, sample index), so batching does not change them.
    """
    tok, window = sampler.tokenizer, sampler.window
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
        decoded = sampler.sample([p for _, _, p in chunk],
                                 [sample_seed(cfg.seed, f"{r['id']}\x00forced@{b}", r["sample_index"])
                                  for r, b, _ in chunk], Sampling.of(cfg, max_new_tokens=room))
        for (r, b, _), d in zip(chunk, decoded):
            r["forced_at_budget"][str(b)] = FORCED_ANSWER_CUE + sample_text(tok, d.tokens)


# ----------------------------------------------------------------------------- sampling

def _dtype_of(sampler: Any) -> str:
    """The weights' dtype of a Sampler or of a model passed in its place ("float32", "bfloat16")."""
    if isinstance(sampler, Sampler):
        return sampler.dtype
    return str(next(sampler.parameters()).dtype).removeprefix("torch.")


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


def finished(cfg: EvalConfig) -> bool:
    """Whether `evaluate(cfg)` would find nothing left to do: a summary is written and every
    (problem, sample index) of cfg is among the samples. Raises ConfigError, as evaluate would,
    where the folder holds samples made under other settings (`check_resumable`)."""
    files = eval_files(cfg.out)
    if not files["summary"].exists():
        return False
    check_resumable(files["config"], cfg, "samples")
    done = samples_written(files["samples"])
    return all((ex.id, j) in done for ex in load_problems(cfg.data) for j in range(cfg.n))


def evaluate(cfg: EvalConfig, sampler: Any = None, tokenizer: Any = None, label: str | None = None,
             rank: int | None = None, world_size: int | None = None) -> dict:
    """Sample, grade and summarize; returns the summary (also written to <out>/summary.json).

    `sampler` (a `dail.sampler.Sampler`, or a model already carrying any adapter, which the
    engine of cfg.model wraps) and `tokenizer` may be passed in; otherwise `open_sampler` opens
    cfg.model (+ cfg.adapter) when there is something to sample. `rank`/`world_size` default to the
    `accelerate launch` ones; on ranks other than 0 the summary is read back after rank 0 wrote it.
    """
    if rank is None or world_size is None:
        rank, world_size = dist.world()
    if cfg.adapter:
        check_adapter(cfg.adapter)
    check_source(cfg.model)
    opened: list[Any] = []  # a sampler _evaluate opened itself: released here (a vLLM engine holds its KV cache)
    try:
        with output_lock(eval_files(cfg.out)["lock"], f"{cfg.out}: evaluation", rank):
            return _evaluate(cfg, sampler, tokenizer, label, rank, world_size, opened)
    finally:
        for s in opened:
            if s is not sampler:
                release(s)


def _evaluate(cfg: EvalConfig, sampler: Any, tokenizer: Any, label: str | None, rank: int, world_size: int,
              opened: list[Any]) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = eval_files(out)
    samples_path = files["samples"]
    if cfg.samples:
        check_samples_path(cfg, files)
    if any(out.glob("samples*.jsonl")):
        check_resumable(files["config"], cfg, "samples")
    if rank == 0:
        save(cfg, files["config"])
    if cfg.samples:
        return evaluate_samples(cfg, tokenizer, label, rank)
    if isinstance(sampler, Sampler) and tokenizer is None:
        tokenizer = sampler.tokenizer
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    thinking = set_thinking(tok, cfg.model.thinking)
    forcing = cfg.force_answer and thinking
    if cfg.export_prompts:
        return export_prompts(cfg, tok, rank)
    budgets = budgets_of(cfg)
    problems = load_problems(cfg.data)
    prompt_set = load_prompts(cfg.prompts)
    mine = dist.shard(problems, rank, world_size)
    shard_file = dist.shard_path(samples_path, rank, world_size)
    done = samples_written(shard_file)
    if world_size > 1:  # records merged by an earlier run
        done |= samples_written(samples_path)
    todo = [(ex, j) for ex in mine for j in range(cfg.n) if (ex.id, j) not in done]
    sampling = Sampling.of(cfg)

    model_cfg = with_dtype(cfg.model, cfg.dtype)
    if cfg.dtype not in ("", "auto") and sampler is not None and _dtype_of(sampler) != cfg.dtype:
        sampler = None  # sampled in eval.dtype, not in the precision of the sampler (or model) passed in
    if todo:
        sampler = open_sampler(model_cfg, cfg.adapter, model=sampler, tokenizer=tok)
        opened.append(sampler)
        t0, n_tok = time.perf_counter(), 0
        bar = tqdm(total=len(todo), desc=f"eval {out.name}", unit="sample", disable=rank != 0)
        with open(shard_file, "a", encoding="utf-8") as fh:
            for batch in _batches(todo, cfg.batch_size):
                shown = [shown_problem(ex, j, cfg.seed) for ex, j in batch]
                prompts = [sample_prompt(tok, ex, j, cfg.seed, cfg.context, prompt_set) for ex, j in batch]
                budget = _capped(cfg.max_new_tokens, prompts, batch, sampler.window)
                decoded = sampler.sample(prompts, [sample_seed(cfg.seed, ex.id, j) for ex, j in batch],
                                         sampling.with_budget(budget), **({"entropy": True} if cfg.entropy else {}))
                records = [{"id": ex.id, "sample_index": j, "kind": kind, "gold": gold,
                            "text": sample_text(tok, d.tokens), "n_tokens": len(d.tokens),
                            "finish_reason": d.finish_reason, "token_ids": d.tokens, "thinking": thinking,
                            "engine": sampler.engine,
                            "prompt_hash": prompt_set.hash,
                            **({"entropy": sum(d.entropy) / max(len(d.entropy), 1)} if cfg.entropy else {})}
                           for (ex, j), (_, gold, kind), d in zip(batch, shown, decoded)]
                grade_records(records, budgets, tok, cfg.grade_timeout)
                if forcing:
                    force_answers(sampler, records, prompts, budgets, cfg)
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
            sampler = open_sampler(model_cfg, cfg.adapter, model=sampler, tokenizer=tok)
            opened.append(sampler)
            by_id = {ex.id: ex for ex in problems}
            prompts = [sample_prompt(tok, by_id[r["id"]], r["sample_index"], cfg.seed, cfg.context, prompt_set)
                       for r in unforced]
            force_answers(sampler, unforced, prompts, budgets, cfg)
            grade_forced(unforced, budgets, cfg.grade_timeout)
        if missing or unforced:  # keep the new grades (the records were updated in place)
            write_records(samples_path, records)
        summary = {
            "label": label or ("trained" if cfg.adapter else "base"),
            "model": model_label(cfg.model) + (f" + {cfg.adapter}" if cfg.adapter else ""),
            "dataset": dataset_name(cfg.data.source), "split": cfg.data.split,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
            "presence_penalty": cfg.presence_penalty, "frequency_penalty": cfg.frequency_penalty,
            "thinking": thinking, "context": cfg.context, "dtype": cfg.dtype or cfg.model.dtype,
            "prompt_version": prompt_set.version, "prompt_hash": prompt_set.hash,
            **({"force_tokens": cfg.force_tokens, "forced_answer_version": FORCED_ANSWER_VERSION} if forcing else {}),
            **summarize(wanted, ids, cfg.n, cfg.ks, budgets, seed=cfg.seed, forced=forcing),
        }
        write_summary(summary_path, summary)
        top = summary["pass_at_k"]
        log.info("%s: %s", out, ", ".join(f"pass@{k}={v['mean']:.3f}" for k, v in top.items()))
    dist.barrier()
    if rank != 0:
        return json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    return summary
