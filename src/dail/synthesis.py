"""Stage 1: rewrite expert solutions into trajectories in the model's own distribution.

`synthesize(cfg)` turns an expert set into the synthetic set (docs/design.md "Stage 1"):
- mixed mode: the student (model on the problem) writes, the teacher (same weights on
  problem + expert solution) vetoes tokens it finds unlikely (`dail.decoding.decode`, one
  fused forward over 2B rows per token);
- direct mode: the teacher alone writes, with a prompt asking for a self-contained solution.

Output is a JSONL file, appended and flushed per record. A rerun skips every (id,
sample_index) already written and repairs a torn last line, so `kill -9` followed by a rerun
yields every record exactly once. Under `accelerate launch` each rank takes a disjoint share
of the problems, writes its own shard, and rank 0 merges (`dail.dist`).

Where an answer exists every trajectory is graded and the grade recorded; with
`keep=correct` the wrong ones go to `<out>.rejected.jsonl` instead of the training set.
Problems whose context plus `max_new_tokens` exceeds the model's window are skipped and
listed in `<out>.skipped.jsonl` with the reason.

Statistics (stats.json, student_fraction.png next to the output): student-token fraction,
teacher interventions per 100 tokens (an intervention is a maximal run of teacher tokens),
lengths, finish reasons, grades and throughput.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from dail import dist
from dail.config import SynthConfig, check_resumable, save
from dail.data import Example, load_examples
from dail.records import append_record, merge_shards, read_records
from dail.decoding import decode, generator_for, sample_seed
from dail.grading import grade_many
from dail.landmarks import extract_landmarks
from dail.layout import synth_files
from dail.lock import output_lock
from dail.models import context_window, load_model, load_tokenizer, model_label
from dail.prompts import (PROMPT_VERSION, direct_messages, end_of_turn_ids, render, student_messages,
                          teacher_messages)

log = logging.getLogger(__name__)


def _key(record: dict) -> tuple[str, int]:
    return (str(record["id"]), int(record["sample_index"]))


def _landmarks(ex: Example, kind: str) -> tuple[list[str], str]:
    """The negative reference's landmarks and where they came from: the expert record's own list
    wins over the extractor (kind 'expert'), else `kind` extracts them from the solution."""
    return (ex.landmarks, "expert") if ex.landmarks is not None else (extract_landmarks(ex.solution, kind), kind)


def synthesize(cfg: SynthConfig, model: Any = None, tokenizer: Any = None,
               examples: list[Example] | None = None) -> Path:
    """Write the synthetic set for `cfg` (resuming what is already there); returns its path."""
    rank, _ = dist.world()
    with output_lock(synth_files(cfg.out)["lock"], f"{cfg.out}: synthesis", rank):
        return _synthesize(cfg, model, tokenizer, examples)


def _synthesize(cfg: SynthConfig, model: Any, tokenizer: Any, examples: list[Example] | None) -> Path:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = synth_files(out)
    rank, world = dist.world()
    if any(p.exists() and p.stat().st_size for p in (out, paths["rejected"], paths["skipped"])):
        check_resumable(paths["config"], cfg, "trajectories")
    if rank == 0:
        save(cfg, paths["config"])
    examples = examples if examples is not None else load_examples(cfg.data)  # bad data fails fast
    own = sum(ex.landmarks is not None for ex in examples)
    if own:
        log.info("landmarks: %d of %d expert records carry their own list, which wins over the '%s' "
                 "extractor; the other %d are extracted", own, len(examples), cfg.landmarks, len(examples) - own)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    model = model if model is not None else load_model(cfg.model)
    label = model_label(cfg.model)

    # Resume: everything already written, merged or in this rank's shard, is done.
    my_paths = {name: dist.shard_path(paths[name], rank, world) for name in ("out", "rejected", "skipped")}
    done = set()
    for name in ("out", "rejected", "skipped"):
        for p in {paths[name], my_paths[name]}:
            done |= {_key(r) for r in read_records(p)}

    mine = dist.shard(examples, rank, world)
    stop_ids = end_of_turn_ids(tokenizer)
    window = context_window(model)
    work: list[tuple[Example, int, list[int], list[int] | None]] = []
    handles = {name: open(p, "a", encoding="utf-8") for name, p in my_paths.items()}
    try:
        for ex in mine:
            todo = [i for i in range(cfg.samples_per_problem) if (ex.id, i) not in done]
            if not todo:
                continue
            if cfg.mode == "mixed":
                writer_prompt = render(tokenizer, student_messages(ex.problem))
                teacher_prompt = render(tokenizer, teacher_messages(ex.problem, ex.solution))
            else:
                writer_prompt, teacher_prompt = render(tokenizer, direct_messages(ex.problem, ex.solution)), None
            longest = max(len(writer_prompt), len(teacher_prompt or []))
            if longest + cfg.max_new_tokens > window:
                for i in todo:
                    append_record(handles["skipped"], {
                        "id": ex.id, "sample_index": i, "reason":
                        f"context of {longest} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the "
                        f"model window of {window}"})
                continue
            work += [(ex, i, writer_prompt, teacher_prompt) for i in todo]

        bar = tqdm(total=len(work), desc=f"synth ({cfg.mode}, tau={cfg.tau})", unit="traj",
                   disable=rank != 0 and world > 1)
        t_decode, n_tokens = 0.0, 0
        for start in range(0, len(work), cfg.batch_size):
            batch = work[start:start + cfg.batch_size]
            t0 = time.perf_counter()
            decoded = decode(
                model, [w[2] for w in batch],
                teacher_prompts=[w[3] for w in batch] if cfg.mode == "mixed" else None,
                tau=cfg.tau, writer="student" if cfg.mode == "mixed" else "teacher",
                generators=[generator_for(cfg.seed, ex.id, i) for ex, i, _, _ in batch],
                max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id,
                temperature=cfg.temperature, top_p=cfg.top_p)
            t_decode += time.perf_counter() - t0
            texts = [tokenizer.decode(d.tokens, skip_special_tokens=True) for d in decoded]
            grades = _grade(texts, [ex.answer for ex, *_ in batch], cfg.grade_timeout)
            for (ex, i, _, _), d, text, correct in zip(batch, decoded, texts, grades):
                n_tokens += len(d.tokens)
                marks, marks_kind = _landmarks(ex, cfg.landmarks)
                record = ex.to_dict() | {
                    "landmarks": marks, "landmarks_kind": marks_kind,
                    "trajectory": text, "trajectory_ids": d.tokens, "teacher_mask": d.teacher_mask,
                    "p_student": d.p_student, "p_teacher": d.p_teacher, "q": d.q,
                    "finish_reason": d.finish_reason, "mode": cfg.mode, "tau": cfg.tau,
                    "temperature": cfg.temperature, "top_p": cfg.top_p,
                    "seed": sample_seed(cfg.seed, ex.id, i), "sample_index": i, "model": label,
                    "prompt_version": PROMPT_VERSION, "correct": correct,
                }
                target = "rejected" if cfg.keep == "correct" and correct is False else "out"
                append_record(handles[target], record)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tokens / max(t_decode, 1e-9):.1f}")
        bar.close()
    finally:
        for fh in handles.values():
            fh.close()

    throughput = {"rank": rank, "tokens": n_tokens, "decode_seconds": t_decode}
    _write_throughput(out, rank, world, throughput)
    dist.barrier()
    if rank == 0:
        for name in ("out", "rejected", "skipped"):
            merge_shards(paths[name], world, key=_key)
        kept, rejected = read_records(out), read_records(paths["rejected"])
        fractions = student_fractions(kept + rejected)
        stats = compute_stats(kept, rejected, len(read_records(paths["skipped"])), fractions, out, cfg)
        paths["stats"].write_text(json.dumps(stats, indent=2), encoding="utf-8")
        plot_student_fraction(fractions, paths["histogram"], cfg)
        for p in out.parent.glob("throughput.rank*.json"):
            p.unlink()
        log.info("synthetic set: %s (%s)", out, _summary_line(stats))
    dist.barrier()
    return out


def _grade(texts: list[str], answers: list[str | None], timeout: float) -> list[bool | None]:
    """Grade trajectories that have a gold answer (None where there is none)."""
    idx = [i for i, a in enumerate(answers) if a]
    grades: list[bool | None] = [None] * len(texts)
    if idx:
        for i, g in zip(idx, grade_many([texts[i] for i in idx], [answers[i] for i in idx], timeout=timeout)):
            grades[i] = bool(g)
    return grades


def _write_throughput(out: Path, rank: int, world: int, data: dict) -> None:
    out.with_name(f"throughput.rank{rank}.json").write_text(json.dumps(data), encoding="utf-8")


def _read_throughput(out: Path) -> dict:
    tokens, seconds = 0, 0.0
    for p in out.parent.glob("throughput.rank*.json"):
        d = json.loads(p.read_text(encoding="utf-8"))
        tokens += d["tokens"]
        seconds = max(seconds, d["decode_seconds"])  # ranks run in parallel
    return {"tokens_this_run": tokens, "decode_seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 2) if seconds else None}


def _runs(mask: list[int]) -> int:
    """Number of maximal runs of 1s (teacher interventions)."""
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


def student_fractions(records: list[dict]) -> dict[str, float]:
    """Per problem: the fraction of its trajectory tokens the student wrote (all samples pooled)."""
    masks: dict[str, list[int]] = {}
    for r in records:
        masks.setdefault(r["id"], []).extend(r["teacher_mask"])
    return {pid: 1 - sum(m) / len(m) for pid, m in masks.items() if m}


def compute_stats(kept: list[dict], rejected: list[dict], skipped: int, fractions: dict[str, float],
                  out: Path, cfg: SynthConfig) -> dict:
    """Statistics of every trajectory written, kept in the training set or rejected by `keep`."""
    records = kept + rejected
    n_tok = sum(len(r["teacher_mask"]) for r in records)
    n_teacher = sum(sum(r["teacher_mask"]) for r in records)
    graded = [r["correct"] for r in records if r.get("correct") is not None]
    lengths = sorted(len(r["trajectory_ids"]) for r in records)
    return {
        "mode": cfg.mode, "tau": cfg.tau, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "trajectories": len(records), "kept": len(kept), "rejected": len(rejected), "skipped": skipped,
        "problems": len(fractions),
        "student_token_fraction": round(1 - n_teacher / n_tok, 4) if n_tok else None,
        "teacher_interventions_per_100_tokens":
            round(100 * sum(_runs(r["teacher_mask"]) for r in records) / n_tok, 3) if n_tok else None,
        "mean_student_fraction_per_problem":
            round(sum(fractions.values()) / len(fractions), 4) if fractions else None,
        "mean_length": round(n_tok / len(records), 1) if records else None,
        "median_length": lengths[len(lengths) // 2] if lengths else None,
        "finish_reasons": dict(Counter(r["finish_reason"] for r in records)),
        "graded": len(graded), "correct": sum(graded),
        "correct_fraction": round(sum(graded) / len(graded), 4) if graded else None,
        **_read_throughput(out),
        "prompt_version": PROMPT_VERSION,
    }


def _summary_line(stats: dict) -> str:
    return (f"{stats['trajectories']} trajectories, student tokens {stats['student_token_fraction']}, "
            f"{stats['teacher_interventions_per_100_tokens']} interventions/100 tok, "
            f"correct {stats['correct']}/{stats['graded']}, {stats['tokens_per_second']} tok/s")


def plot_student_fraction(fractions: dict[str, float], png: Path, cfg: SynthConfig) -> None:
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    ax.hist(list(fractions.values()), bins=[i / 20 for i in range(21)], color="tab:blue", edgecolor="white",
            label=f"{len(fractions)} problems")
    ax.set_xlim(0, 1)
    ax.set_xlabel("student-token fraction per problem")
    ax.set_ylabel("problems")
    ax.set_title(f"Synthesis ({cfg.mode}, tau={cfg.tau}): {model_label(cfg.model)[:60]}\n"
                 f"data: {cfg.data.source} ({cfg.data.split})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
