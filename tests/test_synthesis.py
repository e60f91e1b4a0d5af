"""Synthesis stage: records, resume after a crash (torn line, kill -9), sharding, filters, stats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

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
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = out.read_text().count("\n")
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
