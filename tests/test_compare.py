"""`dail compare` and `dail sweep` on the tiny model; the paired statistics against hand computations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dail.cli import main
from dail.compare import method_runs, split_data
from dail.config import CompareConfig, ConfigError, build
from dail.data import load_examples
from dail.layout import RunFolder, eval_files
from dail.records import read_records, write_records
from dail.stats import paired_difference, per_problem_pass, resample_indices, transitions


def test_paired_difference_by_hand():
    a, b = np.array([1.0, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])  # differences 1, 0, -0.5
    idx = np.array([[0, 1, 2], [0, 0, 0], [2, 2, 1], [1, 1, 1]])
    # resampled mean differences: (1+0-0.5)/3 = 1/6, 1, (-0.5-0.5+0)/3 = -1/3, 0
    d = paired_difference(a, b, idx, confidence=0.5)  # quartiles of {-1/3, 0, 1/6, 1}
    assert d["mean"] == pytest.approx(0.5 / 3)
    assert d["ci_low"] == pytest.approx(np.quantile([-1 / 3, 0, 1 / 6, 1], 0.25))
    assert d["ci_high"] == pytest.approx(np.quantile([-1 / 3, 0, 1 / 6, 1], 0.75))
    # The same index sets serve every method: a method equal to b differs by exactly 0.
    assert paired_difference(b, b, idx) == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_resampling_is_shared_and_seeded():
    assert (resample_indices(5, 10, seed=3) == resample_indices(5, 10, seed=3)).all()
    assert resample_indices(5, 10, seed=3).shape == (10, 5)


def test_per_problem_pass_and_transitions():
    assert per_problem_pass([0, 2, 4], 4, 2).tolist() == pytest.approx([0.0, 1 - 1 / 6, 1.0])
    assert transitions([0, 0, 3, 1], [2, 0, 0, 1]) == {"unsolved_to_solved": 1, "solved_to_unsolved": 1}


def test_splits_are_cut_by_one_rule():
    cfg = CompareConfig()
    ids = {s: [e.meta["template"] for e in load_examples(split_data(cfg, s))] for s in ("train", "near", "far", "val")}
    assert ids["near"] == ids["train"]  # the same templates, new instances
    assert not set(ids["train"]) & set(ids["far"]) and not set(ids["train"]) & set(ids["val"])
    assert not set(ids["val"]) & set(ids["far"])
    near = load_examples(split_data(cfg, "near"))
    assert sum(a.problem != b.problem for a, b in zip(load_examples(cfg.data), near)) >= len(near) - 2


def test_star_samples_set_the_star_attempts_only():
    from dail.compare import _synth_cfg

    cfg = build(CompareConfig, None, {"synth.samples_per_problem": 32, "star_samples": 4})
    assert _synth_cfg(cfg, "star").samples_per_problem == 4
    assert _synth_cfg(cfg, "mixed").samples_per_problem == _synth_cfg(cfg, "direct").samples_per_problem == 32
    assert _synth_cfg(build(CompareConfig, None, {"synth.samples_per_problem": 8}), "star").samples_per_problem == 8
    with pytest.raises(ConfigError, match="star_samples"):
        build(CompareConfig, None, {"star_samples": -1})


def test_compare_config_refuses_what_it_sets_itself():
    with pytest.raises(ConfigError, match="'methods': unknown"):
        build(CompareConfig, None, {"methods": "base,ppo"})
    with pytest.raises(SystemExit):
        main(["compare", "--train.loss", "nll"])
    runs = method_runs(build(CompareConfig, None, {"methods": "base,sft,dail", "seeds": "0,1"}))
    assert runs == [("base", "base", 0), ("sft", "sft", 0), ("dail", "dail", 0), ("dail-s1", "dail", 1)]


def _tiny_argv(command: str, tiny_dir: Path, out: Path, *flags: str) -> list[str]:
    """`dail compare` or `dail sweep` on the tiny model: one short epoch of training, 2 samples per
    problem; `flags` are the test's own."""
    return [command, "--out", str(out), "--model.name", str(tiny_dir), "--model.device", "cpu",
            "--train.epochs", "1", "--train.batch_size", "2", "--train.micro_batch_size", "1",
            "--train.report_to", "none", "--train.max_length", "4096", "--eval.n", "2", "--eval.ks", "1,2",
            *flags]


