"""Stage 1: rewrite expert solutions into trajectories in the model's own distribution.

`synthesize(cfg)` turns an expert set into the synthetic set (docs/design.md "Stage 1"):
- mixed mode: the student (model on the problem) writes, the teacher (same weights on
  problem + expert solution) vetoes tokens it finds unlikely (`Sampler.mixed`; on the HF engine
  one fused forward over 2B rows per token);
- direct mode: the teacher alone writes, with a prompt asking for a self-contained solution;
- star mode: STaR with rationalization (Zelikman et al., 2022), below.

STaR. Every problem first gets `samples_per_problem` attempts from the model alone on the
plain problem (plain sampling, path `self`). A problem with no correct attempt then gets
`rationalization_samples` attempts from the model given the problem and the correct answer as
a hint (`prompts.rationalization_messages`, path `rationalized`), numbered from sample index
`SynthConfig.STAR_RATIONALIZED_FROM` on. Only correct samples enter the synthetic set, all of
them (as the paper keeps every correct rationale); the rest go to `.rejected.jsonl`. Records
carry `star_path`, and rationalized ones `rationalization_prompt_version`. A record stores the
plain problem, never the hint: training rebuilds the student context from `problem`, so a
rationale is learned as problem -> rationale, as in the paper. Its `trajectory_ids` are the
tokens as generated after the hinted context (the same ids follow the plain context, since
every context ends in the same assistant header). `teacher_mask` is all 0 on the self path
and all 1 on the rationalized path: the hinted model plays the teacher's part (a context with
privileged information), as in direct mode, so the student-token fraction in stats.json is the
share of tokens from self attempts. On both paths `p_student`, `p_teacher` and `q` are the
writing model's own (sampling, temperature-1 and behaviour probability). Where we differ from
the paper: its outer loop is not automated. One iteration is `dail synth --mode star` then
`dail train --loss nll`; the next synthesizes with the trained model (`train.merge` writes it
as a plain checkpoint) and trains the base model again on the new set, as the paper restarts
from the original model each iteration. There is no few-shot prompt: the chat template and
the instruction stand in for it.

Output is a JSONL file, appended and flushed per record. A rerun skips every (id,
sample_index) already written and repairs a torn last line, so `kill -9` followed by a rerun
yields every record exactly once. Under `accelerate launch` each rank takes a disjoint share
of the problems, writes its own shard, and rank 0 merges (`dail.dist`).

Where an answer exists every trajectory is graded and the grade recorded; with
`keep=correct` the wrong ones go to `<out>.rejected.jsonl` instead of the training set.
A problem without an answer (a proof, or any problem nobody can check) is not graded: its
records say `correct: null` and are always kept, whatever `keep` says; training reads them
like any other.

Over-long expert solutions. Where the context that holds the solution (the teacher's, or
direct mode's) plus `max_new_tokens` exceeds the model's window, `long_solutions=shorten`
(default) cuts the solution to fit (`shorten_solution`: at the last "Solution N:" heading
that fits, as the authors do, else at a section or paragraph break, else by halving, their
fallback). The record then carries the cut solution, from which its landmarks come and
training builds the teacher's context, and `shortened` = {at, kept_chars, full_chars,
full_solution}; the count is logged and goes into stats.json. What cannot fit even so (the
student's context alone is too long, or `long_solutions=skip`) is listed in
`<out>.skipped.jsonl` with the reason.

Trajectories per problem. `per_problem` reshapes the kept set after decoding
(`apply_per_problem`): all (default), the first correct one (the authors keep one per
problem), or a seeded random k. The records left out move to `<out>.unselected.jsonl`, so a
rerun with another setting reshapes the same trajectories without decoding again; that is why
it is applied to the files rather than while writing, and why it is not a resume key.

Statistics (stats.json, student_fraction.png next to the output): student-token fraction,
teacher interventions per 100 tokens (an intervention is a maximal run of teacher tokens),
lengths, finish reasons, grades and throughput.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from dail import dist
from dail.config import SynthConfig, check_resumable, save
from dail.data import DataError, Example, load_examples
from dail.records import append_record, merge_shards, read_records, write_records
from dail.sampler import Sampler, Sampling, open_sampler, release, sample_seed
from dail.grading import grade_many
from dail.landmarks import extract_landmarks
from dail.layout import synth_files
from dail.lock import output_lock
from dail.models import load_tokenizer, model_label
from dail.prompts import (RATIONALIZATION_PROMPT_VERSION, answer_only_messages, direct_messages, load_prompts,
                          rationalization_messages, render, set_thinking, student_messages, teacher_messages,
                          think_close_ids, thinking_on)

log = logging.getLogger(__name__)


def _key(record: dict) -> tuple[str, int]:
    return (str(record["id"]), int(record["sample_index"]))


def _landmarks(ex: Example, kind: str) -> tuple[list[str], str]:
    """The negative reference's landmarks and where they came from: the expert record's own list
    wins over the extractor (kind 'expert'), else `kind` extracts them from the solution."""
    return (ex.landmarks, "expert") if ex.landmarks is not None else (extract_landmarks(ex.solution, kind), kind)


def synthesize(cfg: SynthConfig, sampler: Any = None, tokenizer: Any = None,
               examples: list[Example] | None = None) -> Path:
    """Write the synthetic set for `cfg` (resuming what is already there); returns its path.

    `sampler`: a `dail.sampler.Sampler`, or a model already loaded, which the engine of
    cfg.model wraps; otherwise `open_sampler` opens cfg.model."""
    rank, _ = dist.world()
    with output_lock(synth_files(cfg.out)["lock"], f"{cfg.out}: synthesis", rank):
        return _synthesize(cfg, sampler, tokenizer, examples)


def _synthesize(cfg: SynthConfig, sampler: Any, tokenizer: Any, examples: list[Example] | None) -> Path:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = synth_files(out)
    rank, world = dist.world()
    if any(p.exists() and p.stat().st_size for p in (out, paths["rejected"], paths["skipped"], paths["unselected"])):
        check_resumable(paths["config"], cfg, "trajectories")
    if rank == 0:
        save(cfg, paths["config"])
    examples = examples if examples is not None else load_examples(cfg.data)  # bad data fails fast
    _check_examples(cfg, examples)  # before any model loads

    if isinstance(sampler, Sampler) and tokenizer is None:
        tokenizer = sampler.tokenizer
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    set_thinking(tokenizer, cfg.model.thinking)  # every context below opens the thinking block, or none does
    given, sampler = sampler, open_sampler(cfg.model, model=sampler, tokenizer=tokenizer)

    done, solved, settled = _done(paths, rank, world)
    settled = settled if cfg.round_size else set()  # only rounds stop at a problem's first correct trajectory
    mine = dist.shard(examples, rank, world)  # by problem: STaR's second path needs the first's grades
    my_paths = {name: dist.shard_path(paths[name], rank, world) for name in ("out", "rejected", "skipped")}
    handles = {name: open(p, "a", encoding="utf-8") for name, p in my_paths.items()}
    run = _Runner(cfg, sampler, model_label(cfg.model), handles, show=rank == 0 or world == 1)
    try:
        for indices in _rounds(cfg):
            written = _PLANNERS[cfg.mode](run, [ex for ex in mine if ex.id not in settled], done, solved, indices)
            if cfg.round_size:  # a correct trajectory (or an ungraded one) settles its problem for per_problem first
                settled |= {str(r["id"]) for r in written if r["correct"] is not False}
    finally:
        for fh in handles.values():
            fh.close()
        if sampler is not given:  # opened here: release it (a vLLM engine holds its KV cache)
            release(sampler)
    if run.shortened:
        log.info("%d problems had an expert solution too long for the model's window: cut to fit (long_solutions="
                 "shorten; each record's `shortened` says where)", run.shortened)
    _write_throughput(out, rank, world, {"rank": rank, "tokens": run.tokens, "decode_seconds": run.seconds})
    dist.barrier()
    if rank == 0:
        _finish(paths, cfg, examples, world)
    dist.barrier()
    return out


def _check_examples(cfg: SynthConfig, examples: list[Example]) -> None:
    """Refuse what the mode cannot use, and say how landmarks and grades will be taken."""
    if cfg.mode == "star":
        _check_answers(examples, cfg.data.source, "mode star needs a gold 'answer' for every problem (each attempt "
                       "is graded against it, and it is the rationalization hint)", "or use mode mixed or direct")
    if cfg.teacher_context == "answer_only":
        _check_answers(examples, cfg.data.source, "teacher_context answer_only needs a gold 'answer' for every "
                       "problem (it is all the teacher sees besides the problem)", "or use teacher_context solution")
    own = sum(ex.landmarks is not None for ex in examples)
    if own:
        log.info("landmarks: %d of %d expert records carry their own list, which wins over the '%s' "
                 "extractor; the other %d are extracted", own, len(examples), cfg.landmarks, len(examples) - own)
    ungraded = sum(ex.answer is None for ex in examples)
    if ungraded and cfg.mode != "star":
        log.info("%d of %d problems have no answer (proofs?): their trajectories are kept ungraded (correct: null)%s",
                 ungraded, len(examples), ", whatever keep says" if cfg.keep == "correct" else "")


def _done(paths: dict[str, Path], rank: int, world: int) -> tuple[set[tuple[str, int]], set[str], set[str]]:
    """Resume: the (id, sample index) pairs already written, merged or in this rank's shards; the
    problems a STaR self attempt already solved (kept self records are the correct ones); and the
    problems a kept correct (or ungraded) trajectory settles for `round_size`."""
    done: set[tuple[str, int]] = set()
    solved: set[str] = set()
    settled: set[str] = set()
    files = [(name, p) for name in ("out", "rejected", "skipped")
             for p in {paths[name], dist.shard_path(paths[name], rank, world)}]
    for name, p in files + [("unselected", paths["unselected"])]:  # unselected: kept, left out by per_problem
        records = read_records(p)
        done |= {_key(r) for r in records}
        if name in ("out", "unselected"):
            solved |= {str(r["id"]) for r in records if r.get("star_path") == "self"}
            settled |= {str(r["id"]) for r in records if r.get("correct") is not False}
    return done, solved, settled


def _rounds(cfg: SynthConfig) -> list[range]:
    """The sample indices of each round: all at once, or `round_size` at a time in index order."""
    size = cfg.round_size or cfg.samples_per_problem
    return [range(lo, min(lo + size, cfg.samples_per_problem)) for lo in range(0, cfg.samples_per_problem, size)]


def _todo(ex: Example, indices: Any, done: set[tuple[str, int]]) -> list[int]:
    return [i for i in indices if (ex.id, i) not in done]


# ----------------------------------------------------------------------------- one planner per mode

def _plan_mixed(run: "_Runner", problems: list[Example], done: set, solved: set, indices: range) -> list[dict]:
    """The student context proposes, the teacher's (problem + expert solution, or + the answer
    alone with teacher_context answer_only) vetoes."""
    cfg, jobs = run.cfg, []
    for ex in problems:
        todo = _todo(ex, indices, done)
        if not todo:
            continue
        student = run.render(student_messages(ex.problem, run.prompts))
        if cfg.teacher_context == "answer_only":  # no solution in any context: nothing to cut
            teacher = run.render(answer_only_messages(ex.problem, ex.answer, run.prompts))
            if run.fits(ex, todo, [student, teacher]):
                jobs += [_Job(ex, i, student, teacher) for i in todo]
            continue
        fitted = run.fit_solution(ex, todo, student, lambda sol, ex=ex: run.render(
            teacher_messages(ex.problem, sol, ex.answer, run.prompts)))
        if fitted is not None:
            ex, teacher, cut = fitted
            jobs += [_Job(ex, i, student, teacher, shortened=cut) for i in todo]
    return run(jobs, "student", f"mixed, tau={cfg.tau}")


def _plan_direct(run: "_Runner", problems: list[Example], done: set, solved: set, indices: range) -> list[dict]:
    """The model given problem + expert solution writes alone, asked for a self-contained solution."""
    cfg, jobs = run.cfg, []
    for ex in problems:
        todo = _todo(ex, indices, done)
        if not todo:
            continue
        fitted = run.fit_solution(ex, todo, None, lambda sol, ex=ex: run.render(
            direct_messages(ex.problem, sol, ex.answer, run.prompts)))
        if fitted is not None:
            ex, prompt, cut = fitted
            jobs += [_Job(ex, i, prompt, shortened=cut) for i in todo]
    return run(jobs, "teacher", "direct")


def _plan_star(run: "_Runner", problems: list[Example], done: set, solved: set, indices: range) -> list[dict]:
    """STaR: attempts on the plain problem, then rationalizations of the problems none solved."""
    cfg, jobs = run.cfg, []
    for ex in problems:  # path 1: the model alone, on the plain problem
        todo = _todo(ex, indices, done)
        prompt = run.render(student_messages(ex.problem, run.prompts)) if todo else []
        if todo and run.fits(ex, todo, [prompt], "self"):
            jobs += [_Job(ex, i, prompt, star_path="self") for i in todo]
    written = run(jobs, "student", "star, self")
    solved = solved | {r["id"] for r in written if r["correct"]}
    jobs = []
    first = cfg.STAR_RATIONALIZED_FROM
    for ex in problems:  # path 2: problems no self attempt solved, with the answer as a hint
        todo = _todo(ex, range(first, first + cfg.rationalization_samples), done)
        if ex.id in solved or not todo:
            continue
        prompt = run.render(rationalization_messages(ex.problem, ex.answer, run.prompts))
        if run.fits(ex, todo, [prompt], "rationalized"):
            jobs += [_Job(ex, i, prompt, star_path="rationalized") for i in todo]
    return written + run(jobs, "teacher", "star, rationalized")


_PLANNERS = {"mixed": _plan_mixed, "direct": _plan_direct, "star": _plan_star}


def _finish(paths: dict[str, Path], cfg: SynthConfig, examples: list[Example], world: int) -> None:
    """Rank 0, after every rank decoded: merge the shards, apply per_problem, write the statistics."""
    out = paths["out"]
    for name in ("out", "rejected", "skipped"):
        merge_shards(paths[name], world, key=_key)
    apply_per_problem(paths, cfg, [ex.id for ex in examples])
    kept, rejected = read_records(out), read_records(paths["rejected"])
    unselected = read_records(paths["unselected"])
    fractions = student_fractions(kept + unselected + rejected)
    skipped = read_records(paths["skipped"])
    stats = compute_stats(kept, rejected, len(skipped), fractions, out, cfg, unselected)
    if cfg.mode == "star":
        stats["star"] = star_stats([ex.id for ex in examples], kept + unselected, rejected, skipped)
    if cfg.round_size:  # what stopping at each problem's first correct trajectory saved
        decoded, full = len(kept) + len(unselected) + len(rejected), len(examples) * cfg.samples_per_problem
        stats["rounds"] = {"round_size": cfg.round_size, "trajectories_decoded": decoded,
                           "without_rounds": full - len(skipped), "saved_fraction": 1 - decoded / max(full - len(skipped), 1)}
    paths["stats"].write_text(json.dumps(stats, indent=2), encoding="utf-8")
    plot_student_fraction(fractions, paths["histogram"], cfg)
    for p in out.parent.glob("throughput.rank*.json"):
        p.unlink()
    log.info("synthetic set: %s (%s)", out, _summary_line(stats))


def _check_answers(examples: list[Example], source: str, why: str, instead: str) -> None:
    """Every problem needs a gold answer (STaR grades every attempt and gives the answer as the
    rationalization hint; the answer_only teacher sees nothing else)."""
    missing = [ex.id for ex in examples if not (ex.answer or "").strip()]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"{source}: {why}, but {len(missing)} of {len(examples)} problems have none (ids {shown}). "
                        f"Add an 'answer' field to those records, {instead}.")


@dataclass
class _Job:
    """One (problem, sample index) to decode: the writer's prompt, the teacher's (mixed mode only)
    and, in star mode, the STaR path it belongs to."""
    ex: Example
    index: int
    prompt: list[int]
    teacher_prompt: list[int] | None = None
    star_path: str | None = None
    shortened: dict | None = None  # where an over-long expert solution was cut (`_Runner.fit_solution`)


class _Runner:
    """Decodes jobs in batches, grades them and appends one record per job to this rank's files."""

    def __init__(self, cfg: SynthConfig, sampler: Sampler, label: str, handles: dict, show: bool) -> None:
        self.cfg, self.sampler, self.label, self.handles, self.show = cfg, sampler, label, handles, show
        self.tokenizer = tokenizer = sampler.tokenizer
        self.window = sampler.window
        self.sampling = Sampling.of(cfg)
        self.prompts = load_prompts(cfg.prompts)
        # Thinking on: trajectories are written inside the thinking block, so its closing tag is never drawn.
        self.thinking = thinking_on(tokenizer)
        self.banned = think_close_ids(tokenizer) if self.thinking else None
        self.tokens, self.seconds = 0, 0.0  # throughput over every call
        self.shortened = 0  # problems whose expert solution was cut to fit the window, this run

    def render(self, messages: list[dict]) -> list[int]:
        return render(self.tokenizer, messages)

    def fits(self, ex: Example, todo: list[int], prompts: list[list[int]], star_path: str | None = None) -> bool:
        """Whether the longest of `prompts` plus max_new_tokens fits the model's window; if not,
        every index in `todo` is listed in the skipped file with the reason."""
        longest = max(len(p) for p in prompts)
        if longest + self.cfg.max_new_tokens <= self.window:
            return True
        for i in todo:
            append_record(self.handles["skipped"], {
                "id": ex.id, "sample_index": i, "reason":
                f"context of {longest} tokens + max_new_tokens {self.cfg.max_new_tokens} exceeds the "
                f"model window of {self.window}"} | ({"star_path": star_path} if star_path else {}))
        return False

    def fit_solution(self, ex: Example, todo: list[int], fixed: list[int] | None,
                     with_solution: Callable[[str], list[int]]) -> tuple[Example, list[int], dict | None] | None:
        """(example, the prompt `with_solution(its solution)`, where it was cut) made to fit the window.

        As it is where it fits. Otherwise, with long_solutions=shorten and where the other context
        (`fixed`, the student's) fits alone, the solution is cut (`shorten_solution`): the example
        carries the cut solution, so its landmarks, and training's teacher context, are those of
        what the teacher saw. Else None, and every index in `todo` is listed in the skipped file.
        """
        room = self.window - self.cfg.max_new_tokens
        prompt = with_solution(ex.solution)
        others = [fixed] if fixed is not None else []
        if len(prompt) <= room and all(len(p) <= room for p in others):
            return ex, prompt, None
        if self.cfg.long_solutions == "shorten" and all(len(p) <= room for p in others):
            cut = shorten_solution(ex.solution, lambda text: len(with_solution(text)) <= room)
            if cut is not None:
                text, at = cut
                self.shortened += 1
                info = {"at": at, "kept_chars": len(text), "full_chars": len(ex.solution),
                        "full_solution": ex.solution}
                return dataclasses.replace(ex, solution=text), with_solution(text), info
        self.fits(ex, todo, others + [prompt])  # lists them as skipped, with the reason
        return None

    def __call__(self, jobs: list[_Job], writer: str, desc: str) -> list[dict]:
        """Decode `jobs` (mixed-policy where they carry a teacher prompt, else plain sampling labelled
        `writer`) and write their records; returns the records."""
        cfg, tok, written = self.cfg, self.tokenizer, []
        bar = tqdm(total=len(jobs), desc=f"synth ({desc})", unit="traj", disable=not self.show)
        for start in range(0, len(jobs), cfg.batch_size):
            batch = jobs[start:start + cfg.batch_size]
            seeds = [sample_seed(cfg.seed, j.ex.id, j.index) for j in batch]
            t0 = time.perf_counter()
            if batch[0].teacher_prompt is not None:
                decoded = self.sampler.mixed([j.prompt for j in batch], [j.teacher_prompt for j in batch], seeds,
                                             self.sampling, cfg.tau, banned_ids=self.banned)
            else:
                decoded = self.sampler.sample([j.prompt for j in batch], seeds, self.sampling, banned_ids=self.banned,
                                              writer=writer)
            self.seconds += time.perf_counter() - t0
            texts = [tok.decode(d.tokens, skip_special_tokens=True) for d in decoded]
            grades = _grade(texts, [j.ex.answer for j in batch], cfg.grade_timeout)
            for j, d, text, correct, seed in zip(batch, decoded, texts, grades, seeds):
                self.tokens += len(d.tokens)
                marks, marks_kind = _landmarks(j.ex, cfg.landmarks)
                record = j.ex.to_dict() | {
                    "landmarks": marks, "landmarks_kind": marks_kind,
                    "trajectory": text, "trajectory_ids": d.tokens, "teacher_mask": d.teacher_mask,
                    "p_student": d.p_student, "p_teacher": d.p_teacher, "q": d.q,
                    "finish_reason": d.finish_reason, "mode": cfg.mode, "tau": cfg.tau,
                    "temperature": cfg.temperature, "top_p": cfg.top_p, "thinking": self.thinking,
                    "presence_penalty": cfg.presence_penalty, "frequency_penalty": cfg.frequency_penalty,
                    "seed": seed, "sample_index": j.index, "model": self.label, "engine": self.sampler.engine,
                    "prompt_version": self.prompts.version, "prompt_hash": self.prompts.hash, "correct": correct,
                }
                if cfg.mode != "star":  # training builds the teacher's context from it: the one that wrote it
                    record["teacher_context"] = "direct" if cfg.mode == "direct" else cfg.teacher_context
                if j.star_path:
                    record["star_path"] = j.star_path
                if j.shortened:
                    record["shortened"] = j.shortened
                if j.star_path == "rationalized":
                    record["rationalization_prompt_version"] = RATIONALIZATION_PROMPT_VERSION
                # STaR keeps only what reached the answer; the other modes follow `keep`.
                wrong = correct is not True if cfg.mode == "star" else cfg.keep == "correct" and correct is False
                append_record(self.handles["rejected" if wrong else "out"], record)
                written.append(record)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{self.tokens / max(self.seconds, 1e-9):.1f}")
        bar.close()
        return written


