"""Evaluation: pass@k, bootstrap, budgets from one run, resume, sharding, summary, benchmarks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from fractions import Fraction
from math import comb

import numpy as np
import pytest
import torch

import dail.evaluation as E
from dail.config import DataConfig, EvalConfig, ModelConfig
from dail.data import DataError, load_benchmark
from dail.records import read_records
from dail.evaluation import bootstrap_ci, evaluate, pass_at_k, summarize
import dail.sampler as SM
import dail.scoring as SC


# ----------------------------------------------------------------------------- pass@k

def _brute(n, c, k):
    """Fraction of k-subsets of n samples (the first c correct) that contain a correct one."""
    hits = total = 0
    for sub in itertools.combinations(range(n), k):
        total += 1
        hits += any(i < c for i in sub)
    return hits / total


def test_pass_at_k_known_values():
    assert pass_at_k(128, 2, 64) == pytest.approx(191 / 254, rel=1e-12)
    assert pass_at_k(16, 4, 4) == pytest.approx(265 / 364, rel=1e-12)
    # exact rational check of the same formula
    assert Fraction(1) - Fraction(comb(12, 4), comb(16, 4)) == Fraction(265, 364)


def test_pass_at_k_equals_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 1, 10) == 1.0           # k = n: any correct sample is drawn
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3, rel=1e-12)  # no cancellation trouble
    for bad in [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    v = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=float)
    lo, hi = bootstrap_ci(v, seed=3)
    assert (lo, hi) == bootstrap_ci(v, seed=3)
    assert lo < v.mean() < hi and 0 <= lo and hi <= 1
    assert bootstrap_ci(np.full(7, 0.25)) == (0.25, 0.25)
    lo2, hi2 = bootstrap_ci(np.stack([v, v], axis=1))
    assert lo2.shape == (2,) and lo2[0] == lo2[1]


def test_summarize_counts():
    recs = []
    for pid, c in [("a", 0), ("b", 2), ("c", 4)]:
        for j in range(4):
            ok = j < c
            recs.append({"id": pid, "sample_index": j, "correct": ok, "n_tokens": 10 + j, "finish_reason": "stop",
                         "correct_at_budget": {"5": False, "20": ok}, "answer_token_index": None})
    s = summarize(recs, ["a", "b", "c"], n=4, ks=[1, 3], budgets=[5, 20])
    assert s["ks"] == [1, 2, 3, 4]
    assert s["pass_at_k"]["1"]["mean"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert s["pass_at_k"]["4"]["mean"] == pytest.approx(2 / 3)
    assert s["by_budget"]["5"]["pass_at_k"]["4"]["mean"] == 0.0
    assert s["by_budget"]["5"]["mean_tokens"] == 5.0
    assert s["mean_tokens"] == pytest.approx(11.5)
    assert s["per_problem_correct"] == {"a": 0, "b": 2, "c": 4}
    with pytest.raises(ValueError, match="fewer than n=4"):
        summarize(recs[:-1], ["a", "b", "c"], n=4, ks=[1], budgets=[20])


# ----------------------------------------------------------------------------- evaluate() on the tiny model

PROBLEMS = [
    {"id": "p1", "problem": "Tom has 3 apples and buys 4 more.", "answer": "7"},
    {"id": "p2", "problem": "x = 12", "answer": "12"},
    {"id": "p3", "problem": "How many apples does he have? 7 8 9 + 24", "answer": "24"},
]


def _fake_grade(preds, golds, timeout, kind="math", timed_out=None):
    """A cheap deterministic grader that depends on the text, so budgets change grades."""
    return [len(p) % 3 == 0 for p in preds]


@pytest.fixture()
def bench(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def _cfg(tiny_dir, bench, out, **kw):
    base = dict(model=ModelConfig(name=str(tiny_dir), device="cpu"), data=DataConfig(source=str(bench), split="test"),
                out=str(out), n=4, ks=[1, 2], budgets=[3, 7], max_new_tokens=12, batch_size=6, temperature=0.7,
                seed=5)
    base.update(kw)
    return EvalConfig(**base)


def _by_key(path):
    return {(r["id"], r["sample_index"]): r for r in read_records(path)}


def test_evaluate_writes_records_summary_and_config(tiny, tiny_dir, bench, tmp_path, monkeypatch):
    monkeypatch.setattr(SC, "grade_many", _fake_grade)
    model, tok = tiny
    summary = evaluate(_cfg(tiny_dir, bench, tmp_path / "ev"), model, tok, label="base")
    out = tmp_path / "ev"
    assert (out / "config.yaml").exists()
    assert json.loads((out / "summary.json").read_text()) == summary
    recs = read_records(out / "samples.jsonl")
    assert len(recs) == 12 and len(_by_key(out / "samples.jsonl")) == 12
    for r in recs:
        assert set(r) >= {"id", "sample_index", "text", "n_tokens", "correct", "answer_token_index", "token_ids",
                          "finish_reason", "correct_at_budget"}
        assert r["n_tokens"] == len(r["token_ids"]) <= 12
        assert set(r["correct_at_budget"]) == {"3", "7", "12"}
        assert r["correct"] == r["correct_at_budget"]["12"] == (len(r["text"]) % 3 == 0)
        assert r["correct_at_budget"]["3"] == (len(tok.decode(r["token_ids"][:3], skip_special_tokens=True)) % 3 == 0)
    # the 4 samples of a problem differ (each has its own generator)
    assert len({tuple(r["token_ids"]) for r in recs if r["id"] == "p1"}) > 1
    assert summary["label"] == "base" and summary["dataset"] == "bench" and summary["split"] == "test"
    assert summary["prompt_version"].startswith("dail-prompts-")
    assert summary["n_problems"] == 3 and summary["n"] == 4 and summary["ks"] == [1, 2, 4]
    assert summary["budgets"] == [3, 7, 12] and set(summary["by_budget"]) == {"3", "7", "12"}
    counts = {pid: sum(r["correct"] for r in recs if r["id"] == pid) for pid in ("p1", "p2", "p3")}
    expect = np.mean([pass_at_k(4, c, 2) for c in counts.values()])
    assert summary["pass_at_k"]["2"]["mean"] == pytest.approx(expect)
    ci = summary["pass_at_k"]["2"]
    assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"]
    assert summary["mean_tokens"] == pytest.approx(np.mean([r["n_tokens"] for r in recs]))


def _unsolved(tmp_path):
    path = tmp_path / "unsolved.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def test_teacher_context_bf16_weights_and_entropy(tiny, tiny_dir, bench, tmp_path, monkeypatch):
    from dail.prompts import render, student_messages, teacher_messages

    monkeypatch.setattr(SC, "grade_many", _fake_grade)
    model, tok = tiny
    seen = []
    real = SM.decode
    monkeypatch.setattr(SM, "decode", lambda m, prompts, **kw: seen.append((prompts, next(m.parameters()).dtype, kw))
                        or real(m, prompts, **kw))
    bench = tmp_path / "solved.jsonl"  # a benchmark file whose problems carry an expert solution
    bench.write_text("".join(json.dumps(p | {"solution": f"We add. #### {p['answer']}"}) + "\n" for p in PROBLEMS))
    plain = evaluate(_cfg(tiny_dir, bench, tmp_path / "plain"), model, tok)
    assert all(p == render(tok, student_messages(PROBLEMS[0]["problem"])) for p in seen[0][0][:4])
    assert "entropy" not in seen[0][2] and "mean_entropy" not in plain and plain["context"] == "student"
    # The teacher's ceiling: problem and expert solution shown; bf16 weights although an fp32 model came in.
    seen.clear()
    s = evaluate(_cfg(tiny_dir, bench, tmp_path / "ceiling", context="teacher", dtype="bfloat16", entropy=True),
                 model, tok)
    ex = PROBLEMS[0]
    assert seen[0][0][0] == render(tok, teacher_messages(ex["problem"], "We add. #### 7", ex["answer"]))
    assert seen[0][1] == torch.bfloat16 and s["context"] == "teacher" and s["dtype"] == "bfloat16"
    recs = read_records(tmp_path / "ceiling" / "samples.jsonl")
    assert all(r["entropy"] > 0 for r in recs)
    want = sum(r["entropy"] * r["n_tokens"] for r in recs) / sum(r["n_tokens"] for r in recs)
    assert s["mean_entropy"] == pytest.approx(want)
    assert 0 <= s["distinct_answers"] <= 4 and s["distinct_answers"] == np.mean(
        [len({r["answer"] for r in recs if r["id"] == pid and r["answer"] is not None}) for pid in ("p1", "p2", "p3")])
    with pytest.raises(DataError, match="eval.context teacher shows the expert solution, and it has none"):
        evaluate(_cfg(tiny_dir, _unsolved(tmp_path), tmp_path / "x",
                      context="teacher"), model, tok)


def test_budget_grades_equal_rerunning_with_smaller_max_new_tokens(tiny, tiny_dir, bench, tmp_path, monkeypatch):
    """Greedy: grading the first b tokens of one long run == a fresh run with max_new_tokens=b."""
    monkeypatch.setattr(SC, "grade_many", _fake_grade)
    model, tok = tiny
    long = _by_key(tmp_path / "long" / "samples.jsonl") if evaluate(
        _cfg(tiny_dir, bench, tmp_path / "long", temperature=0.0, n=1, ks=[1]), model, tok) else None
    for b in (3, 7):
        evaluate(_cfg(tiny_dir, bench, tmp_path / f"b{b}", temperature=0.0, n=1, ks=[1], budgets=[],
                      max_new_tokens=b), model, tok)
        short = _by_key(tmp_path / f"b{b}" / "samples.jsonl")
        for key, r in short.items():
            assert r["token_ids"] == long[key]["token_ids"][:b]
            assert r["correct"] == long[key]["correct_at_budget"][str(b)]


def test_resume_after_crash_with_torn_last_line(tiny, tiny_dir, bench, tmp_path, monkeypatch):
    monkeypatch.setattr(SC, "grade_many", _fake_grade)
    model, tok = tiny
    cfg = _cfg(tiny_dir, bench, tmp_path / "ev", batch_size=4)
    full = evaluate(cfg, model, tok)
    path = tmp_path / "ev" / "samples.jsonl"
    want = _by_key(path)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][: len(lines[5]) // 2])  # killed mid-write
    (tmp_path / "ev" / "summary.json").unlink()

    calls = []
    real = SM.decode
    monkeypatch.setattr(SM, "decode", lambda m, prompts, **kw: calls.append(len(prompts)) or real(m, prompts, **kw))
    with pytest.warns(UserWarning, match="torn last line"):
        again = evaluate(cfg, model, tok)
    assert sum(calls) == 12 - 5  # only the missing samples were drawn again
    recs = read_records(path)
    assert len(recs) == 12
    got = _by_key(path)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key]["token_ids"] == want[key]["token_ids"]
        assert got[key]["correct_at_budget"] == want[key]["correct_at_budget"]
    assert again["pass_at_k"] == full["pass_at_k"]
    # a finished folder reruns without sampling anything
    calls.clear()
    assert evaluate(cfg, model, tok)["pass_at_k"] == full["pass_at_k"] and not calls


def test_resume_refuses_a_different_sampling_config(tiny, tiny_dir, bench, tmp_path, monkeypatch):
    monkeypatch.setattr(SC, "grade_many", _fake_grade)
    model, tok = tiny
    evaluate(_cfg(tiny_dir, bench, tmp_path / "ev", n=1, ks=[1]), model, tok)
    with pytest.raises(ValueError, match="different 'temperature'"):
        evaluate(_cfg(tiny_dir, bench, tmp_path / "ev", n=1, ks=[1], temperature=0.3), model, tok)
    # new budgets are fine: graded from the stored token ids
    s = evaluate(_cfg(tiny_dir, bench, tmp_path / "ev", n=1, ks=[1], budgets=[5]), model, tok)
    assert set(s["by_budget"]) == {"5", "12"}


def test_sharded_equals_unsharded(tiny, tiny_dir, bench, tmp_path, monkeypatch):
    monkeypatch.setattr(SC, "grade_many", _fake_grade)
    model, tok = tiny
    one = evaluate(_cfg(tiny_dir, bench, tmp_path / "one"), model, tok)
    cfg = _cfg(tiny_dir, bench, tmp_path / "two")
    assert evaluate(cfg, model, tok, rank=1, world_size=2) == {}  # rank 1 writes its shard only
    assert (tmp_path / "two" / "samples.rank1-of-2.jsonl").exists()
    two = evaluate(cfg, model, tok, rank=0, world_size=2)
    assert not list((tmp_path / "two").glob("*.rank*"))
    a, b = _by_key(tmp_path / "one" / "samples.jsonl"), _by_key(tmp_path / "two" / "samples.jsonl")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["token_ids"] == b[key]["token_ids"] and a[key]["correct"] == b[key]["correct"]
    assert [(r["id"], r["sample_index"]) for r in read_records(tmp_path / "two" / "samples.jsonl")] == \
        sorted(a, key=lambda k: (k[0], k[1]))
    assert one == two


def test_real_grader_and_answer_token_index(tiny, tiny_dir, bench, tmp_path, monkeypatch):
    """Force a known text through the real grader: the answer and its token index are found."""
    model, tok = tiny
    text = "3+4=7 so \\boxed{7}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    from dail.sampler import Decoded

    monkeypatch.setattr(SM, "decode", lambda m, prompts, **kw: [Decoded(list(ids), "length") for _ in prompts])
    s = evaluate(_cfg(tiny_dir, bench, tmp_path / "ev", n=1, ks=[1], budgets=[2], max_new_tokens=len(ids)),
                 model, tok)
    recs = {r["id"]: r for r in read_records(tmp_path / "ev" / "samples.jsonl")}
    assert recs["p1"]["correct"] is True and recs["p2"]["correct"] is False
    assert recs["p1"]["correct_at_budget"]["2"] is False
    assert recs["p1"]["answer"] == "7"
    idx = recs["p1"]["answer_token_index"]
    # the first standalone "7" is in "=7", before the box
    assert tok.decode(ids[: idx + 1]).endswith("7") and "7" not in tok.decode(ids[:idx])
    assert s["pass_at_k"]["1"]["mean"] == pytest.approx(1 / 3)


def test_batches_keep_a_problems_samples_together():
    from dail.data import Example

    exs = [Example(id=f"q{i}", problem="p", solution="s") for i in range(3)]
    todo = [(ex, j) for ex in exs for j in range(4)]
    batches = E._batches(todo, 8)
    assert [len(b) for b in batches] == [8, 4]
    assert all(len({ex.id for ex, _ in b}) == len(b) // 4 for b in batches)
    assert [len(b) for b in E._batches(todo, 3)] == [3, 3, 3, 3]  # a problem larger than a batch is split
    assert [item for b in E._batches(todo, 5) for item in b] == todo


# ----------------------------------------------------------------------------- benchmark files

def test_load_benchmark_parquet_aime_style(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "aime24.parquet"
    pq.write_table(pa.table({"ID": ["2024-I-1", "2024-I-2"], "Problem": ["Find x.", "Find y."],
                             "Solution": ["...", "..."], "Answer": [204, 25]}), path)
    exs = load_benchmark(path)
    assert [(e.id, e.problem, e.answer) for e in exs] == [("2024-I-1", "Find x.", "204"), ("2024-I-2", "Find y.", "25")]


def test_load_benchmark_gpqa_csv_and_choice_eval(tiny, tiny_dir, tmp_path):
    import csv

    path = tmp_path / "gpqa_diamond.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1",
                                "Incorrect Answer 2", "Incorrect Answer 3", "Explanation"])
        w.writeheader()
        w.writerow({"Record ID": "r1", "Question": "Which is a noble gas?", "Correct Answer": "Neon",
                    "Incorrect Answer 1": "Iron", "Incorrect Answer 2": "Sodium", "Incorrect Answer 3": "Carbon",
                    "Explanation": "Group 18."})
    exs = load_benchmark(path)
    assert exs[0].meta["choices"] == ["Neon", "Iron", "Sodium", "Carbon"] and exs[0].answer == "Neon"
    model, tok = tiny
    s = evaluate(_cfg(tiny_dir, path, tmp_path / "ev", n=8, ks=[1], budgets=[]), model, tok)
    recs = read_records(tmp_path / "ev" / "samples.jsonl")
    assert all(r["kind"] == "choice" and r["gold"] in "ABCD" for r in recs)
    assert len({r["gold"] for r in recs}) > 1  # options shuffled per sample
    assert s["n_problems"] == 1


def test_load_benchmark_errors(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"question": "q1", "answer": 1}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(DataError, match=r"b.jsonl row 2: field 'answer'"):
        load_benchmark(path)
    path.write_text(json.dumps({"text": "q1", "answer": 1}) + "\n")
    with pytest.raises(DataError, match="no problem column"):
        load_benchmark(path)
    assert load_benchmark(path, {"problem": "text"})[0].problem == "q1"


def test_load_benchmark_json_array(tmp_path):
    path = tmp_path / "beyond.json"
    path.write_text(json.dumps([{"problem": "Find n.", "answer": "12"}, {"problem": "Find m.", "answer": "3"}]))
    assert [(e.id, e.answer) for e in load_benchmark(path)] == [("beyond-0", "12"), ("beyond-1", "3")]


def test_two_launched_processes_equal_one(tiny, tiny_dir, bench, tmp_path):
    """A real `accelerate launch` with 2 CPU processes (real grader) merges to the 1-process result."""
    import os
    import subprocess
    import sys

    model, tok = tiny
    one = evaluate(_cfg(tiny_dir, bench, tmp_path / "one", n=2), model, tok)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "dail.cli", "eval", "--model.name", str(tiny_dir), "--model.device", "cpu",
                    "--data.source", str(bench), "--on", "test", "--out", str(tmp_path / "two"), "--n", "2",
                    "--ks", "[1, 2]", "--budgets", "[3, 7]", "--max_new_tokens", "12", "--batch_size", "6",
                    "--temperature", "0.7", "--seed", "5"],
                   check=True, env=env, capture_output=True)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert not list((tmp_path / "two").glob("*rank*"))
    a, b = _by_key(tmp_path / "one" / "samples.jsonl"), _by_key(tmp_path / "two" / "samples.jsonl")
    assert a.keys() == b.keys() and all(a[k]["token_ids"] == b[k]["token_ids"] for k in a)
    assert two["pass_at_k"] == one["pass_at_k"] and two["n_problems"] == 3


# ----------------------------------------------------------------------------- the paper's preset

def test_paper_preset_loads_into_eval_config():
    from pathlib import Path

    from dail.config import build

    cfg = build(EvalConfig, str(Path(__file__).resolve().parents[1] / "configs" / "eval-paper.yaml"))
    assert (cfg.temperature, cfg.top_p, cfg.presence_penalty, cfg.frequency_penalty) == (0.6, 0.95, 1.5, 0.0)
    assert cfg.n == 128 and cfg.budgets == [512, 1024, 2048, 4096] and cfg.max_new_tokens == 4096
    assert cfg.ks == [2 ** i for i in range(8)] and E.ks_for(cfg.n, cfg.ks) == cfg.ks
    assert cfg.model.thinking == "auto" and cfg.force_answer and cfg.force_tokens == 100


# ----------------------------------------------------------------------------- bring your own samples

def _external(path, records, fields=("id", "sample_index", "text", "token_ids", "finish_reason"), extra=None):
    with open(path, "w") as fh:
        for r in records:
            line = {k: r[k] for k in fields if k in r} | (extra(r) if extra else {})
            fh.write(json.dumps(line) + "\n")
    return path


def test_external_samples_give_the_native_summary(tiny, tiny_dir, bench, tmp_path, monkeypatch):
    monkeypatch.setattr(SC, "grade_many", _fake_grade)
    model, tok = tiny
    native = evaluate(_cfg(tiny_dir, bench, tmp_path / "native"), model, tok)
    recs = read_records(tmp_path / "native" / "samples.jsonl")
    src = _external(tmp_path / "engine.jsonl", recs[::-1])  # any order
    ext = evaluate(_cfg(tiny_dir, bench, tmp_path / "ext", samples=str(src), n=8), None, tok)  # n: the file's
    for key in ("pass_at_k", "by_budget", "n", "ks", "budgets", "per_problem_correct", "mean_tokens",
                "finish_reasons", "n_problems", "mean_answer_token_index"):
        assert ext[key] == native[key], key
    assert ext["budget_rule"] == {"cut": 12} and ext["samples_file"] == str(src)
    assert json.loads((tmp_path / "ext" / "summary.json").read_text()) == ext
    assert not any("forced" in k for k in ext)

    # token counts alone: a sample longer than a budget had not finished there and counts as wrong
    src = _external(tmp_path / "counts.jsonl", recs, fields=("id", "sample_index", "text", "n_tokens"))
    ext = evaluate(_cfg(tiny_dir, bench, tmp_path / "counts", samples=str(src)), None, None)
    for b in (3, 7, 12):
        c = {pid: sum(r["correct"] and r["n_tokens"] <= b for r in recs if r["id"] == pid) for pid in ("p1", "p2", "p3")}
        want = np.mean([pass_at_k(4, c[pid], 1) for pid in c])
        assert ext["by_budget"][str(b)]["pass_at_k"]["1"]["mean"] == pytest.approx(want)
    assert ext["budget_rule"] == {"finished": 12} and ext["finish_reasons"] == {"unknown": 12}

    # no token counts: only the full samples, under max_new_tokens
    src = _external(tmp_path / "text.jsonl", recs, fields=("id", "sample_index", "text"))
    ext = evaluate(_cfg(tiny_dir, bench, tmp_path / "text", samples=str(src), budgets=[]), None, None)
    assert ext["pass_at_k"] == native["pass_at_k"] and ext["mean_tokens"] is None


def test_external_forced_answers_are_graded(tiny_dir, bench, tmp_path):
    lines = [{"id": p["id"], "sample_index": j, "text": "still thinking about it", "n_tokens": 12,
              "forced": {"12": f"\n</think>\n\nThe final answer is \\boxed{{{p['answer'] if j == 0 else 0}}}"}}
             for p in PROBLEMS for j in range(2)]
    src = tmp_path / "forced.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = evaluate(_cfg(tiny_dir, bench, tmp_path / "ev", samples=str(src), ks=[1, 2], budgets=[6]), None, None)
    assert s["by_budget"]["12"]["pass_at_k"]["1"]["mean"] == 0.0
    assert s["forced_pass_at_k"]["1"]["mean"] == 0.5 and s["forced_pass_at_k"]["2"]["mean"] == 1.0
    # at 6 tokens nothing was forced (no text for it) and the unfinished samples count as wrong
    assert s["by_budget"]["6"]["forced_pass_at_k"]["2"]["mean"] == 0.0 and s["by_budget"]["6"]["forced_samples"] == 0


def test_external_samples_errors_name_file_line_and_field(tiny_dir, bench, tmp_path):
    good = [{"id": p["id"], "sample_index": j, "text": "\\boxed{7}", "n_tokens": 5} for p in PROBLEMS for j in range(2)]

    def run(lines, raw=None, **kw):
        src = tmp_path / "bad.jsonl"
        src.write_text(raw if raw is not None else "".join(json.dumps(x) + "\n" for x in lines))
        kw = dict(samples=str(src), ks=[1, 2], budgets=[4]) | kw
        return evaluate(_cfg(tiny_dir, bench, tmp_path / "ev", **kw), None, None)

    cases = [
        (good[:2] + [dict(good[2], id="nope")] + good[3:], r"bad.jsonl:3: field 'id': unknown problem id 'nope'"),
        (good[:1] + [{k: v for k, v in good[1].items() if k != "text"}], r":2: field 'text' is missing"),
        (good + [good[4]], r":7: field 'sample_index': \('p3', 0\) is already on line 5"),
        ([dict(g, n_tokens=99) if i == 3 else g for i, g in enumerate(good)],
         r":4: field 'n_tokens': 99 tokens, more than max_new_tokens 12"),
        ([{k: v for k, v in g.items() if k != "n_tokens"} for g in good],
         r":1: field 'n_tokens' \(or 'token_ids'\) is missing"),
        ([dict(g, token_ids=[1, 2]) for g in good], r":1: field 'n_tokens': 5, but token_ids has 2 ids"),
        ([dict(g, forced={"9": "x"}) for g in good], r":1: field 'forced': budget 9 is not one of the budgets"),
        (good[:5], r"bad.jsonl:5: field 'sample_index': problem 'p3' has 1 samples, fewer than the largest k \(2\)"),
        ([g for g in good if g["sample_index"] == 0 or g["id"] != "p2"] + [dict(good[2], sample_index=2)],
         r"field 'sample_index': problem 'p2' has indices \[0, 2\]..., but sample 1 is missing"),
    ]
    for lines, match in cases:
        with pytest.raises(DataError, match=match):
            run(lines)
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a valid JSON record"):
        run(None, raw=json.dumps(good[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"field 'samples': no such file"):
        evaluate(_cfg(tiny_dir, bench, tmp_path / "ev", samples=str(tmp_path / "none.jsonl")), None, None)
    assert not (tmp_path / "ev" / "samples.jsonl").exists()  # nothing was graded from a bad file
    run(good)  # the good file passes


def test_export_prompts_are_the_prompts_dail_samples_from(tiny, tiny_dir, bench, tmp_path, capsys):
    from dail.cli import main
    from dail.prompts import end_of_turn_ids, render, student_messages

    _, tok = tiny
    assert main(["eval", "--model.name", str(tiny_dir), "--model.device", "cpu", "--data.source", str(bench),
                 "--out", str(tmp_path / "ex"), "--n", "4", "--ks", "1,2", "--export-prompts"]) == 0
    assert capsys.readouterr().out.strip().endswith("prompts.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "ex" / "prompts.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["p1", "p2", "p3"]
    for x, p in zip(lines, PROBLEMS):
        assert x["prompt_ids"] == render(tok, student_messages(p["problem"])) and x["sample_indices"] == [0, 1, 2, 3]
        assert tok(x["prompt"], add_special_tokens=False)["input_ids"] == x["prompt_ids"]
    info = json.loads((tmp_path / "ex" / "export.json").read_text())
    assert info["stop_token_ids"] == end_of_turn_ids(tok) and info["n"] == 4 and info["thinking"] is False
    assert info["model"] == str(tiny_dir) and info["adapter"] is None  # a folder an engine can load
    assert not (tmp_path / "ex" / "samples.jsonl").exists()
    # the engine's samples come back through --samples
    src = _external(tmp_path / "engine.jsonl", [{"id": x["id"], "sample_index": j, "text": "\\boxed{12}"}
                                                for x in lines for j in x["sample_indices"]])
    assert main(["eval", "--model.name", str(tiny_dir), "--model.device", "cpu", "--data.source", str(bench),
                 "--out", str(tmp_path / "ex"), "--ks", "1,2", "--samples", str(src)]) == 0
    s = json.loads((tmp_path / "ex" / "summary.json").read_text())
    assert s["per_problem_correct"] == {"p1": 0, "p2": 4, "p3": 0} and s["n"] == 4


def test_export_names_the_embedded_model_by_a_folder_an_engine_can_load():
    from dail.config import ModelConfig
    from dail.models import EMBEDDED_ID, loadable_model

    folder = Path(loadable_model(ModelConfig(name="embedded")))
    assert (folder / "config.json").exists() and any(folder.glob("*.safetensors"))
    assert loadable_model(ModelConfig(name="org/model")) == "org/model" != EMBEDDED_ID