def test_compare_tiny_end_to_end_and_resume(tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = _tiny_argv("compare", tiny_dir, out,
                      "--data.limit", "2", "--test_limit", "2", "--methods", "base,sft,nll,dail", "--seeds", "0,1",
                      "--seed_methods", "dail", "--splits", "train,near,far", "--split_n", "{near: 1}",
                      "--synth.max_new_tokens", "8", "--synth.samples_per_problem", "1",
                      "--eval.max_new_tokens", "8", "--eval.budgets", "4,8")
    assert main(argv) == 0
    # Ordinary run folders: one per method (and seed), the base once, the mixed set shared.
    for name in ("sft", "nll", "dail", "dail-s1"):
        assert (out / name / "train" / "adapter" / "adapter_config.json").exists()
        for split in ("train", "near", "far"):
            assert (out / name / "eval" / split / "summary.json").exists()
    assert sorted(p.name for p in (out / "data").iterdir()) == ["mixed"]
    assert not (out / "base" / "train").exists()
    comp = json.loads((out / "comparison.json").read_text())
    far = comp["splits"]["far"]
    assert far["n_problems"] == 2 and set(far["runs"]) == {"base", "sft", "nll", "dail", "dail-s1"}
    assert set(far["runs"]["dail"]["vs"]) == {"base", "nll"} and set(far["runs"]["nll"]["vs"]) == {"base", "dail"}
    # The paired difference equals a hand computation from the two summaries' per-problem counts.
    base = json.loads((out / "base" / "eval" / "far" / "summary.json").read_text())
    sft = json.loads((out / "sft" / "eval" / "far" / "summary.json").read_text())
    ids = list(base["per_problem_correct"])
    want = np.mean(per_problem_pass([sft["per_problem_correct"][i] for i in ids], 2, 1)
                   - per_problem_pass([base["per_problem_correct"][i] for i in ids], 2, 1))
    assert far["runs"]["sft"]["vs"]["base"]["8"]["1"]["mean"] == pytest.approx(want)
    report = (out / "report.md").read_text()
    assert report.index("## pass@k") < report.index("## Plots") and "Training-seed variation" in report
    # Each split is read at its own ks: near has n = 1 (split_n), the others n = 2.
    assert comp["splits"]["near"]["ks"] == [1] and "near pass@1 | near pass@1" in report
    assert "| dail | near | 1 / 1 |" in report and "| dail | far | 1 / 2 |" in report
    for png in ("compare_passk.png", "compare_delta_base.png", "compare_gap.png", "compare_budget.png"):
        assert (out / png).stat().st_size > 10_000
    # A rerun resumes: nothing is resampled or retrained.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".jsonl", ".safetensors")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_compare_does_not_retrain_a_method_whose_evaluations_are_done(tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = _tiny_argv("compare", tiny_dir, out, "--data.limit", "2", "--test_limit", "2", "--methods", "base,sft",
                      "--splits", "train,far", "--eval.max_new_tokens", "8", "--eval.budgets", "4,8")
    assert main(argv) == 0
    samples = {split: eval_files(out / "sft" / "eval" / split)["samples"] for split in ("train", "far")}
    stamps = {p: p.stat().st_mtime_ns for p in samples.values()}
    # Adapters are weights, often not kept: a method whose evaluations are all done is not trained
    # again without its adapter, and stays in the report ...
    shutil.rmtree(out / "sft" / "train")
    assert main(argv) == 0
    assert not (out / "sft" / "train").exists() and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert set(json.loads((out / "comparison.json").read_text())["splits"]["far"]["runs"]) == {"base", "sft"}
    # ... but one sample missing from one split is work left, which needs the adapter again.
    write_records(samples["far"], read_records(samples["far"])[:-1])
    assert main(argv) == 0
    assert (out / "sft" / "train" / "adapter" / "adapter_config.json").exists()
    assert len(read_records(samples["far"])) == 4


