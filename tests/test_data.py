"""Expert-set loading: validation messages, built-in sources and their splits, HF datasets."""

from __future__ import annotations

import json

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
    with pytest.raises(DataError, match="field 'problem' is mapped to column 'problem'"):
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