def _grade(texts: list[str], answers: list[str | None], timeout: float) -> list[bool | None]:
    """Grade trajectories that have a gold answer (None where there is none)."""
    idx = [i for i, a in enumerate(answers) if a]
    grades: list[bool | None] = [None] * len(texts)
    if idx:
        for i, g in zip(idx, grade_many([texts[i] for i in idx], [answers[i] for i in idx], timeout=timeout)):
            grades[i] = bool(g)
    return grades


# ----------------------------------------------------------------------------- over-long solutions

# "Solution 2:", "**Solution 2.**", "## Solution 2", "== Solution 2 ==" at the start of a line: where
# an alternative solution begins (AoPS-style write-ups list several). The authors cut there.
_SOLUTION_HEADING = re.compile(r"^[ \t]*(?:#+[ \t]*|=+[ \t]*|\*\*|__)?solution[ \t]*\d+[ \t]*(?:\*\*|__|=+)?[ \t]*"
                               r"(?:[:.]|$)", re.IGNORECASE | re.MULTILINE)
# A section heading: markdown `#`, LaTeX \section / \subsection, or a line that is one bold phrase.
_SECTION = re.compile(r"^[ \t]*(?:#{1,6}[ \t]|\\(?:sub)*section\*?\{|\*\*[^*\n]+\*\*[ \t]*:?[ \t]*$)", re.MULTILINE)
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def shorten_solution(solution: str, fits: Callable[[str], bool]) -> tuple[str, str] | None:
    """The longest cut of `solution` for which `fits(cut)` holds, and where it was cut, or None.

    Tried in order, each time the latest cut that fits: before a "Solution N:" heading (the
    authors' rule: whole solutions are kept, later alternatives dropped), then before a section
    heading or at a paragraph break, then halving the text until it fits (the authors' fallback).
    The first two search their cut points by bisection, since a longer prefix never makes a
    shorter prompt. Returns (text, "solution heading" | "section" | "paragraph" | "halved").
    """
    def latest(cuts: list[int]) -> int | None:
        cuts = sorted({c for c in cuts if 0 < c < len(solution) and solution[:c].strip()})
        lo, hi, found = 0, len(cuts) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            if fits(solution[:cuts[mid]].rstrip()):
                found, lo = cuts[mid], mid + 1
            else:
                hi = mid - 1
        return found

    cut = latest([m.start() for m in _SOLUTION_HEADING.finditer(solution)])
    if cut is not None:
        return solution[:cut].rstrip(), "solution heading"
    sections = {m.start() for m in _SECTION.finditer(solution)}
    cut = latest(sorted(sections | {m.start() for m in _PARAGRAPH.finditer(solution)}))
    if cut is not None:
        return solution[:cut].rstrip(), "section" if cut in sections else "paragraph"
    text = solution
    while len(text) > 1:
        text = text[: len(text) // 2]
        if text.strip() and fits(text.rstrip()):
            return text.rstrip(), "halved"
    return None


# ----------------------------------------------------------------------------- trajectories per problem

def select_per_problem(records: list[dict], how: str, k: int = 1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(chosen, left out) of kept records, by `how` (SynthConfig.per_problem), each in input order.

    all: every record. first: per problem, the correct record with the lowest sample index; a
    problem without an answer (every record ungraded) gives its first record, a graded one with
    none correct gives none. random: per problem, min(k, its records) drawn with
    Random(seed, problem id) from its records in sample-index order, so the draw depends on
    neither the file order nor the other problems.
    """
    by_id: dict[str, list[dict]] = {}
    for r in records:
        by_id.setdefault(str(r["id"]), []).append(r)
    chosen: set[int] = set()
    for pid, group in by_id.items():
        group = sorted(group, key=lambda r: int(r["sample_index"]))
        if how == "all":
            pick = group
        elif how == "first":
            right = [r for r in group if r.get("correct")]
            ungraded = all(r.get("correct") is None for r in group)
            pick = right[:1] if right else group[:1] if ungraded else []
        else:
            pick = random.Random(f"dail-per-problem-{seed}-{pid}").sample(group, min(k, len(group)))
        chosen |= {id(r) for r in pick}
    return [r for r in records if id(r) in chosen], [r for r in records if id(r) not in chosen]


def apply_per_problem(paths: dict[str, Path], cfg: SynthConfig, order: list[str]) -> None:
    """Reshape the kept set by `cfg.per_problem`: the chosen records stay in the synthetic set,
    the others move to `<out>.unselected.jsonl`. Both files are pooled first, so a rerun with
    another per_problem reshapes the same trajectories without decoding again (and `all` moves
    every record back). Records are written by problem, in the expert set's `order` (ids), then
    by sample index: the order one process writes them in. Each file is replaced atomically, the
    unselected one first: a crash in between leaves a record in both files, never in neither,
    and the pool drops such doubles."""
    out, aside = paths["out"], paths["unselected"]
    kept, unselected = read_records(out), read_records(aside)
    if cfg.per_problem == "all" and not unselected:
        return
    pool: dict[tuple[str, int], dict] = {}
    for r in kept + unselected:
        pool.setdefault(_key(r), r)
    rank = {pid: i for i, pid in enumerate(order)}
    ordered = sorted(pool.values(), key=lambda r: (rank.get(str(r["id"]), len(rank)), _key(r)))
    chosen, left = select_per_problem(ordered, cfg.per_problem, cfg.per_problem_k, cfg.seed)
    for path, records in ((aside, left), (out, chosen)):
        if not records and path == aside:
            path.unlink(missing_ok=True)
            continue
        write_records(path, records)
    log.info("per_problem=%s: %d of %d kept trajectories form the training set (%d problems); the other %d are in %s",
             cfg.per_problem, len(chosen), len(pool), len({str(r["id"]) for r in chosen}), len(left), aside.name)


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
                  out: Path, cfg: SynthConfig, unselected: list[dict] | None = None) -> dict:
    """Statistics of every trajectory written: kept in the training set, left out of it by
    `per_problem` (`unselected`), or rejected by `keep`."""
    unselected = unselected or []
    prompts = load_prompts(cfg.prompts)
    records = kept + unselected + rejected
    n_tok = sum(len(r["teacher_mask"]) for r in records)
    n_teacher = sum(sum(r["teacher_mask"]) for r in records)
    graded = [r["correct"] for r in records if r.get("correct") is not None]
    lengths = sorted(len(r["trajectory_ids"]) for r in records)
    return {
        "mode": cfg.mode, "tau": cfg.tau, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "trajectories": len(records), "kept": len(kept), "rejected": len(rejected), "skipped": skipped,
        "per_problem": cfg.per_problem if cfg.per_problem != "random" else f"random, k={cfg.per_problem_k}",
        "unselected": len(unselected),
        # problems whose expert solution was cut to fit the window (long_solutions=shorten)
        "shortened": len({str(r["id"]) for r in records if r.get("shortened")}),
        "problems": len(fractions),
        "student_token_fraction": round(1 - n_teacher / n_tok, 4) if n_tok else None,
        "teacher_interventions_per_100_tokens":
            round(100 * sum(_runs(r["teacher_mask"]) for r in records) / n_tok, 3) if n_tok else None,
        "mean_student_fraction_per_problem":
            round(sum(fractions.values()) / len(fractions), 4) if fractions else None,
        "mean_length": round(n_tok / len(records), 1) if records else None,
        "median_length": lengths[len(lengths) // 2] if lengths else None,
        "finish_reasons": dict(Counter(r["finish_reason"] for r in records)),
        "graded": len(graded), "correct": sum(graded), "ungraded": len(records) - len(graded),
        "correct_fraction": round(sum(graded) / len(graded), 4) if graded else None,
        **_read_throughput(out),
        "prompt_version": prompts.version, "prompt_hash": prompts.hash,
        **({"teacher_context": cfg.teacher_context} if cfg.mode != "star" else {}),
    }


def star_stats(ids: list[str], kept: list[dict], rejected: list[dict], skipped: list[dict]) -> dict:
    """Per problem of this run (`ids`), which STaR path gave it training data: `self` (a correct
    attempt on the plain problem), `rationalized` (none, but a correct attempt with the hint) or
    `nothing` (only rejected or skipped attempts). Attempt counts are over the same problems."""
    ids_set = set(ids)
    paths: dict[str, set[str]] = {}
    for r in kept:
        paths.setdefault(str(r["id"]), set()).add(r["star_path"])
    n_self = sum("self" in paths.get(i, ()) for i in ids_set)
    n_rationalized = sum(paths.get(i) == {"rationalized"} for i in ids_set)
    tried = Counter(r["star_path"] for r in kept + rejected if str(r["id"]) in ids_set)
    right = Counter(r["star_path"] for r in kept if str(r["id"]) in ids_set)
    return {
        "problems": len(ids_set), "self": n_self, "rationalized": n_rationalized,
        "nothing": len(ids_set) - n_self - n_rationalized,
        "self_attempts": tried["self"], "self_correct": right["self"],
        "rationalization_attempts": tried["rationalized"], "rationalization_correct": right["rationalized"],
        "skipped_attempts": sum(str(r["id"]) in ids_set for r in skipped),
        "rationalization_prompt_version": RATIONALIZATION_PROMPT_VERSION,
    }


def _summary_line(stats: dict) -> str:
    star = stats.get("star")
    return (f"{stats['trajectories']} trajectories, student tokens {stats['student_token_fraction']}, "
            f"{stats['teacher_interventions_per_100_tokens']} interventions/100 tok, "
            f"correct {stats['correct']}/{stats['graded']}, {stats['tokens_per_second']} tok/s"
            + (f"; STaR problems: {star['self']} self, {star['rationalized']} rationalized, "
               f"{star['nothing']} nothing" if star else ""))


def plot_student_fraction(fractions: dict[str, float], png: Path, cfg: SynthConfig) -> None:
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    ax.hist(list(fractions.values()), bins=[i / 20 for i in range(21)], color="tab:blue", edgecolor="white",
            label=f"{len(fractions)} problems")
    ax.set_xlim(0, 1)
    ax.set_xlabel("student-token fraction per problem")
    ax.set_ylabel("problems")
    mode = f"{cfg.mode}, tau={cfg.tau}" if cfg.mode == "mixed" else cfg.mode
    ax.set_title(f"Synthesis ({mode}): {model_label(cfg.model)[:60]}\n"
                 f"data: {cfg.data.source} ({cfg.data.split})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