def test_sweep_tiny(tiny_dir, tmp_path):
    out = tmp_path / "sweep"
    assert main(_tiny_argv("sweep", tiny_dir, out,
                           "--data.limit", "2", "--val_limit", "2", "--taus", "0,2", "--gammas", "0,0.5",
                           "--default_tau", "2", "--default_gamma", "0",
                           "--synth.max_new_tokens", "6", "--synth.samples_per_problem", "1",
                           "--eval.max_new_tokens", "6")) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert len(result["pass_at_k"]) == 2 and all(v is not None for row in result["pass_at_k"] for v in row)
    # tau 0 is the pure student, tau 2 the pure teacher.
    assert result["synthesis"]["0"]["student_token_fraction"] == 1.0
    assert result["synthesis"]["2"]["student_token_fraction"] == 0.0
    assert (out / "sweep_heatmap.png").exists() and (out / "sweep_tau.png").exists()
    assert result["default"] == {"tau": 2.0, "gamma": 0.0} and result["chosen"]["why"]
    assert "**Chosen: tau" in (out / "report.md").read_text()


def test_sweep_choice_keeps_the_default_unless_validation_separates():
    from dail.sweep import choose_cell
    default = (0.3, 0.1)
    # A tie everywhere (the floor): the default stays, and says why.
    tie = choose_cell({(0.3, 0.1): [0] * 10, (0.6, 0.0): [0] * 10}, n=4, k=4, default=default)
    assert (tie["tau"], tie["gamma"]) == default and tie["why"].startswith("1 of the other 1 cells tie")
    # One extra solved problem of 10 is inside the noise: the best cell is named, the default kept.
    noisy = choose_cell({(0.3, 0.1): [0] * 10, (0.6, 0.0): [1] + [0] * 9}, n=4, k=4, default=default)
    assert (noisy["tau"], noisy["gamma"]) == default and noisy["best"] == {"tau": 0.6, "gamma": 0.0}
    assert noisy["difference_to_default"]["mean"] == pytest.approx(0.1)
    assert noisy["difference_to_default"]["ci_low"] <= 0
    # Every problem solved against none: the CI is [1, 1] and the best cell is chosen.
    clear = choose_cell({(0.3, 0.1): [0] * 10, (0.6, 0.0): [4] * 10}, n=4, k=4, default=default)
    assert (clear["tau"], clear["gamma"]) == (0.6, 0.0)
    assert clear["difference_to_default"] == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    alone = choose_cell({(0.3, 0.1): [4] * 10, (0.6, 0.0): [0] * 10}, n=4, k=4, default=default)
    assert (alone["tau"], alone["gamma"]) == default and alone["why"].startswith("the default cell has the highest")
    with pytest.raises(ValueError, match="default cell"):
        choose_cell({(0.6, 0.0): [0]}, n=4, k=4, default=default)


def test_sweep_config_needs_its_default_in_the_grid():
    from dail.config import SweepConfig
    with pytest.raises(ConfigError, match="default_tau"):
        build(SweepConfig, None, {"taus": "0.6,0.9"})
    with pytest.raises(ConfigError, match="default_gamma"):
        build(SweepConfig, None, {"gammas": "0,0.3"})


