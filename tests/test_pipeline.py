"""End to end: `dail run` on a tiny random model, and (slow) on the embedded SmolLM2-135M."""

from __future__ import annotations

import json

import pytest

from dail.cli import main
from dail.records import read_records


def _experts(path, start, n):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"p{i}", "problem": f"Tom has {i} apples and buys 4 more. How many?",
                                "solution": f"{i}+4={i + 4}. #### {i + 4}", "answer": str(i + 4)}) + "\n")
    return str(path)


def _check_run_folder(out, n_train_records, n_test, n):
    assert (out / "config.yaml").exists()
    assert len(read_records(out / "synth" / "synthetic.jsonl")) == n_train_records
    assert (out / "train" / "adapter" / "adapter_config.json").exists()
    for name in ("base-test", "trained-test"):
        summary = json.loads((out / "eval" / name / "summary.json").read_text())
        assert summary["n"] == n and summary["n_problems"] == n_test
        assert len(read_records(out / "eval" / name / "samples.jsonl")) == n_test * n
    report = (out / "report.md").read_text()
    assert "base-test" in report and "trained-test" in report and "pass@1" in report
    assert list(out.glob("*.png"))


def test_dail_run_tiny_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(["run", "--out", str(out), "--model.name", str(tiny_dir), "--model.device", "cpu",
               "--train_data.source", _experts(tmp_path / "train.jsonl", 0, 4),
               "--test_data.source", _experts(tmp_path / "test.jsonl", 10, 3),
               "--synth.max_new_tokens", "12", "--synth.samples_per_problem", "1",
               "--train.epochs", "1", "--train.batch_size", "2", "--train.micro_batch_size", "1",
               "--train.report_to", "none",
               "--eval.n", "2", "--eval.ks", "[1,2]", "--eval.max_new_tokens", "12", "--eval.budgets", "[6,12]"])
    assert rc == 0
    _check_run_folder(out, 4, 3, 2)
    # A rerun resumes: nothing is resampled or retrained, and the folder stays consistent.
    stamps = {p: p.stat().st_mtime_ns for p in [out / "synth" / "synthetic.jsonl", out / "train" / "adapter" /
                                                "adapter_model.safetensors", out / "eval" / "trained-test" / "samples.jsonl"]}
    assert main(["run", "--config", str(out / "config.yaml")]) == 0
    _check_run_folder(out, 4, 3, 2)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_dail_run_embedded_model_small(tmp_path):
    out = tmp_path / "run"
    rc = main(["run", "--out", str(out), "--train_data.limit", "2", "--test_data.limit", "2",
               "--synth.max_new_tokens", "32", "--synth.samples_per_problem", "1",
               "--train.epochs", "1", "--train.batch_size", "2", "--train.report_to", "none",
               "--eval.n", "2", "--eval.ks", "[1,2]", "--eval.max_new_tokens", "32", "--eval.budgets", "[16,32]"])
    assert rc == 0
    _check_run_folder(out, 2, 2, 2)
    stats = json.loads((out / "synth" / "stats.json").read_text())
    assert 0.0 < stats["student_token_fraction"] <= 1.0  # tau=0.3: the teacher vetoes some, not all


def test_every_method_reads_the_same_problems():
    # sft used to rebuild its data from train_data.source alone: 50 problems against DAIL's 16,
    # and with seed 3 / test_fraction 0.3, 9 of the 16 test templates were among sft's.
    from dail.config import RunConfig, build
    from dail.data import load_examples
    from dail.pipeline import resolve

    over = {"train_data.seed": 3, "train_data.test_fraction": 0.3, "test_data.seed": 3,
            "test_data.test_fraction": 0.3}
    ids = {}
    for loss in ("contrastive", "nll", "sft"):
        cfg = resolve(build(RunConfig, None, over | {"train.loss": loss}))
        assert cfg.train.expert == cfg.synth.data == cfg.train_data
        ids[loss] = [ex.id for ex in load_examples(cfg.train.expert if loss == "sft" else cfg.synth.data)]
    assert ids["sft"] == ids["contrastive"] == ids["nll"] and len(ids["sft"]) == 16
    test = resolve(build(RunConfig, None, over))
    train_templates = {ex.meta["template"] for ex in load_examples(test.train_data)}
    test_templates = {ex.meta["template"] for ex in load_examples(test.eval.data)}
    assert len(test_templates) == 16 and not train_templates & test_templates


def test_dail_run_says_so_when_synthesis_keeps_nothing(tiny_dir, tmp_path, capsys):
    # With keep: correct, a random model reaches no answer, so nothing is left to train on.
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["run", "--out", str(out), "--model.name", str(tiny_dir), "--model.device", "cpu",
              "--train_data.source", _experts(tmp_path / "train.jsonl", 0, 2),
              "--test_data.source", _experts(tmp_path / "test.jsonl", 10, 2),
              "--synth.max_new_tokens", "8", "--synth.samples_per_problem", "1", "--synth.keep", "correct"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "synthesis kept no trajectory for training (keep: correct; 2 wrong ones" in err
    assert "--synth.keep all" in err
    assert not (out / "train").exists()
