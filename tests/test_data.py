"""Expert-set loading: validation messages, built-in sources and their splits, HF datasets."""

from __future__ import annotations

import json
import re

import pytest

from dail.config import DataConfig
from dail.data import DataError, load_examples, load_jsonl
from dail.records import read_records


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"id": "a", "problem": "1+1?", "solution": "1+1=2", "answer": "2"})


def test_valid_file_loads(tmp_path):
    p = _write(tmp_path / "x.jsonl", [GOOD, json.dumps({"id": 7, "problem": "p", "solution": "s",
                                                         "landmarks": ["3"], "meta": {"k": 1}})])
    exs = load_jsonl(p)
    assert [e.id for e in exs] == ["a", "7"] and exs[1].landmarks == ["3"]


@pytest.mark.parametrize("line, match", [
    (json.dumps({"problem": "p", "solution": "s"}), r"x.jsonl:2: missing field 'id'"),
    (json.dumps({"id": "b", "problem": "  ", "solution": "s"}), r"x.jsonl:2: field 'problem': expected a non-empty"),
    (json.dumps({"id": "b", "problem": "p", "solution": ""}), r"x.jsonl:2: field 'solution': expected a non-empty"),
    (json.dumps({"id": "a", "problem": "p", "solution": "s"}), r"x.jsonl:2: field 'id': duplicate id 'a' \(first seen at .*x.jsonl:1\)"),
    ('{"id": "b", "problem": ', r"x.jsonl:2: not valid JSON"),
    (json.dumps({"id": "b", "problem": "p", "solution": "s", "landmarks": "3"}), r"x.jsonl:2: field 'landmarks': expected a list"),
    (json.dumps([1, 2]), r"x.jsonl:2: expected a JSON object"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, match):
    p = _write(tmp_path / "x.jsonl", [GOOD, line])
    with pytest.raises(DataError, match=match):
        load_jsonl(p)


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(GOOD.encode() + b"\n" + '{"id": "b", "problem": "caf\xe9", "solution": "s"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid UTF-8"):
        load_jsonl(p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(_write(tmp_path / "e.jsonl", [""]))


def test_gsm_symbolic_split_is_by_template_and_seeded():
    train = load_examples(DataConfig(source="gsm-symbolic", split="train"))
    test = load_examples(DataConfig(source="gsm-symbolic", split="test"))
    assert len(train) + len(test) == 100
    assert not {e.meta["template"] for e in train} & {e.meta["template"] for e in test}
    again = load_examples(DataConfig(source="gsm-symbolic", split="train"))
    assert [e.problem for e in again] == [e.problem for e in train]
    other = load_examples(DataConfig(source="gsm-symbolic", split="train", seed=1))
    assert [e.problem for e in other] != [e.problem for e in train]
    for e in train[:5]:
        assert e.answer and e.solution.rstrip().endswith(e.answer)


def test_champ_builds_solution_from_steps_and_splits():
    train = load_examples(DataConfig(source="champ", split="train"))
    test = load_examples(DataConfig(source="champ", split="test"))
    assert len(train) + len(test) == 270 and not {e.id for e in train} & {e.id for e in test}
    assert all(e.solution.count("\n") >= 1 and e.answer for e in train[:20])


def test_hf_dataset_saved_to_disk_with_field_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"question": ["q1", "q2"], "worked": ["s1 = 2", "s2 = 3"], "final": ["2", "3"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(source=str(tmp_path / "ds"), fields={"problem": "question", "solution": "worked", "answer": "final"})
    exs = load_examples(cfg)
    assert [(e.id, e.problem, e.solution, e.answer) for e in exs] == [("ds-0", "q1", "s1 = 2", "2"), ("ds-1", "q2", "s2 = 3", "3")]
    with pytest.raises(DataError, match=r"ds: unknown layout, no problem column \(columns found: question, worked, "
                                        r"final\).*--data.fields '\{problem: question, solution: <column>\}'"):
        load_examples(DataConfig(source=str(tmp_path / "ds")))


def test_read_records_repairs_a_torn_last_line(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b', encoding="utf-8")
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_records(p) == [{"a": 1}, {"a": 2}]
    assert p.read_text() == '{"a": 1}\n{"a": 2}\n'
    p.write_text('{"a": 1}\nnot json\n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match="out.jsonl:2"):
        read_records(p)


def test_gsm_splits_train_val_test_are_disjoint_and_val_leaves_test_alone():
    from dail.config import DataConfig

    def templates(**kw):
        return {ex.meta["template"] for ex in load_examples(DataConfig(source="gsm-symbolic", **kw))}

    test = templates(split="test")
    train_all = templates(split="train")
    train, val = templates(split="train", val_fraction=0.2), templates(split="val", val_fraction=0.2)
    assert templates(split="test", val_fraction=0.2) == test
    assert not train & val and not (train | val) & test and train | val == train_all
    assert len(val) == 10 and len(train) == 40


def test_gsm_instance_seed_gives_new_instances_of_the_same_templates():
    from dail.config import DataConfig

    a = load_examples(DataConfig(source="gsm-symbolic", limit=8))
    b = load_examples(DataConfig(source="gsm-symbolic", limit=8, instance_seed=1))
    assert [e.meta["template"] for e in a] == [e.meta["template"] for e in b]
    assert sum(x.problem != y.problem for x, y in zip(a, b)) >= 6  # a few templates have one instance only


def test_gsm_instances_are_new_problems_of_the_same_templates_balanced_under_a_limit():
    from dail.config import ConfigError, DataConfig

    one = load_examples(DataConfig(source="gsm-symbolic", limit=5))
    many = load_examples(DataConfig(source="gsm-symbolic", limit=5, instances=3))
    assert many == one  # the first instances come first, unchanged
    per = {}
    for e in load_examples(DataConfig(source="gsm-symbolic", split="train", val_fraction=0.2, instances=3,
                                      limit=100)):
        per.setdefault(e.meta["template"], []).append(e)
    assert len(per) == 40 and all(2 <= len(v) <= 3 for v in per.values())  # balanced: 100 = 40 + 40 + 20
    ids = [e.id for v in per.values() for e in v]
    assert len(set(ids)) == len(ids)
    for v in per.values():
        assert len({e.problem for e in v}) == len(v)  # no instance repeats another of its template
        assert v[0].id == f"gsm-{v[0].meta['template']}" and all(e.id.endswith(f"-i{e.meta['instance_index']}")
                                                                 for e in v[1:])
    with pytest.raises(ConfigError, match=r"'data.instances': instances are generated from templates"):
        DataConfig(source="champ", instances=2)


# ----------------------------------------------------------------------------- released layouts, proofs

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def _rows(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _parquet(rows, path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _saved(rows, path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_layouts_are_recognised_by_their_columns():
    from dail.data import detect_layout

    assert detect_layout(_rows("released_verl.jsonl")[0]) == "verl"
    assert detect_layout(_rows("released_e1.jsonl")[0]) == "e1"
    assert detect_layout(["id", "problem", "solution"]) == "dail"
    assert detect_layout(["id", "problem_id", "problem", "solution"]) == "dail"  # an id column: dail's own
    assert detect_layout(["question", "answer"]) is None


@pytest.mark.parametrize("form", ["jsonl", "parquet", "saved"])
def test_training_set_layout_loads_without_a_mapping(tmp_path, form):
    rows = _rows("released_e1.jsonl")
    source = {"jsonl": lambda: FIXTURES / "released_e1.jsonl", "parquet": lambda: _parquet(rows, tmp_path / "e1.parquet"),
              "saved": lambda: _saved(rows, tmp_path / "e1")}[form]()
    exs = load_examples(DataConfig(source=str(source)))
    assert [e.id for e in exs] == [r["problem_id"] for r in rows]
    assert [e.problem for e in exs] == [r["problem"] for r in rows]
    assert [e.solution for e in exs] == [r["solution"] for r in rows]
    # The answer is the last box of the solution; the proof has none (a valid record without an answer).
    assert [e.answer for e in exs] == ["27", "16", None]
    assert all(e.meta["layout"] == "e1" for e in exs)


@pytest.mark.parametrize("form", ["jsonl", "parquet", "saved"])
def test_verl_evaluation_set_loads_for_eval_without_a_mapping(tmp_path, form):
    from dail.data import load_problems

    rows = _rows("released_verl.jsonl")
    source = {"jsonl": lambda: FIXTURES / "released_verl.jsonl", "parquet": lambda: _parquet(rows, tmp_path / "v.parquet"),
              "saved": lambda: _saved(rows, tmp_path / "v")}[form]()
    exs = load_problems(DataConfig(source=str(source)))
    assert [e.id for e in exs] == ["0", "1", "2"]
    assert exs[0].problem == "Find the remainder when $2^{10}$ is divided by $7$."  # the user message, not the system one
    assert [e.answer for e in exs] == ["2", "9", "20"]  # reward_model.ground_truth
    assert [e.solution for e in exs] == ["", "", ""]
    # An evaluation set has no solutions: as an expert set it is refused, saying so.
    with pytest.raises(DataError, match=r"no solution column \(verl layout.*an evaluation set"):
        load_examples(DataConfig(source=str(source)))


def test_unknown_layout_lists_the_columns_and_the_mapping_that_fixes_it(tmp_path):
    p = tmp_path / "odd.jsonl"
    p.write_text(json.dumps({"uid": "a", "question": "1+1?", "worked": "1+1=2", "final_answer": "2"}) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(DataConfig(source=str(p)))
    msg = str(err.value)
    assert "odd.jsonl: unknown layout" in msg and "columns found: uid, question, worked, final_answer" in msg
    fix = re.search(r"--data.fields '(\{.*?\})'", msg).group(1)
    assert fix == "{problem: question, solution: <column>, answer: final_answer}"
    # The suggested mapping, completed, loads the file; a dotted name reads a nested field.
    exs = load_examples(DataConfig(source=str(p), fields={"problem": "question", "solution": "worked",
                                                          "answer": "final_answer", "id": "uid"}))
    assert [(e.id, e.problem, e.solution, e.answer) for e in exs] == [("a", "1+1?", "1+1=2", "2")]
    p.write_text(json.dumps({"q": {"text": "1+1?"}, "s": "1+1=2", "meta_id": 5}) + "\n")
    exs = load_examples(DataConfig(source=str(p), fields={"problem": "q.text", "solution": "s", "id": "meta_id"}))
    assert [(e.id, e.problem) for e in exs] == [("5", "1+1?")]


def test_records_without_an_answer_are_valid_and_an_empty_answer_is_none(tmp_path):
    p = _write(tmp_path / "proofs.jsonl", [
        json.dumps({"id": "p1", "problem": "Prove that 2 is prime.", "solution": "Its only divisors are 1 and 2."}),
        json.dumps({"id": "p2", "problem": "Prove it.", "solution": "Done.", "answer": "  "}),
    ])
    assert [e.answer for e in load_jsonl(p)] == [None, None]


def test_eval_refuses_a_set_without_answers_naming_the_source_and_an_id(tmp_path):
    from dail.data import gradable, load_problems

    proofs = [r for r in _rows("released_e1.jsonl") if "boxed" not in r["solution"]]
    folder = _saved(proofs, tmp_path / "proofs")
    with pytest.raises(DataError, match=r"proofs: none of its 1 problems has a gold answer \(e.g. id 'usamo-1999-p1'\)"):
        load_problems(DataConfig(source=str(folder)))
    # A benchmark file (here the same proofs as JSONL) is refused at the row, naming the problem.
    _write(tmp_path / "proofs.jsonl", [json.dumps(r) for r in proofs])
    with pytest.raises(DataError, match=r"proofs.jsonl row 1: field 'answer' \(the solution has no \\boxed\{\}\): "
                                        r"missing for problem 'usamo-1999-p1'.*proofs"):
        load_problems(DataConfig(source=str(tmp_path / "proofs.jsonl")))
    # Where only some lack one, those are left out with a warning naming one.
    exs = load_examples(DataConfig(source=str(FIXTURES / "released_e1.jsonl")))
    with pytest.warns(UserWarning, match=r"1 of 3 problems have no gold answer .*'usamo-1999-p1'"):
        assert [e.id for e in gradable(exs, "src")] == ["1985-AIME-1", "1986-AIME-2"]


def test_dail_eval_refuses_proofs_before_sampling(tiny_dir, tmp_path, capsys):
    from dail.cli import main

    folder = _saved([r for r in _rows("released_e1.jsonl") if "boxed" not in r["solution"]], tmp_path / "proofs")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model.name", str(tiny_dir), "--model.device", "cpu", "--data.source", str(folder),
              "--out", str(tmp_path / "ev"), "--n", "2", "--ks", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "dail eval: " in err and "none of its 1 problems has a gold answer" in err
    assert "'usamo-1999-p1'" in err
    assert not (tmp_path / "ev" / "summary.json").exists() and not (tmp_path / "ev" / "samples.jsonl").exists()