def test_compare_selects_its_training_problems_measures_the_teachers_ceiling_and_trains_the_forward_kl(
        tiny_dir, tmp_path):
    import yaml

    out = tmp_path / "cmp"
    argv = _tiny_argv("compare", tiny_dir, out,
                      "--data.test_fraction", "0.96", "--data.instances", "2",  # 3 training templates x 2 instances
                      "--near_instances", "2", "--near_limit", "3", "--select_n", "2", "--train_eval_limit", "2",
                      "--ceiling", "true", "--methods", "base,dail_forward", "--splits", "train,near",
                      "--synth.max_new_tokens", "8", "--synth.samples_per_problem", "1", "--eval.max_new_tokens", "8")
    assert main(argv) == 0
    data = build(CompareConfig, None, {"data.test_fraction": 0.96, "data.instances": 2, "near_instances": 2,
                                       "near_limit": 3})
    problems = load_examples(data.data)
    assert len(problems) == 6 and len({e.meta["template"] for e in problems}) == 3  # 1 of the 4 is validation
    # The selection: the base model's samples at n = select_n, a draw apart from the evaluations' seed.
    chosen = read_records(out / "select" / "experts.jsonl")
    assert [r["id"] for r in chosen] == [e.id for e in problems]  # the tiny model fails every one
    assert all(r["meta"]["selected"]["n"] == 2 and r["meta"]["selected"]["correct"] == 0 for r in chosen)
    assert yaml.safe_load((out / "select" / "eval" / "config.yaml").read_text())["seed"] == 1235
    # Every method trains on the selected set; the train split evaluates its first train_eval_limit.
    synth = read_records(out / "data" / "mixed" / "synthetic.jsonl")
    assert sorted({r["id"] for r in synth}) == sorted(r["id"] for r in chosen)
    for folder in ("base", "dail_forward"):
        train = json.loads((out / folder / "eval" / "train" / "summary.json").read_text())
        assert list(train["per_problem_correct"]) == [r["id"] for r in chosen[:2]]
    forward = yaml.safe_load((out / "dail_forward" / "train" / "config.yaml").read_text())
    assert forward["loss"] == "contrastive_forward" and forward["gamma"] == 0.1 and forward["neg_cap"] == 1.0
    # The teacher's ceiling: the base model shown problem and solution, on the train split.
    ceiling = json.loads((out / "ceiling" / "eval" / "train" / "summary.json").read_text())
    assert ceiling["context"] == "teacher" and ceiling["n_problems"] == 2
    # Near transfer: new instances of the training templates, balanced over them.
    near = json.loads((out / "base" / "eval" / "near" / "summary.json").read_text())
    near_problems = load_examples(split_data(data, "near"))
    assert list(near["per_problem_correct"]) == [e.id for e in near_problems] and len(near_problems) == 3
    assert {e.meta["template"] for e in near_problems} <= {e.meta["template"] for e in problems}
    assert not {e.problem for e in near_problems} & {e.problem for e in problems}


def _fake_eval(folder, counts: dict[str, int], n: int, dtype: str = "float32") -> None:
    """An eval folder as `dail eval` leaves it: per-problem correct counts (the same at both budgets,
    4 and 8 tokens), ks 1, 2, .. n, sampled in `dtype`."""
    files = eval_files(folder)
    folder.mkdir(parents=True)
    ks = [2 ** i for i in range(n.bit_length())]
    cell = {str(k): {"mean": 0.1, "ci_low": 0.0, "ci_high": 0.2} for k in ks}
    files["summary"].write_text(json.dumps({
        "per_problem_correct": counts, "n": n, "ks": ks, "budgets": [4, 8],
        "by_budget": {b: {"pass_at_k": cell} for b in ("4", "8")},
        "mean_tokens": 5.0, "distinct_answers": 1.5, "answer_found_fraction": 0.5, "mean_entropy": 0.7,
        "dtype": dtype}))
    write_records(files["samples"], [{"id": pid, "correct_at_budget": {"4": j < c, "8": j < c}}
                                     for pid, c in counts.items() for j in range(n)])


