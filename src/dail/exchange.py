"""The exchange with other engines (vLLM, SGLang): export the prompts, grade their samples.

`export_prompts(cfg, tok)` writes the exact prompts dail samples from, as text and ids, with
the sampling settings and stop ids. `evaluate_samples(cfg)` (`dail eval --samples FILE.jsonl`)
skips sampling: each line of FILE gives one (problem id, sample index) completion (schema in
the README), checked whole by `read_samples` before anything is graded, and the same grading
and summary as a native run follow (`dail.scoring`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dail.config import EvalConfig
from dail.data import DataError, Example, load_problems
from dail.layout import eval_files
from dail.models import load_tokenizer, loadable_model, model_label
from dail.prompts import (FORCED_ANSWER_CUE, FORCED_ANSWER_VERSION, end_of_turn_ids, load_prompts, set_thinking,
                          think_close_ids)
from dail.records import append_record, read_jsonl, read_records
from dail.scoring import (budgets_of, dataset_name, grade_forced, grade_records, sample_prompt, samples_written,
                          shown_problem, summarize, write_summary)

log = logging.getLogger(__name__)

__all__ = ["export_prompts", "read_samples", "evaluate_samples", "check_samples_path"]


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
                    ids = tuple(sample_prompt(tok, ex, j, cfg.seed, cfg.context, prompt_set))
                    groups.setdefault(ids, []).append(j)
                for ids, js in groups.items():
                    indices = js if choice else list(range(cfg.n))
                    fh.write(json.dumps({"id": ex.id, "sample_indices": indices,
                                         "prompt": tok.decode(list(ids), skip_special_tokens=False),
                                         "prompt_ids": list(ids)}) + "\n")
                    lines += 1
    info = {
        "prompts": str(files["prompts"]), "lines": lines, "problems": len(problems), "n": cfg.n,
        # `model`: what an engine can load (the embedded model's de-quantized folder, a hub id or
        # a local folder); `model_label`: the name records and summaries use.
        "model": loadable_model(cfg.model), "model_label": model_label(cfg.model), "adapter": cfg.adapter or None,
        "dataset": dataset_name(cfg.data.source), "split": cfg.data.split,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "presence_penalty": cfg.presence_penalty,
        "frequency_penalty": cfg.frequency_penalty, "max_tokens": cfg.max_new_tokens,
        "stop_token_ids": end_of_turn_ids(tok), "budgets": budgets_of(cfg),
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

def check_samples_path(cfg: EvalConfig, files: dict[str, Path]) -> None:
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
    for line_no, rec in read_jsonl(path):
        where = f"{path}:{line_no}"
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
        _, gold, kind = shown_problem(by_id[pid], j, seed)
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
    budgets = budgets_of(cfg)
    records, n = read_samples(cfg.samples, problems, budgets, cfg.max_new_tokens, cfg.seed)
    by_count = {pid: c for pid, c in Counter(r["id"] for r in records).items()}
    fewest = min(problems, key=lambda ex: by_count.get(ex.id, 0))
    if n < max(cfg.ks):
        last = max((r["source_line"] for r in records if r["id"] == fewest.id), default=None)
        raise DataError(f"{cfg.samples}{f':{last}' if last else ''}: field 'sample_index': problem "
                        f"{fewest.id!r} has {by_count.get(fewest.id, 0)} samples, fewer than the largest k "
                        f"({max(cfg.ks)}) in ks {cfg.ks}")
    forced = any("forced_at_budget" in r for r in records)
    if rank != 0:
        return {}
    tok = tokenizer
    if tok is None and any("token_ids" in r for r in records):
        tok = load_tokenizer(cfg.model)
    done = samples_written(files["samples"])
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
    write_summary(files["summary"], summary)
    log.info("%s: %s", cfg.out, ", ".join(f"pass@{k}={v['mean']:.3f}" for k, v in summary["pass_at_k"].items()))
    return summary
