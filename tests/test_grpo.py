"""GRPO and NuRL (`dail grpo`) on the tiny random model: the reward on hand-written completions,
hint injection only into all-zero groups, the end-to-end data flow into TRL's GRPOTrainer,
hints kept out of evaluation, resume and refusals, bad inputs before the model loads, and
`accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import dail.grpo as G  # noqa: E402
from dail.config import ConfigError, DataConfig, EvalConfig, GRPOConfig, ModelConfig  # noqa: E402
from dail.data import DataError, Example  # noqa: E402
from dail.hints import landmark_hint, read_hints, states_answer  # noqa: E402
from dail.prompts import hinted_messages  # noqa: E402
from dail.prompts import render, student_messages  # noqa: E402
import dail.sampler as SM  # noqa: E402

# (problem, solution, gold). Landmarks of the solutions: an intermediate result and the answer,
# so a landmark hint ("Useful intermediate results: 6.") exists and never states the answer.
PROBLEMS = [
    ("Tom has 3 bags of 2 apples and 1 more apple. How many apples?", "3*2=6, 6+1=7. #### 7", "7"),
    ("An apple costs 2. How much do 4 apples and a 4 pear cost?", "2*4=8, 8+4=12. #### 12", "12"),
    ("Tom has 9 apples, eats 2 and gives 1 away. How many are left?", "9-2=7, 7-1=6. #### 6", "6"),
    ("x = 5 + 3, y = x + 1. What is y?", "5+3=8, 8+1=9. #### 9", "9"),
]


def write_problems(path: Path, rows: list[dict] | None = None) -> Path:
    rows = rows if rows is not None else [{"id": f"p{i}", "problem": p, "solution": s, "answer": a}
                                          for i, (p, s, a) in enumerate(PROBLEMS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def problems(tmp_path):
    return write_problems(tmp_path / "problems.jsonl")


def _cfg(tiny_dir, data, out, **kw) -> GRPOConfig:
    base = dict(model=ModelConfig(name=str(tiny_dir), device="cpu"), data=DataConfig(source=str(data)),
                out=str(out), num_generations=4, problems_per_step=2, micro_batch_size=4, max_steps=2,
                max_new_tokens=6, hint_tokens=4, lora_r=4, lora_alpha=8, lr=5e-2, save_every=1, seed=3)
    base.update(kw)
    return GRPOConfig(**base)


def fake_grader(monkeypatch, rule):
    """Replace the grader GRPO calls (reward and rollout) with `rule(text, gold) -> bool`."""
    def grade_many(preds, golds, timeout, kind="math", workers=None):
        return [bool(rule(p, g)) for p, g in zip(preds, golds)]
    monkeypatch.setattr(G, "grade_many", grade_many)


def _adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- the reward

def test_reward_on_hand_written_completions_uses_the_eval_grader_and_its_timeout():
    """Right (boxed, and a final-answer line), wrong, malformed (no answer, an unclosed box) and one
    that never finishes in sympy (the grader's process pool kills it at the timeout): 1 or 0."""
    reward = G.make_reward(group_size=3, timeout=1.0)
    completions = [
        "3*2 = 6 and 6 + 1 = 7, so \\boxed{7}",                      # right
        [{"role": "assistant", "content": "Half of it: \\boxed{\\frac{1}{2}}"}],  # right, TRL's chat form
        "So the answer is 12.",                                       # right, final-answer line
        "I think it is \\boxed{8}",                                   # wrong
        "the apples are many",                                        # malformed: no answer at all
        "\\boxed{9^{9^{9^{9}}}}",                                     # the grader times out: wrong
    ]
    golds = ["7", "0.5", "12", "7", "7", "5"]
    metrics = {}
    got = reward(prompts=[None] * 6, completions=completions, answer=golds,
                 log_metric=lambda k, v: metrics.__setitem__(k, v))
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert metrics == {"zero_groups": 0.5}  # groups of 3: [1, 1, 1], [0, 0, 0]


def test_reward_reuses_the_rollouts_grades_and_logs_before_and_after_hints(monkeypatch):
    seen = []
    fake_grader(monkeypatch, lambda p, g: seen.append(p) or p == "right")
    reward = G.make_reward(group_size=2, timeout=1.0)
    metrics = {}
    got = reward(completions=["x", "right", "right", "x"], answer=["1"] * 4,
                 dail_grade=[0.0, None, 1.0, 0.0], dail_zero_before=[True, True, False, False],
                 dail_hinted=[False, True, False, False], log_metric=lambda k, v: metrics.__setitem__(k, v))
    assert got == [0.0, 1.0, 1.0, 0.0]
    assert seen == ["right"]  # only the resampled row is graded again
    assert metrics == {"zero_groups": 0.0, "zero_groups_before_hints": 0.5, "hinted_groups": 0.5}


# ----------------------------------------------------------------------------- NuRL's trigger

def test_needs_hint_and_plan_hints():
    assert G.needs_hint([0, 0, 0, 0]) and G.needs_hint([0.0])
    assert not G.needs_hint([0, 0, 1, 0]) and not G.needs_hint([])
    rewards = [0, 0, 0, 0,   1, 0, 0, 0,   0, 0, 0, 0,   1, 1, 1, 1]
    has = [True] * 4 + [True] * 4 + [False] * 4 + [True] * 4  # the third problem has no hint
    assert G.plan_hints(rewards, 4, has) == [False, True, True, True] + [False] * 12
    with pytest.raises(ValueError):
        G.plan_hints([0, 0, 0], 2, [True] * 3)


def test_hinted_prompt_extends_the_student_prompt_and_hints_never_state_the_answer(tiny_tok):
    plain = render(tiny_tok, student_messages("What is 3+4?"))
    hinted = render(tiny_tok, hinted_messages("What is 3+4?", "Add them."))
    assert hinted_messages("What is 3+4?", "Add them.")[0]["content"].startswith(
        student_messages("What is 3+4?")[0]["content"])
    assert tiny_tok.decode(hinted).endswith("Hint: Add them.<|im_end|>\n<|im_start|>assistant\n")
    assert len(hinted) > len(plain)
    assert states_answer("so we get 56 pages", "56") and states_answer("it is 56.", "56")
    assert not states_answer("560 pages, 5.6 or 56.5", "56") and not states_answer("add them", "7")
    ex = Example("p0", *PROBLEMS[0])
    assert landmark_hint(ex) == "Useful intermediate results: 6."
    assert landmark_hint(Example("q", "p", "1+1=2. #### 2", "2")) is None  # only the answer: no hint


def _trainer(model, step=0, rank=0, G_=4):
    """What `Rollout` reads of TRL's trainer."""
    return SimpleNamespace(model=model, num_generations=G_, num_generations_eval=G_,
                           state=SimpleNamespace(global_step=step), accelerator=SimpleNamespace(process_index=rank))


def test_rollout_injects_hints_only_into_all_zero_groups_and_only_in_training(tiny, problems, monkeypatch):
    """Three problems x G=4: one group scores, one scores 0 and has a hint, one scores 0 without a
    hint. Only rows 2..4 of the second group are resampled, from the hinted prompt."""
    model, tok = tiny
    exs = [Example(f"p{i}", p, s, a) for i, (p, s, a) in enumerate(PROBLEMS[:3])]
    hints = {"p1": "Multiply first."}  # p2 has none
    fake_grader(monkeypatch, lambda text, gold: gold == "7")  # p0's group scores, p1's and p2's do not
    rollout = G.Rollout(tok, exs, hints, _cfg("x", "x", "x", num_generations=4))
    prompts = [student_messages(ex.problem) for ex in exs for _ in range(4)]
    model.train()
    out = rollout(prompts, _trainer(model))
    plain = {ex.id: render(tok, student_messages(ex.problem)) for ex in exs}
    hinted = render(tok, hinted_messages(exs[1].problem, hints["p1"]))
    expect = [plain["p0"]] * 4 + [plain["p1"]] + [hinted] * 3 + [plain["p2"]] * 4
    assert out["prompt_ids"] == expect
    assert out["dail_hinted"] == [False] * 5 + [True] * 3 + [False] * 4
    assert out["dail_zero_before"] == [False] * 4 + [True] * 8
    assert out["dail_grade"] == [1.0] * 4 + [0.0, None, None, None] + [0.0] * 4
    assert len(out["completion_ids"]) == 12 and out["logprobs"] is None
    assert model.training  # sampling ran in eval mode and gave training mode back

    model.eval()  # TRL's evaluation mode: never a hint
    out = rollout(prompts, _trainer(model))
    assert out["prompt_ids"] == [plain[ex.id] for ex in exs for _ in range(4)] and "dail_hinted" not in out


def test_rollouts_are_seeded_by_step_group_and_index_not_by_process(tiny, problems):
    """Process 1 of 2 gets rows 8..15 of the global batch: its samples equal those rows of a
    1-process rollout."""
    model, tok = tiny
    exs = [Example(f"p{i}", p, s, a) for i, (p, s, a) in enumerate(PROBLEMS)]
    rollout = G.Rollout(tok, exs, {}, _cfg("x", "x", "x", num_generations=4, temperature=1.0, max_new_tokens=5))
    prompts = [student_messages(ex.problem) for ex in exs for _ in range(4)]
    whole = rollout(prompts, _trainer(model, step=2))["completion_ids"]
    second = rollout(prompts[8:], _trainer(model, step=2, rank=1))["completion_ids"]
    assert second == whole[8:]
    assert len({tuple(c) for c in whole[:4]}) > 1  # a group's samples differ
    assert rollout(prompts, _trainer(model, step=3))["completion_ids"] != whole  # new samples each step


# ----------------------------------------------------------------------------- end to end

def test_grpo_end_to_end_writes_an_adapter_that_eval_loads(tiny_dir, problems, tmp_path, monkeypatch):
    """Plain GRPO through TRL: the reward reaches the update (a fake grader gives varied rewards,
    so advantages are non-zero and LoRA B moves), metrics.jsonl has one row per step with the
    logged quantities, and `dail eval --adapter <out>/adapter` runs on the result."""
    from dail.evaluation import evaluate

    fake_grader(monkeypatch, lambda text, gold: len(text) % 2 == 0)
    adapter = G.train_grpo(_cfg(tiny_dir, problems, tmp_path / "grpo"))
    out = tmp_path / "grpo"
    assert adapter == out / "adapter" and (adapter / "adapter_config.json").exists()
    assert not (adapter / "ref").exists()  # only the trained adapter
    weights = _adapter_weights(adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert {"reward", "zero_groups", "kl", "tokens_per_s", "loss", "lr", "step_s"} <= r.keys()
        assert 0 <= r["zero_groups"] <= 1 and r["tokens_per_s"] > 0 and "hinted_groups" not in r
    info = json.loads((out / "train_info.json").read_text())
    assert info["method"] == "grpo" and info["steps"] == 2 and info["completions_per_step"] == 8
    summary = evaluate(EvalConfig(model=ModelConfig(name=str(tiny_dir), device="cpu"), adapter=str(adapter),
                                  data=DataConfig(source=str(problems)), out=str(tmp_path / "eval"), n=2,
                                  ks=[1, 2], max_new_tokens=4, batch_size=8))
    assert summary["n_problems"] == 4


def test_nurl_landmark_hints_train_and_never_reach_evaluation(tiny_dir, problems, tmp_path, monkeypatch):
    """hints=landmarks: the hints file is written, all-zero groups train on hinted rollouts (the
    hinted prompts reach TRL), and `dail eval` on the adapter shows only plain student prompts."""
    import dail.evaluation as E
    from dail.evaluation import evaluate

    fake_grader(monkeypatch, lambda text, gold: False)  # every group is all-zero: every problem gets hinted
    seen_by_trl = []
    real_call = G.Rollout.__call__

    def spy(self, prompts, trainer):
        out = real_call(self, prompts, trainer)
        seen_by_trl.extend(out["prompt_ids"])
        return out
    monkeypatch.setattr(G.Rollout, "__call__", spy)
    out = tmp_path / "nurl"
    adapter = G.train_grpo(_cfg(tiny_dir, problems, out, hints="landmarks", max_steps=1))
    recs = [json.loads(x) for x in (out / "hints.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["p0", "p1", "p2", "p3"]
    assert recs[0]["hint"] == "Useful intermediate results: 6." and recs[0]["source"] == "landmarks"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["zero_groups_before_hints"] == 1.0 and rows[0]["hinted_groups"] == 1.0
    from dail.models import load_tokenizer
    tok = load_tokenizer(ModelConfig(name=str(tiny_dir), device="cpu"))
    texts = [tok.decode(p) for p in seen_by_trl]
    assert sum("Hint: Useful intermediate results" in t for t in texts) == 6  # 2 problems x (G-1)
    info = json.loads((out / "train_info.json").read_text())
    assert info["method"] == "nurl" and info["hints_used"] == 4

    shown = []
    real_decode = SM.decode

    def record(model, prompts, **kw):
        shown.extend(prompts)
        return real_decode(model, prompts, **kw)
    monkeypatch.setattr(SM, "decode", record)
    evaluate(EvalConfig(model=ModelConfig(name=str(tiny_dir), device="cpu"), adapter=str(adapter),
                        data=DataConfig(source=str(problems)), out=str(tmp_path / "eval"), n=2, ks=[1, 2],
                        max_new_tokens=3, batch_size=8))
    plain = {tuple(render(tok, student_messages(p))) for p, _, _ in PROBLEMS}
    assert shown and {tuple(p) for p in shown} == plain
    assert not any("Hint" in tok.decode(p) for p in shown)


def test_self_hints_are_collected_once_and_edits_survive(tiny_dir, problems, tmp_path, monkeypatch):
    """hints=self: the model writes one record per problem (hint and reasoning); a rerun with
    --overwrite keeps the file, reads the edited hint, and collects only the deleted line again."""
    fake_grader(monkeypatch, lambda text, gold: False)
    out = tmp_path / "self"
    G.train_grpo(_cfg(tiny_dir, problems, out, hints="self", max_steps=1, save_every=0))
    path = out / "hints.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["p0", "p1", "p2", "p3"]
    assert all(r["source"] == "self" and "reasoning" in r and "hint_prompt_version" in r for r in recs)
    recs[0]["hint"] = "Edited: count the bags first."
    path.write_text("".join(json.dumps(r) + "\n" for r in recs[:3]))  # p3's line deleted
    G.train_grpo(_cfg(tiny_dir, problems, out, hints="self", max_steps=1, save_every=0, overwrite=True))
    again = [json.loads(x) for x in path.read_text().splitlines()]
    assert again[0]["hint"] == "Edited: count the bags first." and [r["id"] for r in again] == ["p0", "p1", "p2", "p3"]
    exs = [Example(f"p{i}", p, s, a) for i, (p, s, a) in enumerate(PROBLEMS)]
    assert read_hints(path, exs)["p0"] == "Edited: count the bags first."


# ----------------------------------------------------------------------------- resume and refusals

def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny_dir, problems, tmp_path, monkeypatch):
    fake_grader(monkeypatch, lambda text, gold: len(text) % 2 == 0)
    whole = G.train_grpo(_cfg(tiny_dir, problems, tmp_path / "whole"))

    real_call = G.Rollout.__call__

    def crash_at_step_1(self, prompts, trainer):
        if trainer.state.global_step == 1:
            raise KeyboardInterrupt("killed")
        return real_call(self, prompts, trainer)
    monkeypatch.setattr(G.Rollout, "__call__", crash_at_step_1)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        G.train_grpo(_cfg(tiny_dir, problems, cut))
    monkeypatch.setattr(G.Rollout, "__call__", real_call)
    assert (cut / "checkpoints" / "checkpoint-1").exists() and not (cut / "train_info.json").exists()
    with pytest.raises(ConfigError, match="already holds an interrupted GRPO run.*--resume true"):
        G.train_grpo(_cfg(tiny_dir, problems, cut))
    with pytest.raises(ConfigError, match="different 'beta'"):
        G.train_grpo(_cfg(tiny_dir, problems, cut, resume=True, beta=0.5))
    resumed = G.train_grpo(_cfg(tiny_dir, problems, cut, resume=True))
    a, b = _adapter_weights(whole), _adapter_weights(resumed)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in a.items())  # it did learn
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]

    with pytest.raises(ConfigError, match="already holds a finished run"):
        G.train_grpo(_cfg(tiny_dir, problems, cut))
    with pytest.raises(ConfigError, match="already holds a finished run"):
        G.train_grpo(_cfg(tiny_dir, problems, tmp_path / "whole", max_steps=3))


def _no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(G, "load_model", refuse)
    monkeypatch.setattr(G, "load_tokenizer", refuse)


def test_bad_hint_files_are_refused_before_the_model_loads(tiny_dir, problems, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    hints = tmp_path / "hints.jsonl"
    cases = [
        ('{"id": "p0", "hint": "a"}\n{"id": "nope", "hint": "b"}\n', r"hints.jsonl:2: field 'id': 'nope' is not one"),
        ('{"id": "p0", "hint": "a"}\n\n{"id": "p0", "hint": "b"}\n',
         r"hints.jsonl:3: field 'id': 'p0' already has a hint at line 1"),
        ('{"id": "p1", "hint": 7}\n', r"hints.jsonl:1: field 'hint': expected a string or null"),
        ('{"id": "p1"}\n', r"hints.jsonl:1: missing field 'hint'"),
        ('{"id": "p1", "hint": "a"\n', r"hints.jsonl:1: not a valid JSON record"),
    ]
    for text, message in cases:
        hints.write_text(text)
        with pytest.raises(DataError, match=message):
            G.train_grpo(_cfg(tiny_dir, problems, tmp_path / "out", hints="self", hints_file=str(hints)))
    assert hints.read_text() == cases[-1][0]  # nothing was repaired or dropped


def test_a_folder_holding_another_training_run_is_refused_before_the_model_loads(tiny_dir, problems, tmp_path,
                                                                                  monkeypatch):
    _no_model(monkeypatch)
    out = tmp_path / "train"
    (out / "checkpoint").mkdir(parents=True)  # an interrupted `dail train` run
    with pytest.raises(ConfigError, match="already holds a training run: checkpoint. Pass --resume true"):
        G.train_grpo(_cfg(tiny_dir, problems, out))
    with pytest.raises(ConfigError, match="no GRPO checkpoint .* to resume from"):
        G.train_grpo(_cfg(tiny_dir, problems, out, resume=True))


def test_data_the_grader_cannot_reward_is_refused_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    rows = [{"id": "a", "problem": "1+1?", "solution": "1+1=2", "answer": "2"},
            {"id": "b", "problem": "2+2?", "solution": "2+2=4"}]
    data = write_problems(tmp_path / "noanswer.jsonl", rows)
    (tmp_path / "noanswer.jsonl").write_text("\n" + data.read_text())  # a blank first line: line numbers count it
    with pytest.raises(DataError, match=r"noanswer.jsonl:3: field 'answer': missing"):
        G.train_grpo(_cfg(tiny_dir, data, tmp_path / "out", problems_per_step=1))
    csv = tmp_path / "gpqa.csv"
    csv.write_text("Question,Correct Answer,Incorrect Answer 1\nWhich?,yes,no\n")
    with pytest.raises(DataError, match="field 'meta.choices': multiple-choice problems are not supported"):
        G.train_grpo(_cfg(tiny_dir, csv, tmp_path / "out", problems_per_step=1))
    with pytest.raises(ConfigError, match="'problems_per_step': 8 is more than the 4 training problems"):
        G.train_grpo(_cfg(tiny_dir, write_problems(tmp_path / "ok.jsonl"), tmp_path / "out", problems_per_step=8))


def test_config_ranges_and_the_cli(tmp_path):
    with pytest.raises(ConfigError, match="'num_generations'"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match="'hints'"):
        GRPOConfig(hints="teacher")
    with pytest.raises(ConfigError, match="'hints_file': is only read with hints"):
        GRPOConfig(hints_file="h.jsonl")
    with pytest.raises(ConfigError, match="'micro_batch_size'"):
        GRPOConfig(problems_per_step=3, num_generations=2, micro_batch_size=4)
    with pytest.raises(ConfigError, match="'overwrite'"):
        GRPOConfig(resume=True, overwrite=True)
    from dail.config import build, resume_keys
    cfg = build(GRPOConfig, None, {"lr": "1e-6", "beta": "0", "num_generations": "16", "hints": "self",
                                   "target_modules": "q_proj,v_proj"})
    assert (cfg.lr, cfg.beta, cfg.num_generations, cfg.target_modules) == (1e-6, 0.0, 16, ["q_proj", "v_proj"])
    keys = resume_keys(GRPOConfig)
    assert {"beta", "num_generations", "hints", "model.name", "data.source", "lora_r", "seed"} <= set(keys)
    assert "max_steps" not in keys and "resume" not in keys
    from dail.cli import main
    with pytest.raises(SystemExit) as e:  # a config error answers before any model loads
        main(["grpo", "--hints", "oracle", "--out", str(tmp_path / "x")])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- accelerate launch

def test_two_launched_processes_match_one(tiny_dir, problems, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): the same rollouts and the same
    global batch as one process, so the same metrics and adapter (each process holds one problem's
    group per step; the real grader scores them)."""
    import yaml

    cfg = dict(model={"name": str(tiny_dir), "device": "cpu"}, data={"source": str(problems)},
               num_generations=4, problems_per_step=2, micro_batch_size=4, max_steps=2, max_new_tokens=6,
               lora_r=4, lora_alpha=8, lr=5e-2, save_every=0, seed=3, hints="landmarks")
    one = G.train_grpo(GRPOConfig(**{**cfg, "model": ModelConfig(**cfg["model"]),
                                     "data": DataConfig(**cfg["data"]), "out": str(tmp_path / "one")}))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**cfg, "out": str(tmp_path / "two")}))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "dail.cli", "grpo", "--config", str(tmp_path / "two.yaml")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert json.loads((two / "train_info.json").read_text())["processes"] == 2
    assert not list(two.glob("*rank*"))
    assert (two / "hints.jsonl").read_text() == (tmp_path / "one" / "hints.jsonl").read_text()
    rows = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")]
    for key in ("reward", "zero_groups", "completion_length", "entropy", "kl", "loss"):
        assert [r[key] for r in rows[0]] == pytest.approx([r[key] for r in rows[1]], rel=1e-4, abs=1e-6), key
    a, b = _adapter_weights(one), _adapter_weights(two / "adapter")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
