"""`dail select`: hard problems from an evaluation folder, as an expert set.

The evaluation folders are written by hand (config.yaml as `dail eval` saves it, samples.jsonl
with graded records), so the tests need no model: what is under test is reading the folder,
counting, the threshold, the records written and the refusals.
"""

from __future__ import annotations

import json

import pytest
import yaml

from dail.cli import main
from dail.config import ConfigError, DataConfig, EvalConfig, ModelConfig, SelectConfig, save
from dail.data import DataError, load_jsonl
from dail.select import select

# problem id -> which of its n = 4 samples are correct
GRADES = {"a": [0, 0, 0, 0], "b": [0, 1, 0, 0], "c": [1, 1, 1, 1], "d": [0, 0, 0, 0]}


def _experts(path):
    rows = [{"id": pid, "problem": f"Problem {pid}?", "solution": f"Solution of {pid}: x = 1.", "answer": "1",
             "landmarks": [f"mark-{pid}"], "meta": {"year": 1990 + i}} for i, pid in enumerate(GRADES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _eval_folder(tmp_path, grades=GRADES, n=4, source=None):
    """A finished `dail eval` folder over the expert set, with the given per-sample grades."""
    folder = tmp_path / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    source = source or str(_experts(tmp_path / "experts.jsonl"))
    save(EvalConfig(model=ModelConfig(name="org/base-model"), data=DataConfig(source=source), n=n, ks=[1],
                    temperature=0.6, max_new_tokens=512), folder / "config.yaml")
    with open(folder / "samples.jsonl", "w", encoding="utf-8") as fh:
        for pid, marks in grades.items():
            fh.writelines(json.dumps({"id": pid, "sample_index": j, "kind": "math", "text": "...",
                                      "correct": bool(ok)}) + "\n" for j, ok in enumerate(marks))
    return folder


def test_selects_problems_at_or_below_the_threshold_keeping_every_field(tmp_path):
    folder = _eval_folder(tmp_path)
    out = select(SelectConfig(eval_dir=str(folder), out=str(tmp_path / "hard.jsonl")))
    exs = load_jsonl(out)  # a valid expert set
    assert [e.id for e in exs] == ["a", "d"]  # 0 of 4 correct, in the evaluation's order
    a = exs[0]
    assert (a.problem, a.solution, a.answer, a.landmarks) == ("Problem a?", "Solution of a: x = 1.", "1", ["mark-a"])
    assert a.meta["year"] == 1990
    assert a.meta["selected"] == {"eval_dir": str(folder), "model": "org/base-model", "adapter": None, "n": 4,
                                  "max_correct": 0, "temperature": 0.6, "max_new_tokens": 512, "correct": 0}
    assert yaml.safe_load((tmp_path / "hard.config.yaml").read_text())["max_correct"] == 0

    out = select(SelectConfig(eval_dir=str(folder), out=str(tmp_path / "hard.jsonl"), max_correct=1))
    exs = load_jsonl(out)  # rewritten: select wrote the file before
    assert [(e.id, e.meta["selected"]["correct"]) for e in exs] == [("a", 0), ("b", 1), ("d", 0)]


def test_only_samples_below_n_count(tmp_path):
    grades = {"a": [0, 0, 0, 0, 1], "b": [0, 0, 0, 0], "c": [1, 0, 0, 0], "d": [0, 0, 0, 0]}  # a: a fifth sample
    folder = _eval_folder(tmp_path, grades=grades)
    exs = load_jsonl(select(SelectConfig(eval_dir=str(folder), out=str(tmp_path / "hard.jsonl"))))
    assert [e.id for e in exs] == ["a", "b", "d"]


def test_refuses_what_is_not_a_finished_eval_folder(tmp_path):
    out = str(tmp_path / "hard.jsonl")
    with pytest.raises(DataError, match=r"nowhere: not a folder"):
        select(SelectConfig(eval_dir=str(tmp_path / "nowhere"), out=out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: not a dail eval folder \(no config.yaml or samples.jsonl\)"):
        select(SelectConfig(eval_dir=str(tmp_path / "empty"), out=out))

    folder = _eval_folder(tmp_path, grades={"a": [0, 0, 0, 0], "b": [0, 0, 0], "c": [1] * 4, "d": [0] * 4})
    with pytest.raises(DataError, match=r"samples.jsonl: unfinished evaluation: 1 of 4 problems have fewer than n=4 "
                                        r"graded samples \(e.g. 'b' has 3\)"):
        select(SelectConfig(eval_dir=str(folder), out=out))
    folder = _eval_folder(tmp_path / "x")
    (folder / "samples.rank0-of-2.jsonl").write_text("")
    with pytest.raises(DataError, match=r"unfinished evaluation: shard files .*samples.rank0-of-2.jsonl"):
        select(SelectConfig(eval_dir=str(folder), out=out))
    (folder / "config.yaml").write_text("lr: 0.1\n")
    with pytest.raises(DataError, match=r"config.yaml: not a dail eval config"):
        select(SelectConfig(eval_dir=str(folder), out=out))
    assert not (tmp_path / "hard.jsonl").exists()


def test_never_overwrites_a_file_it_did_not_write_and_needs_solutions(tmp_path):
    folder = _eval_folder(tmp_path)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("precious\n")
    with pytest.raises(DataError, match=r"mine.jsonl: exists and was not written by dail select"):
        select(SelectConfig(eval_dir=str(folder), out=str(mine)))
    assert mine.read_text() == "precious\n"

    bench = tmp_path / "bench.jsonl"  # a benchmark: answers, no solutions
    bench.write_text("".join(json.dumps({"id": pid, "problem": f"{pid}?", "answer": "1"}) + "\n" for pid in GRADES))
    folder = _eval_folder(tmp_path / "b", source=str(bench))
    with pytest.raises(DataError, match=r"bench.jsonl: 2 selected problems have no expert solution \(e.g. 'a'\)"):
        select(SelectConfig(eval_dir=str(folder), out=str(tmp_path / "hard.jsonl")))


def test_config_checks():
    with pytest.raises(ConfigError, match="max_correct"):
        SelectConfig(max_correct=-1)
    with pytest.raises(ConfigError, match="'out'.*expected a .jsonl path"):
        SelectConfig(out="hard.txt")


def test_cli(tmp_path, capsys):
    folder = _eval_folder(tmp_path)
    out = tmp_path / "sel" / "hard.jsonl"
    assert main(["select", "--eval_dir", str(folder), "--out", str(out), "--max_correct", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert [e.id for e in load_jsonl(out)] == ["a", "b", "d"]
    with pytest.raises(SystemExit) as e:
        main(["select", "--eval_dir", str(tmp_path / "nowhere"), "--out", str(out)])
    assert e.value.code == 2 and "dail select: " in capsys.readouterr().err
