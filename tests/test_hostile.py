"""What a hostile user does: two runs on one output, torn and glued files, bad inputs.

Every bad input must end in a one-line error with exit code 2 that names the file, line and
field where there is one, before any model loads; nothing already written may be lost.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import kill_midway

from dail.cli import main
from dail.config import ConfigError, EvalConfig, ModelConfig
from dail.data import DataError, load_benchmark, load_jsonl
from dail.evaluation import evaluate, summarize
from dail.layout import eval_files
from dail.lock import LockError, output_lock
from dail.records import append_record, read_records


def _fail(argv, capsys) -> str:
    """Run the CLI, expect exit code 2, return its one-line message."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert "Traceback" not in err and err.count("\n") == 0, err
    return err


def _bench(tmp_path, n=2):
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return str(path)


def _eval_cfg(tiny_dir, tmp_path, **kw):
    base = dict(model=ModelConfig(name=str(tiny_dir), device="cpu"), out=str(tmp_path / "ev"), n=2, ks=[1, 2],
                max_new_tokens=8)
    from dail.config import DataConfig

    return EvalConfig(data=DataConfig(source=_bench(tmp_path), split="test"), **(base | kw))


# ----------------------------------------------------------------------------- one writer per output

_HOLD = textwrap.dedent("""
    import sys, time
    from dail.lock import output_lock
    with output_lock(sys.argv[1], "test output"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_eval_on_one_folder_is_refused_and_names_the_holder(tiny_dir, tmp_path, capsys):
    cfg = _eval_cfg(tiny_dir, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(eval_files(cfg.out)["lock"])], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = _fail(["eval", "--model.name", str(tiny_dir), "--model.device", "cpu", "--out", cfg.out,
                     "--data.source", cfg.data.source, "--n", "2", "--ks", "1,2", "--max_new_tokens", "8"], capsys)
        assert f"pid {holder.pid}" in err and "being written by" in err
        assert not os.path.exists(eval_files(cfg.out)["samples"])  # nothing was sampled
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing anything: the next run takes over and says so.
    with output_lock(eval_files(cfg.out)["lock"], "x") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_logged(tmp_path, caplog):
    path = tmp_path / "out" / ".lock"
    path.parent.mkdir()
    path.write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": 0}))
    with caplog.at_level(logging.WARNING, logger="dail.lock"), output_lock(path, "x"):
        pass
    assert "took over the lock left by pid 999999 on elsewhere" in caplog.text


def test_one_process_cannot_take_a_lock_twice(tmp_path):
    path = tmp_path / ".lock"
    with output_lock(path, "runs/x: evaluation"):
        with pytest.raises(LockError, match=f"runs/x: evaluation is being written by pid {os.getpid()}"):
            with output_lock(path, "runs/x: evaluation"):
                pass
    with output_lock(path, "again"):  # released on exit
        pass


def test_synth_holds_its_lock(tiny_dir, tmp_path):
    from dail.config import DataConfig, SynthConfig
    from dail.synthesis import synthesize

    experts = tmp_path / "e.jsonl"
    experts.write_text(json.dumps({"id": "a", "problem": "1+1?", "solution": "1+1=2. #### 2", "answer": "2"}) + "\n")
    cfg = SynthConfig(model=ModelConfig(name=str(tiny_dir), device="cpu"), data=DataConfig(source=str(experts)),
                      out=str(tmp_path / "s" / "synthetic.jsonl"), max_new_tokens=4, samples_per_problem=1)
    with output_lock(tmp_path / "s" / "synthetic.jsonl.lock", "held"):
        with pytest.raises(LockError, match="synthesis is being written by"):
            synthesize(cfg)
    assert len(read_records(synthesize(cfg))) == 1


def test_summary_refuses_duplicate_samples():
    recs = [{"id": "a", "sample_index": 0, "correct": True, "correct_at_budget": {"8": True}, "n_tokens": 3,
             "finish_reason": "stop"}] * 2
    with pytest.raises(DataError, match=r"occur more than once \(e.g. \('a', 0\)\)"):
        summarize(recs, ["a"], 1, [1], [8])


# ----------------------------------------------------------------------------- files

def test_a_last_record_without_its_newline_is_closed_before_the_next_append(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}')  # written by another tool, no final newline
    assert read_records(path) == [{"a": 1}, {"a": 2}]
    with open(path, "a", encoding="utf-8") as fh:
        append_record(fh, {"a": 3})
    assert read_records(path) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_expert_file_errors_name_file_line_and_field(tmp_path):
    cases = {
        '{"id": "a", "problem": "x\\ud800", "solution": "s"}': r"e.jsonl:1: field 'problem': character 1 is a lone surrogate",
        "[" * 100_000: r"e.jsonl:1: (JSON nested too deeply|not valid JSON)",
        '{"id": "a", "problem": "p", "solution": "s", "answer": [1]}': r"e.jsonl:1: field 'answer': expected a string or number",
    }
    for line, match in cases.items():
        path = tmp_path / "e.jsonl"
        path.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=match):
            load_jsonl(path)


def test_benchmark_file_errors(tmp_path):
    bad_json = tmp_path / "b.json"
    bad_json.write_text('[\n {"problem": "p", "answer": "1"},\n {"problem": "q" "answer": "2"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"b.json: not valid JSON \(Expecting ',' delimiter at line 3, column 18\)"):
        load_benchmark(bad_json)
    latin = tmp_path / "l.csv"
    latin.write_bytes("problem,answer\nCombien font 2+2 ?,4\nQu'est-ce qu'un caf\xe9 ?,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l.csv:3: not valid UTF-8"):
        load_benchmark(latin)
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffproblem,answer\nWhat is 2+2?,4\n".encode("utf-8"))
    assert [(e.problem, e.answer) for e in load_benchmark(bom)] == [("What is 2+2?", "4")]
    for value in ([4], {"x": 4}, True):
        path = tmp_path / "odd.jsonl"
        path.write_text(json.dumps({"problem": "p", "answer": value}) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"odd.jsonl row 1: field 'answer' \(column 'answer'\): expected a string "
                                            "or number"):
            load_benchmark(path)


# ----------------------------------------------------------------------------- bad inputs, one line each

def test_bad_inputs_end_in_one_line_errors(tiny_dir, tmp_path, capsys):
    bench = _bench(tmp_path)
    ev = ["eval", "--data.source", bench, "--out", str(tmp_path / "ev"), "--n", "2", "--ks", "1,2"]
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    cases = [
        (ev + ["--model.name", str(tmp_path / "nope")], f"config field 'model.name': no such folder {tmp_path / 'nope'}"),
        (ev + ["--model.name", str(no_weights)], "has config.json but no weights"),
        (ev + ["--ks", "[a]"], "'ks': expected a non-empty list of integers"),
        (ev + ["--model.device", "tpu"], "'model.device': expected auto|cpu|cuda|cuda:N|mps"),
        (ev + ["--adapter", str(tmp_path / "missing")], "config field 'adapter': no such folder"),
        (ev + ["--batch_size", "0"], "'batch_size': must be > 0"),
        (ev + ["--batch_size", "-3"], "'batch_size': must be > 0"),
        (ev + ["--grade_timeout", "0"], "'grade_timeout': must be > 0"),
        (ev + ["--grade_timeout", "-1"], "'grade_timeout': must be > 0"),
        (["synth", "--landmarks", "foo"], "config field 'landmarks': unknown landmark extractor 'foo'"),
        (["train", "--lr", "abc"], "config field 'lr': expected float, got 'abc'"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((ev + ["--model.name", str(tiny_dir), "--model.device", "cuda"],
                      "'model.device': 'cuda' asked for, but this torch sees no CUDA device"))
    for argv, expected in cases:
        assert expected in _fail(argv, capsys), argv
    assert not (tmp_path / "ev" / "samples.jsonl").exists()


def test_unknown_target_modules_name_the_real_ones(tiny):
    from dail.models import attach_lora

    model, _ = tiny
    with pytest.raises(ConfigError, match=r"'target_modules': qkv not in the model \(its linear layers: down_proj"):
        attach_lora(model, 4, 8, 0.0, ["q_proj", "qkv"])


def test_generation_is_capped_at_the_model_window(tiny_dir, tmp_path, caplog):
    cfg = _eval_cfg(tiny_dir, tmp_path, max_new_tokens=2000, budgets=[])
    with caplog.at_level(logging.WARNING, logger="dail.evaluation"):
        evaluate(cfg)
    assert "exceeds the model's window of 1024" in caplog.text
    recs = read_records(eval_files(cfg.out)["samples"])
    assert recs and all(r["n_tokens"] + 40 <= 1024 for r in recs)


# ----------------------------------------------------------------------------- the grader

def test_grading_timeouts_are_reported():
    from dail.evaluation import grade_records
    from dail.grading import grade_many

    late: list[int] = []
    out = grade_many(["\\boxed{1}", "\\boxed{9^{9^{9^{9}}}}"], ["1", "5"], timeout=1.0, timed_out=late)
    assert out == [True, False] and late == [1]

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "x"

    recs = [{"id": "a", "sample_index": 0, "kind": "math", "gold": "5", "text": "\\boxed{9^{9^{9^{9}}}}",
             "n_tokens": 3, "token_ids": [1, 2, 3], "finish_reason": "stop", "answer_token_index": 0}]
    grade_records(recs, [3], Tok(), timeout=1.0)
    assert recs[0]["grade_timeouts"] == 1 and recs[0]["correct"] is False
    summary = summarize(recs, ["a"], 1, [1], [3])
    assert (summary["grade_timeouts"], summary["samples_with_grade_timeout"]) == (1, 1)


_CALLER = textwrap.dedent("""
    import os, sys
    from dail.grading import _POOL, grade_many
    grade_many(["\\\\boxed{1}"], ["2"], timeout=60.0)  # start the grading process and its workers
    print(_POOL.proc.pid, flush=True)
    grade_many(["\\\\boxed{9^{9^{9^{9}}}}"] * 2, ["5"] * 2, timeout=120.0)  # a long batch
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead, only not yet reaped
        return fh.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grader_processes_die_with_their_caller():
    import signal
    import time

    caller = subprocess.Popen([sys.executable, "-c", _CALLER], stdout=subprocess.PIPE, text=True)
    server = int(caller.stdout.readline())
    time.sleep(1.0)  # the long batch is running in the workers
    workers = [int(p) for p in open(f"/proc/{server}/task/{server}/children").read().split()]
    assert workers
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in [server, *workers]):
        time.sleep(0.1)
    assert not any(_alive(p) for p in [server, *workers])  # before: they ran until the batch ended


# ----------------------------------------------------------------------------- crashes

def test_eval_killed_then_rerun_counts_every_sample_once(tiny_dir, tmp_path):
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n"
                             for i in range(12)), encoding="utf-8")
    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "dail.cli", "eval", "--model.name", str(tiny_dir), "--model.device", "cpu",
           "--data.source", str(bench), "--out", str(out), "--n", "4", "--ks", "1,4", "--max_new_tokens", "24",
           "--batch_size", "2", "--temperature", "1.0"]
    samples = out / "samples.jsonl"
    partial, pid = kill_midway(cmd, samples, 4)
    assert 4 <= partial < 48, "the run should have been killed midway"
    # The dead process's lock file is still there; the rerun takes it over and finishes.
    assert json.loads((out / ".lock").read_text())["pid"] == pid
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    keys = [(r["id"], r["sample_index"]) for r in read_records(samples)]
    assert len(keys) == len(set(keys)) == 48
    assert json.loads((out / "summary.json").read_text())["n_samples"] == 48
