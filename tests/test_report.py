"""report.md and plots from fake run folders (the layout `dail run` writes)."""

from __future__ import annotations

import json

import numpy as np

from dail.evaluation import pass_at_k, summarize
from dail.report import collect, write_report


def _summary(label, split, p_correct, n=8, n_problems=12, seed=0):
    """A summary built by the real summarize() from simulated grades."""
    rng = np.random.default_rng(seed)
    recs, ids = [], [f"q{i}" for i in range(n_problems)]
    for pid in ids:
        p = rng.uniform(0, 2 * p_correct)
        for j in range(n):
            length = int(rng.integers(40, 256))
            first = int(rng.integers(20, 256))  # token where it would first be right
            ok = rng.random() < p
            recs.append({"id": pid, "sample_index": j, "n_tokens": length, "finish_reason": "stop",
                         "correct": ok, "answer_token_index": None,
                         "correct_at_budget": {str(b): ok and first <= b for b in (64, 128, 256)}})
    s = summarize(recs, ids, n, [1, 2, 4, 8], [64, 128, 256], seed=seed)
    return {"label": label, "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "dataset": "gsm-symbolic",
            "split": split, **s}


def _run(tmp_path, name, trained_gain=0.1, train=True):
    run = tmp_path / name
    evals = {"base-test": ("base", "test", 0.2), "trained-test": ("trained", "test", 0.2 + trained_gain)}
    if train:
        evals |= {"base-train": ("base", "train", 0.25), "trained-train": ("trained", "train", 0.5)}
    for i, (ev, (label, split, p)) in enumerate(evals.items()):
        (run / "eval" / ev).mkdir(parents=True)
        (run / "eval" / ev / "summary.json").write_text(json.dumps(_summary(label, split, p, seed=i)))
    (run / "synth").mkdir()
    (run / "synth" / "stats.json").write_text(json.dumps({"student_token_fraction": 0.81, "trajectories": 32,
                                                          "finish_reasons": {"stop": 30, "length": 2}}))
    return run


def test_one_run_base_versus_trained(tmp_path):
    run = _run(tmp_path, "default")
    path = write_report([run], run)
    text = path.read_text()
    assert path == run / "report.md"
    for label in ("default/base-test", "default/trained-test", "default/base-train", "default/trained-train"):
        assert f"`{label}`" in text
    assert "pass@8" in text and "## By token budget" in text and "## Train versus test" in text
    assert "student_token_fraction: 0.81" in text and "finish_reasons: stop=30, length=2" in text
    assert "SmolLM2" in text.splitlines()[0] and "gsm-symbolic" in text.splitlines()[0]
    s = json.loads((run / "eval" / "base-test" / "summary.json").read_text())
    p1 = s["pass_at_k"]["1"]
    assert f"{p1['mean']:.3f} [{p1['ci_low']:.2f}, {p1['ci_high']:.2f}]" in text
    for png in ("pass_at_k.png", "pass_at_budget.png"):
        assert (run / png).stat().st_size > 10_000
        assert f"]({png})" in text


def test_several_runs_and_a_bare_eval_folder(tmp_path):
    a, b = _run(tmp_path, "tau0.1", train=False), _run(tmp_path, "tau0.3", trained_gain=0.2, train=False)
    labels = [label for label, _ in collect([a, b])]
    assert labels == ["tau0.1/base-test", "tau0.1/trained-test", "tau0.3/base-test", "tau0.3/trained-test"]
    out = tmp_path / "cmp"
    text = write_report([a, b], out, title="tau sweep").read_text()
    assert text.startswith("# tau sweep")
    assert "Train versus test" not in text
    # a folder that is itself an eval output
    bare = a / "eval" / "base-test"
    assert [label for label, _ in collect([bare])] == ["base-test"]
    assert write_report([tmp_path / "empty"], tmp_path / "empty").read_text().count("No evaluation found") == 1


def test_fake_summary_is_consistent():
    s = _summary("base", "test", 0.3)
    c = s["per_problem_correct"]["q0"]
    assert abs(s["pass_at_k"]["1"]["mean"] - np.mean([pass_at_k(8, v, 1) for v in s["per_problem_correct"].values()])) \
        < 1e-12 and 0 <= c <= 8
