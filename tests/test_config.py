"""Configs: defaults, YAML and flag precedence, validation messages, the CLI's flags."""

from __future__ import annotations

import pytest

from dail.config import ConfigError, RunConfig, SynthConfig, TrainConfig, build
from dail.cli import make_parser


def test_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("tau: 0.5\nmax_new_tokens: 64\nmodel:\n  name: some/model\n", encoding="utf-8")
    cfg = build(SynthConfig, str(y), {"tau": 0.7})
    assert (cfg.tau, cfg.max_new_tokens, cfg.model.name, cfg.temperature) == (0.7, 64, "some/model", 0.7)


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="'tau': must be >= 0"):
        build(SynthConfig, None, {"tau": -1})
    with pytest.raises(ConfigError, match="'grade_timeout': must be > 0"):
        build(SynthConfig, None, {"grade_timeout": 0})
    with pytest.raises(ConfigError, match="unknown field 'taux'"):
        build(SynthConfig, None, {"taux": 1})
    with pytest.raises(ConfigError, match="'max_new_tokens': expected int"):
        build(SynthConfig, None, {"max_new_tokens": "many"})
    y = tmp_path / "bad.yaml"
    y.write_text("model: [1, 2]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml"):
        build(SynthConfig, str(y))


def test_gamma_at_least_one_needs_a_cap():
    with pytest.raises(ConfigError, match="unbounded"):
        TrainConfig(gamma=1.0)
    assert TrainConfig(gamma=1.5, neg_cap=5.0).gamma == 1.5


def test_cli_flags_come_from_the_dataclasses():
    parser = make_parser()
    args = parser.parse_args(["run", "--synth.tau", "0.2", "--eval.ks", "[1,2]", "--model.name", "x"])
    assert vars(args)["cfg:synth.tau"] == "0.2"
    help_text = parser._subparsers._group_actions[0].choices["synth"].format_help()
    assert "--tau" in help_text and "Acceptance threshold" in help_text


def test_run_defaults_are_the_embedded_default():
    cfg = RunConfig()
    assert cfg.model.name == "embedded" and cfg.train_data.source == "gsm-symbolic"
    assert cfg.train_data.split == "train" and cfg.test_data.split == "test"


def test_partial_override_of_a_nested_config_keeps_its_own_defaults():
    cfg = build(RunConfig, None, {"test_data.source": "champ"})
    assert (cfg.test_data.source, cfg.test_data.split, cfg.test_data.limit) == ("champ", "test", 16)
    assert cfg.eval.data.split == "test"


def test_nested_errors_name_the_dotted_field():
    with pytest.raises(ConfigError, match=r"config field 'eval.budgets': each budget must be in 1..max_new_tokens \(32\)"):
        build(RunConfig, None, {"eval.max_new_tokens": 32})
    with pytest.raises(ConfigError, match=r"unknown field 'eval.taux'"):
        build(RunConfig, None, {"eval.taux": 1})


def test_report_refuses_folders_without_results(tmp_path, capsys):
    from dail.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "missing")])
    assert e.value.code == 2 and "not a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 2 and "no evaluation results" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