def test_report_shows_a_method_evaluated_on_a_later_split_only(tmp_path, monkeypatch):
    """`dail compare --methods base,dail_forward --splits train` after a run of base, nll and dail on
    far and train: the forward run is in the tables, the legends and the paired difference to DAIL."""
    from dail import compare

    figures = {}
    monkeypatch.setattr(compare.Figure, "savefig", lambda fig, path, **kw: figures.__setitem__(Path(path).name, fig))
    out = tmp_path / "cmp"
    far, train = {"a": 0, "b": 1, "c": 2}, {"x": 0, "y": 1}
    for name in ("base", "nll", "dail"):
        _fake_eval(RunFolder(out / name).eval("far"), far, 4)
        _fake_eval(RunFolder(out / name).eval("train"), train, 2)
    _fake_eval(RunFolder(out / "dail_forward").eval("train"), {"x": 2, "y": 2}, 2)
    cfg = build(CompareConfig, None, {"out": str(out), "methods": "base,nll,dail,dail_forward", "splits": "far,train"})
    lines = compare.write_compare_report(cfg).read_text().splitlines()
    comp = json.loads((out / "comparison.json").read_text())
    assert "dail_forward" not in comp["splits"]["far"]["runs"]
    # forward - reverse on train: pass@1 1 against (0 + 0.5) / 2, pass@2 1 against (0 + 1) / 2
    vs = comp["splits"]["train"]["runs"]["dail_forward"]["vs"]["dail"]["8"]
    assert vs["1"]["mean"] == pytest.approx(0.75) and vs["2"]["mean"] == pytest.approx(0.5)
    label = compare.METHODS["dail_forward"]["label"]
    pass_row = next(line for line in lines if line.startswith(f"| {label} |"))
    assert pass_row.count("–") == 2  # far pass@1 and pass@4: not evaluated there
    diff_row = next(line for line in lines if line.startswith("| dail_forward | train | 1 / 2 |"))
    # base, nll and dail are the same runs here: vs base at pass@1 and pass@2, vs nll and vs dail at pass@2
    assert diff_row.split(" | ")[3:7] == ["+0.750 [+0.50, +1.00]"] + ["+0.500 [+0.00, +1.00]"] * 3
    assert any(line.startswith("| dail_forward | train | 1.50 |") for line in lines)  # diversity
    for png in ("compare_passk.png", "compare_budget.png"):
        legend = figures[png].axes[-1].get_legend()
        assert label in [t.get_text() for t in legend.get_texts()], png
    # A run keeps its colour in every panel: nll is drawn alike on far and on train.
    far_ax, train_ax = figures["compare_passk.png"].axes[:2]
    colour = {ax: {l.get_label(): l.get_color() for l in ax.get_lines()} for ax in (far_ax, train_ax)}
    assert colour[far_ax][compare.METHODS["nll"]["label"]] == colour[train_ax][compare.METHODS["nll"]["label"]]


def test_report_only_opens_nothing_and_names_the_precisions(tmp_path):
    """`dail compare --report_only true` rebuilds the report from evaluations written by `dail eval`
    (here STaR's, in another precision than base's): no model is opened (the name points nowhere),
    and the report says which run was sampled in which precision."""
    out = tmp_path / "cmp"
    _fake_eval(RunFolder(out / "base").eval("far"), {"a": 0, "b": 1}, 4, dtype="bfloat16")
    _fake_eval(RunFolder(out / "star").eval("far"), {"a": 2, "b": 1}, 4, dtype="float32")
    argv = ["compare", "--out", str(out), "--model.name", str(tmp_path / "no-model"), "--methods", "base,star",
            "--splits", "far"]
    assert main(argv + ["--report_only", "true"]) == 0
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["splits"]["far"]["runs"]["star"]["dtype"] == "float32"
    assert comp["splits"]["far"]["runs"]["star"]["transitions_vs_base"]["unsolved_to_solved"] == 1
    report = (out / "report.md").read_text()
    assert "Sampled in different precisions: bfloat16: base; float32: star." in report
    with pytest.raises(SystemExit):  # without it, compare opens the model first: there is none
        main(argv)
