"""Synthesis stage: records, resume after a crash (torn line, kill -9), sharding, filters, stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import kill_midway

from dail.config import DataConfig, ModelConfig, SynthConfig
from dail.records import read_records
from dail.synthesis import synthesize


def _experts(path, n=6, answers=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"id": f"p{i}", "problem": f"Tom has {i} apples and buys 4 more.", "solution": f"{i}+4={i + 4}. #### {i + 4}"}
            if answers:
                rec["answer"] = str(i + 4)
            f.write(json.dumps(rec) + "\n")
    return path


def _cfg(tiny_dir, tmp_path, **kw):
    base = dict(model=ModelConfig(name=str(tiny_dir), device="cpu"),
                data=DataConfig(source=str(_experts(tmp_path / "experts.jsonl"))),
                out=str(tmp_path / "s" / "synthetic.jsonl"), max_new_tokens=12, batch_size=4,
                samples_per_problem=2, temperature=1.0, tau=0.02)
    return SynthConfig(**(base | kw))


def _by_key(records):
    return {(r["id"], r["sample_index"]): r["trajectory_ids"] for r in records}


def test_records_have_the_documented_fields_and_stats(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path)
    out = synthesize(cfg)
    recs = read_records(out)
    assert len(recs) == 12 and len(_by_key(recs)) == 12
    for r in recs:
        n = len(r["trajectory_ids"])
        assert len(r["teacher_mask"]) == len(r["p_student"]) == len(r["p_teacher"]) == len(r["q"]) == n
        assert r["finish_reason"] in ("stop", "length") and r["correct"] in (True, False)
        assert r["prompt_version"] and r["mode"] == "mixed" and r["landmarks"]
    stats = json.loads((out.parent / "stats.json").read_text())
    tm = [m for r in recs for m in r["teacher_mask"]]
    assert stats["student_token_fraction"] == round(1 - sum(tm) / len(tm), 4)
    assert stats["trajectories"] == 12 and stats["graded"] == 12
    assert (out.parent / "student_fraction.png").stat().st_size > 1000


def test_resume_after_torn_line_yields_each_record_once(tiny_dir, tmp_path):
    ref = read_records(synthesize(_cfg(tiny_dir, tmp_path / "ref")))
    cfg = _cfg(tiny_dir, tmp_path / "crash")
    out = synthesize(cfg)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:40])  # 5 records and a torn sixth
    with pytest.warns(UserWarning, match="torn last line"):
        synthesize(cfg)
    recs = read_records(out)
    assert len(recs) == 12 and _by_key(recs) == _by_key(ref)


def test_kill_9_then_rerun_gives_every_record_exactly_once(tiny_dir, tmp_path):
    _experts(tmp_path / "experts.jsonl", n=40, answers=False)
    out = tmp_path / "k" / "synthetic.jsonl"
    cmd = [sys.executable, "-m", "dail.cli", "synth", "--model.name", str(tiny_dir), "--model.device", "cpu",
           "--data.source", str(tmp_path / "experts.jsonl"), "--out", str(out), "--max_new_tokens", "48",
           "--batch_size", "1", "--samples_per_problem", "2", "--tau", "0.02", "--temperature", "1.0"]
    partial, _ = kill_midway(cmd, out, 3)
    assert 3 <= partial < 80, "the run should have been killed midway"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = read_records(out)
    keys = [(r["id"], r["sample_index"]) for r in recs]
    assert len(keys) == len(set(keys)) == 80

    ref = _cfg(tiny_dir, tmp_path / "ref", data=DataConfig(source=str(tmp_path / "experts.jsonl")),
               max_new_tokens=48, batch_size=8)
    assert _by_key(read_records(synthesize(ref))) == _by_key(recs)  # same seeds, any batching


def test_two_processes_give_the_same_records_as_one(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path)
    one = read_records(synthesize(cfg))
    out2 = tmp_path / "two" / "synthetic.jsonl"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "dail.cli", "synth", "--model.name", str(tiny_dir), "--model.device", "cpu",
                    "--data.source", cfg.data.source, "--out", str(out2), "--max_new_tokens", "12",
                    "--batch_size", "4", "--samples_per_problem", "2", "--tau", "0.02", "--temperature", "1.0"],
                   check=True, env=env, capture_output=True)
    two = read_records(out2)
    assert len(two) == 12 and _by_key(two) == _by_key(one)
    assert not list(out2.parent.glob("*rank*"))  # shards merged and removed


def test_keep_correct_routes_wrong_trajectories_aside(tiny_dir, tmp_path):
    out = synthesize(_cfg(tiny_dir, tmp_path, keep="correct"))
    kept, rejected = read_records(out), read_records(out.with_name("synthetic.rejected.jsonl"))
    assert len(kept) + len(rejected) == 12
    assert all(r["correct"] for r in kept) and not any(r["correct"] for r in rejected)


def test_direct_mode_is_all_teacher_and_too_long_contexts_are_skipped(tiny_dir, tmp_path):
    out = synthesize(_cfg(tiny_dir, tmp_path, mode="direct"))
    assert all(set(r["teacher_mask"]) == {1} and r["mode"] == "direct" for r in read_records(out))
    out = synthesize(_cfg(tiny_dir, tmp_path / "long", max_new_tokens=5000))
    skipped = read_records(out.with_name("synthetic.skipped.jsonl"))
    assert len(skipped) == 12 and "exceeds the model window of 1024" in skipped[0]["reason"]
    assert read_records(out) == []


def test_rerun_with_other_sampling_settings_is_refused_and_more_samples_are_added(tiny_dir, tmp_path):
    from dail.config import ConfigError

    out = synthesize(_cfg(tiny_dir, tmp_path, samples_per_problem=1))
    before = out.read_text()
    with pytest.raises(ConfigError, match="different 'tau'"):
        synthesize(_cfg(tiny_dir, tmp_path, samples_per_problem=1, tau=0.5))
    assert out.read_text() == before  # nothing written is lost
    synthesize(_cfg(tiny_dir, tmp_path, samples_per_problem=2))
    recs = read_records(out)
    assert len(recs) == 12 and out.read_text().startswith(before)


# ----------------------------------------------------------------------------- proofs, long solutions, per problem

PROOF = ("We show that $n^2 \\ge n$ for every integer $n \\ge 1$. Since $n \\ge 1$, multiplying by $n$ gives "
         "$n^2 \\ge n$. Hence the claim holds. $\\blacksquare$")


def _write_experts(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_problems_without_answers_are_kept_ungraded_and_train(tiny_dir, tmp_path):
    from dail.config import TrainConfig
    from dail.models import load_tokenizer
    from dail.training import build_sequences

    experts = _write_experts(tmp_path / "proofs.jsonl", [
        {"id": f"pr{i}", "problem": f"Prove that {i} squared is at least {i}.", "solution": PROOF} for i in range(3)]
        + [{"id": "q", "problem": "Tom has 3 apples and buys 4 more.", "solution": "3+4=7. #### 7", "answer": "7"}])
    out = synthesize(_cfg(tiny_dir, tmp_path, data=DataConfig(source=str(experts)), keep="correct",
                          landmarks="proof"))
    kept, rejected = read_records(out), read_records(out.with_name("synthetic.rejected.jsonl"))
    proofs = [r for r in kept if r["id"].startswith("pr")]
    assert len(proofs) == 6 and all(r["correct"] is None and r["answer"] is None for r in proofs)  # even with keep=correct
    assert all(r["landmarks_kind"] == "proof" and r["landmarks"][-1] == "Hence the claim holds." for r in proofs)
    assert not any(r["id"].startswith("pr") for r in rejected)
    graded = [r for r in kept + rejected if r["id"] == "q"]
    assert len(graded) == 2 and all(r["correct"] in (True, False) for r in graded)
    stats = json.loads((out.parent / "stats.json").read_text())
    assert stats["ungraded"] == 6 and stats["graded"] == 2
    # Training reads the ungraded records like any other.
    seqs = build_sequences(TrainConfig(data=str(out), max_length=4096), load_tokenizer(ModelConfig(name=str(tiny_dir))))
    assert {s.problem for s in seqs} >= {"pr0", "pr1", "pr2"} and len(seqs) == len(kept)
    assert all(set(s.contexts) == {"student", "teacher", "negative"} for s in seqs)


def test_shorten_solution_cuts_at_the_best_boundary_that_fits():
    from dail.synthesis import shorten_solution

    def fits_in(n):
        return lambda text: len(text) <= n

    s = "Solution 1: a = 2.\n\nSo b = 3.\n\nSolution 2: another way, much longer.\n\n**Solution 3.** A third."
    assert shorten_solution(s, fits_in(len(s) - 1)) == (s[:s.index("**Solution 3")].rstrip(), "solution heading")
    assert shorten_solution(s, fits_in(40)) == ("Solution 1: a = 2.\n\nSo b = 3.", "solution heading")
    assert shorten_solution(s, fits_in(25)) == ("Solution 1: a = 2.", "paragraph")  # no heading cut fits
    t = "## Setup\nLet x = 1.\n## Finish\nThen y = 2 and we are done."
    assert shorten_solution(t, fits_in(30)) == ("## Setup\nLet x = 1.", "section")
    u = "x" * 100  # no boundary at all: halve until it fits
    assert shorten_solution(u, fits_in(30)) == ("x" * 25, "halved")
    assert shorten_solution(u, lambda text: False) is None


def test_over_long_solutions_are_shortened_to_fit_or_skipped(tiny, tmp_path):
    from dail.prompts import render, teacher_messages

    model, tok = tiny
    short_part = "Solution 1: 3+4=7. #### 7"
    solution = short_part + "\n\nSolution 2: " + "count the apples one by one, " * 60 + "and get 7."
    experts = _write_experts(tmp_path / "long.jsonl", [
        {"id": "long", "problem": "Tom has 3 apples and buys 4 more.", "solution": solution, "answer": "7"},
        {"id": "fine", "problem": "Tom has 1 apple and buys 4 more.", "solution": "1+4=5. #### 5", "answer": "5"}])
    fitting = len(render(tok, teacher_messages("Tom has 3 apples and buys 4 more.", short_part)))
    full = len(render(tok, teacher_messages("Tom has 3 apples and buys 4 more.", solution)))
    model.config.max_position_embeddings = fitting + 12 + 2  # the cut fits, the full solution does not
    assert full > fitting + 14
    cfg = _cfg(None, tmp_path, model=ModelConfig(name="unused", device="cpu"), data=DataConfig(source=str(experts)))
    out = synthesize(cfg, sampler=model, tokenizer=tok)
    recs = {(r["id"], r["sample_index"]): r for r in read_records(out)}
    assert len(recs) == 4
    cut = recs[("long", 0)]
    assert cut["solution"] == short_part and cut["shortened"]["at"] == "solution heading"
    assert cut["shortened"]["full_solution"] == solution and cut["shortened"]["kept_chars"] == len(short_part)
    assert cut["landmarks"] == ["7"]  # from the solution the teacher saw
    assert "shortened" not in recs[("fine", 0)]
    assert json.loads((out.parent / "stats.json").read_text())["shortened"] == 1

    # skip: today's behaviour, the problem is listed as skipped; it is a resume key.
    from dail.config import ConfigError

    with pytest.raises(ConfigError, match="different 'long_solutions'"):
        synthesize(SynthConfig(**(cfg.__dict__ | {"long_solutions": "skip"})), sampler=model, tokenizer=tok)
    out2 = synthesize(_cfg(None, tmp_path / "skip", model=ModelConfig(name="unused", device="cpu"),
                           data=DataConfig(source=str(experts)), long_solutions="skip"), sampler=model, tokenizer=tok)
    assert {r["id"] for r in read_records(out2)} == {"fine"}
    assert {r["id"] for r in read_records(out2.with_name("synthetic.skipped.jsonl"))} == {"long"}


def test_select_per_problem_rules():
    from dail.synthesis import select_per_problem

    recs = [{"id": "a", "sample_index": i, "correct": c} for i, c in [(2, True), (0, False), (1, True)]]
    recs += [{"id": "b", "sample_index": i, "correct": False} for i in range(2)]
    recs += [{"id": "c", "sample_index": i, "correct": None} for i in (1, 0)]
    chosen, left = select_per_problem(recs, "first")
    assert [(r["id"], r["sample_index"]) for r in chosen] == [("a", 1), ("c", 0)]  # b: none correct
    assert len(left) == len(recs) - 2
    assert select_per_problem(recs, "all") == (recs, [])
    many = [{"id": f"p{j}", "sample_index": i, "correct": None} for j in range(20) for i in range(4)]
    chosen, _ = select_per_problem(many, "random", k=2, seed=0)
    assert sorted({r["id"] for r in chosen}) == sorted({r["id"] for r in many})
    assert all(sum(r["id"] == f"p{j}" for r in chosen) == 2 for j in range(20))
    again, _ = select_per_problem(list(reversed(many)), "random", k=2, seed=0)  # any input order, same draw
    assert sorted(map(_key2, again)) == sorted(map(_key2, chosen))
    other, _ = select_per_problem(many, "random", k=2, seed=1)
    assert sorted(map(_key2, other)) != sorted(map(_key2, chosen))
    chosen, _ = select_per_problem(many[:4], "random", k=9, seed=0)
    assert len(chosen) == 4  # all of them where a problem has fewer than k


def _key2(r):
    return (r["id"], r["sample_index"])


def test_per_problem_reshapes_one_synthesis_run_without_decoding_again(tiny_dir, tmp_path, monkeypatch):
    import zlib

    from dail import synthesis

    # The tiny random model is almost never right: grade by a fixed hash of the text instead, so
    # that some problems have correct samples, at various indices.
    monkeypatch.setattr(synthesis, "grade_many",
                        lambda texts, golds, timeout, **kw: [zlib.crc32(t.encode()) % 3 == 0 for t in texts])
    full = read_records(synthesize(_cfg(tiny_dir, tmp_path / "all", samples_per_problem=3)))
    out = synthesize(_cfg(tiny_dir, tmp_path, samples_per_problem=3, per_problem="first"))
    kept, aside = read_records(out), read_records(out.with_name("synthetic.unselected.jsonl"))
    right = {r["id"] for r in full if r["correct"]}
    assert 2 <= len(right) < 6 and any(r["correct"] and r["sample_index"] > 0 for r in full)
    assert {r["id"] for r in kept} == right and len(kept) == len(right)
    for r in kept:  # the first correct sample of its problem
        assert r["correct"] and r["sample_index"] == min(x["sample_index"] for x in full if x["id"] == r["id"]
                                                           and x["correct"])
    assert sorted(map(_key2, kept + aside)) == sorted(map(_key2, full))
    stats = json.loads((out.parent / "stats.json").read_text())
    assert stats["trajectories"] == 18 and stats["kept"] == len(kept) and stats["unselected"] == len(aside)

    out = synthesize(_cfg(tiny_dir, tmp_path, samples_per_problem=3, per_problem="random", per_problem_k=2))
    kept = read_records(out)
    assert len(kept) == 12 and all(sum(r["id"] == pid for r in kept) == 2 for pid in {r["id"] for r in full})
    assert json.loads((out.parent / "stats.json").read_text())["tokens_this_run"] == 0  # reshaped, not decoded

    out = synthesize(_cfg(tiny_dir, tmp_path, samples_per_problem=3))  # back to all
    assert read_records(out) == full and not out.with_name("synthetic.unselected.jsonl").exists()


def test_rounds_stop_at_the_first_correct_and_give_the_same_training_set(tiny_dir, tmp_path, monkeypatch):
    import zlib

    from dail import synthesis
    from dail.config import ConfigError

    monkeypatch.setattr(synthesis, "grade_many",
                        lambda texts, golds, timeout, **kw: [zlib.crc32(t.encode()) % 3 == 0 for t in texts])
    whole = read_records(synthesize(_cfg(tiny_dir, tmp_path / "whole", samples_per_problem=4, per_problem="first",
                                         keep="correct")))
    out = synthesize(_cfg(tiny_dir, tmp_path / "rounds", samples_per_problem=4, per_problem="first", keep="correct",
                          round_size=1))
    assert _by_key(read_records(out)) == _by_key(whole)  # the same first correct trajectory per problem
    decoded = read_records(out) + read_records(out.with_name("synthetic.rejected.jsonl"))
    for r in whole:  # nothing sampled past a problem's first correct trajectory ...
        assert max(x["sample_index"] for x in decoded if x["id"] == r["id"]) == r["sample_index"]
    unsolved = {f"p{i}" for i in range(6)} - {r["id"] for r in whole}
    assert all(sum(x["id"] == pid for x in decoded) == 4 for pid in unsolved)  # ... and all of it where none is
    stats = json.loads((out.parent / "stats.json").read_text())["rounds"]
    assert stats["trajectories_decoded"] == len(decoded) < stats["without_rounds"] == 24
    assert stats["saved_fraction"] == pytest.approx(1 - len(decoded) / 24)
    with pytest.raises(ConfigError, match="'round_size': rounds stop at a problem's first correct"):
        SynthConfig(round_size=2)  # per_problem all keeps every trajectory: nothing to stop at


def test_new_settings_are_checked():
    from dail.config import ConfigError, resume_keys

    with pytest.raises(ConfigError, match="'long_solutions': expected shorten|skip"):
        SynthConfig(long_solutions="truncate")
    with pytest.raises(ConfigError, match="'per_problem': expected all|first|random"):
        SynthConfig(per_problem="best")
    with pytest.raises(ConfigError, match="'per_problem_k': must be an integer > 0"):
        SynthConfig(per_problem="random", per_problem_k=0)
    # long_solutions changes what is decoded; per_problem only reshapes what was decoded.
    assert "long_solutions" in resume_keys(SynthConfig) and "per_problem" not in resume_keys(SynthConfig)
