"""Prompt files: the built-in texts render what prompts.py rendered before them, a file replaces
only its keys, bad files are refused with the file and the key, the hash reaches records and
resume checks, training refuses records made with other texts, the answer_only teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dail.cli import make_parser
from dail.config import (PROMPT_HASH, CompareConfig, ConfigError, DataConfig, EvalConfig, GRPOConfig, ModelConfig,
                         RunConfig, SweepConfig, SynthConfig, TrainConfig, build, check_resumable, resume_keys, save,
                         to_dict)
from dail.data import DataError
from dail.prompts import (BUILT_IN, PROMPT_VERSION, answer_only_messages, direct_messages, hinted_messages,
                          load_prompts, negative_messages, rationalization_messages, render, student_messages,
                          teacher_context, teacher_messages)
from dail.records import read_records

AUTHORS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "authors-style.yaml"

# ----------------------------------------------------------------------------- the built-in texts

# What src/dail/prompts.py rendered before prompt files (commit 28b1762), written out by hand:
# the built-in file must give exactly these strings, so today's token ids do not change.
HEAD_INSTRUCTION = "Solve the following problem. Reason step by step, and put the final answer in \\boxed{}."


def head_student(problem):
    return f"{HEAD_INSTRUCTION}\n\nProblem: {problem.strip()}"


def head_teacher(problem, solution):
    return f"{head_student(problem)}\n\nAn expert's solution, for your reference:\n{solution}"


def head_negative(problem, landmarks):
    results = "; ".join(landmarks) or "(none)"
    return f"{head_student(problem)}\n\nKey intermediate results, for your reference: {results}"


def head_direct(problem, solution):
    return (f"{head_student(problem)}\n\nHere is a correct solution:\n{solution}\n\n"
            "Now write your own complete, self-contained solution. Explain every step in your own "
            "words, as if you were solving it for the first time, and do not mention the solution above.")


def head_rationalization(problem, answer):
    return (f"{head_student(problem)}\n\nHint: the correct final answer is {answer.strip()}. Work it out step by step "
            "as if you were solving the problem on your own, arrive at that answer, and do not mention this hint.")


# (problem, solution, solution as shown: calculator annotations removed and stripped, landmarks, answer)
CASES = [
    ("Tom has 3 apples and buys 4 more. How many?", "3+4=<<3+4=7>>7. #### 7", "3+4=7. #### 7", ["7"], "7"),
    ("  x = {problem} and \\boxed{y}?\n", "  We get $\\frac{1}{2}$ {solution}.\n", "We get $\\frac{1}{2}$ {solution}.",
     ["\\frac{1}{2}", "12"], " 1/2 "),
    ("No landmarks here.", "Nothing.", "Nothing.", [], "0"),
]


@pytest.mark.parametrize("problem, solution, shown, marks, answer", CASES)
def test_built_in_file_renders_what_prompts_py_rendered_before(tiny_tok, problem, solution, shown, marks, answer):
    assert PROMPT_VERSION == BUILT_IN.version == "dail-prompts-v1" and BUILT_IN.source == ""
    pairs = [
        (student_messages(problem), head_student(problem)),
        (teacher_messages(problem, solution), head_teacher(problem, shown)),
        (teacher_messages(problem, solution, answer, load_prompts("")), head_teacher(problem, shown)),
        (teacher_context("solution", problem, solution, answer), head_teacher(problem, shown)),
        (negative_messages(problem, marks), head_negative(problem, marks)),
        (negative_messages(problem, marks, answer), head_negative(problem, marks)),
        (direct_messages(problem, solution, answer), head_direct(problem, shown)),
        (rationalization_messages(problem, answer), head_rationalization(problem, answer)),
        (hinted_messages(problem, " Add. "), head_student(problem) + "\n\nHint: Add."),
    ]
    for messages, text in pairs:
        assert messages == [{"role": "user", "content": text}]
        # the same token ids as the old texts, through the chat template
        assert render(tiny_tok, messages) == render(tiny_tok, [{"role": "user", "content": text}])


def test_placeholders_are_filled_once_and_other_braces_stay():
    (msg,) = teacher_messages("What is {answer}? \\boxed{}", "{problem} {landmarks}", answer="5")
    assert msg["content"].endswith("Problem: What is {answer}? \\boxed{}\n\nAn expert's solution, for your "
                                   "reference:\n{problem} {landmarks}")
    assert "\\boxed{}." in msg["content"]  # the instruction's braces are no placeholder


# ----------------------------------------------------------------------------- prompt files

def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def test_a_file_replaces_only_its_keys(tmp_path):
    path = write(tmp_path, "mine.yaml", {"version": "mine-v1", "teacher": "T {problem} | {solution} | {answer}",
                                         "instruction": "Think."})
    p = load_prompts(path)
    assert (p.version, p.source) == ("mine-v1", path)
    assert p.texts["teacher"] == "T {problem} | {solution} | {answer}" and p.texts["instruction"] == "Think."
    assert {k: v for k, v in p.texts.items() if k not in ("teacher", "instruction")} == \
        {k: v for k, v in BUILT_IN.texts.items() if k not in ("teacher", "instruction")}
    assert p.hash != BUILT_IN.hash and len(p.hash) == 12
    assert teacher_messages(" x ", "s <<1>>", "5", p)[0]["content"] == "T x | s | 5"
    assert student_messages("x", p)[0]["content"] == "Think.\n\nProblem: x"  # the new instruction, the old text
    assert teacher_messages("x", "s", None, p)[0]["content"] == "T x | s | (none)"  # a proof has no answer
    # The same texts under another name and version: the same hash (it covers the texts alone).
    copy = write(tmp_path, "copy.yaml", {"version": "renamed", "teacher": "T {problem} | {solution} | {answer}",
                                         "instruction": "Think."})
    assert load_prompts(copy).hash == p.hash
    # The built-in file written out again is the built-in texts.
    full = write(tmp_path, "full.yaml", {"version": "x", **BUILT_IN.texts})
    assert load_prompts(full).hash == BUILT_IN.hash


@pytest.mark.parametrize("content, message", [
    ({"version": "v", "techer": "{problem} {solution}"}, r"bad.yaml: unknown key 'techer' \(expected version, "),
    ({"version": "v", "teacher": "{problem} only"},
     r"bad.yaml: key 'teacher': needs the placeholder\(s\) \{solution\}"),
    ({"version": "v", "student": "{problem} {solution}"}, r"bad.yaml: key 'student': placeholder\(s\) \{solution\} "
     r"not available here"),
    ({"version": "v", "teacher_answer_only": "{problem} {answer} {solution}"},
     r"key 'teacher_answer_only': placeholder\(s\) \{solution\}"),
    ({"version": "v", "negative": "{problem}"}, r"key 'negative': needs the placeholder\(s\) \{landmarks\}"),
    ({"version": "v", "instruction": "Solve {problem}."}, r"key 'instruction': placeholder\(s\) \{problem\}"),
    ({"version": "v", "teacher": 3}, r"bad.yaml: key 'teacher': expected a non-empty string, got 3"),
    ({"version": "", "teacher": "{problem} {solution}"}, r"key 'version': expected a non-empty string"),
    ({"teacher": "{problem} {solution}"}, r"bad.yaml: key 'version' is missing"),
    ({"version": "dail-prompts-v1", "teacher": "{problem} {solution}"},
     r"key 'version': 'dail-prompts-v1' is the built-in texts' version, but the texts differ"),
    ("version: v\nteacher: [unclosed\n", r"bad.yaml: not valid YAML"),
    ("- a list\n", r"bad.yaml: expected a mapping of prompt texts"),
])
def test_bad_prompt_files_are_refused_naming_the_file_and_the_key(tmp_path, content, message):
    path = write(tmp_path, "bad.yaml", content)
    for cls in (SynthConfig, TrainConfig, EvalConfig, GRPOConfig, RunConfig):  # when the config is built
        with pytest.raises(ConfigError, match=r"config field 'prompts': .*" + message):
            build(cls, None, {"prompts": path})


def test_a_missing_prompt_file_is_refused():
    with pytest.raises(ConfigError, match=r"config field 'prompts': nowhere.yaml: prompt file not found"):
        build(SynthConfig, None, {"prompts": "nowhere.yaml"})


def test_authors_style_file_keeps_the_student_and_tells_the_negative_the_answer():
    p = load_prompts(str(AUTHORS))
    assert p.version == "authors-style-v1" and p.hash != BUILT_IN.hash
    # evaluation, GRPO and the student context are unchanged
    assert p.texts["student"] == BUILT_IN.texts["student"] and p.texts["instruction"] == BUILT_IN.texts["instruction"]
    assert p.texts["teacher"] != BUILT_IN.texts["teacher"]
    negative = negative_messages("x = 3 + 4", ["3", "4"], "7", p)[0]["content"]
    assert "final answer is 7" in negative and "3; 4" in negative
    assert "Final answer (private): 7" in answer_only_messages("x", "7", p)[0]["content"]


# ----------------------------------------------------------------------------- flags, configs, resume

@pytest.mark.parametrize("command", ["synth", "train", "eval", "grpo", "run", "compare", "sweep"])
def test_every_command_takes_prompts(command, tmp_path):
    path = write(tmp_path, "mine.yaml", {"version": "mine-v1", "teacher": "T {problem} {solution}"})
    args = make_parser().parse_args([command, "--prompts", path])
    assert vars(args)["cfg:prompts"] == path
    from dail.cli import STAGES

    assert build(STAGES[command][0], None, {"prompts": path}).prompts == path


def test_run_compare_and_sweep_set_every_stage_prompts(tmp_path):
    from dail import compare, pipeline, sweep

    path = write(tmp_path, "mine.yaml", {"version": "mine-v1", "teacher": "T {problem} {solution}"})
    for command in ("run", "compare", "sweep"):  # owned by the command: no stage flag, no stage YAML key
        with pytest.raises(SystemExit):
            make_parser().parse_args([command, "--synth.prompts", path])
        with pytest.raises(ConfigError, match=r"config field 'eval.prompts': set by the command itself"):
            build({"run": RunConfig, "compare": CompareConfig, "sweep": SweepConfig}[command], None,
                  {"eval": {"prompts": path}})
    run = pipeline.resolve(build(RunConfig, None, {"prompts": path}))
    assert run.synth.prompts == run.train.prompts == run.eval.prompts == path
    cmp = build(CompareConfig, None, {"prompts": path})
    assert compare._synth_cfg(cmp, "mixed").prompts == path
    answer_only = build(CompareConfig, None, {"synth.teacher_context": "answer_only"})
    assert [compare._synth_cfg(answer_only, m).teacher_context for m in ("mixed", "direct", "star")] == \
        ["answer_only", "solution", "solution"]
    assert compare._train_cfg(cmp, "dail", 0, tmp_path / "d").prompts == path
    assert compare._eval_cfg(cmp, "train", tmp_path / "d", "").prompts == path
    assert compare._grpo_cfg(cmp, "nurl", 0, tmp_path / "n").prompts == path
    sw = build(SweepConfig, None, {"prompts": path})
    assert sweep._synth_cfg(sw, 0.3).prompts == sweep._train_cfg(sw, 0.3, 0.1, tmp_path / "s").prompts == path
    assert sweep._eval_cfg(sw, tmp_path / "s", "").prompts == path


def test_the_hash_is_saved_with_the_config_and_is_the_resume_key(tmp_path):
    for cls in (SynthConfig, TrainConfig, EvalConfig, GRPOConfig):
        assert PROMPT_HASH in resume_keys(cls) and "prompts" not in resume_keys(cls)
    saved = tmp_path / "config.yaml"
    save(build(SynthConfig, None, {}), saved)
    data = yaml.safe_load(saved.read_text())
    assert list(data)[list(data).index("prompts") + 1] == PROMPT_HASH and data[PROMPT_HASH] == BUILT_IN.hash
    with pytest.raises(ConfigError, match=rf"different '{PROMPT_HASH}' \('{BUILT_IN.hash}', now "):
        check_resumable(saved, build(SynthConfig, None, {"prompts": str(AUTHORS)}), "trajectories")
    # The built-in texts under another path resume; the path itself is no resume key.
    same = write(tmp_path, "same.yaml", {"version": "copy", **BUILT_IN.texts})
    check_resumable(saved, build(SynthConfig, None, {"prompts": same}), "trajectories")
    # A config saved before prompt files has no hash: it resumes (check_resumable skips missing keys).
    del data["prompts"], data[PROMPT_HASH]
    saved.write_text(yaml.safe_dump(data))
    check_resumable(saved, build(SynthConfig, None, {"prompts": str(AUTHORS)}), "trajectories")
    # A saved config loads back: the hash is recomputed, never read.
    run = build(RunConfig, None, {"prompts": str(AUTHORS)})
    save(run, tmp_path / "run.yaml")
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())[PROMPT_HASH] == load_prompts(str(AUTHORS)).hash
    assert build(RunConfig, str(tmp_path / "run.yaml")) == run
    assert PROMPT_HASH not in to_dict(run)["synth"]  # a stage field `dail run` sets is not saved


# ----------------------------------------------------------------------------- synthesis, training, evaluation

def _experts(path: Path, answers: bool = True) -> Path:
    rows = [{"id": f"p{i}", "problem": f"Tom has {i} apples and buys 4 more.",
             "solution": f"{i}+4={i + 4}. #### {i + 4}"} | ({"answer": str(i + 4)} if answers else {})
            for i in range(3)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _synth(tiny_dir, tmp_path, **kw) -> SynthConfig:
    base = dict(model=ModelConfig(name=str(tiny_dir), device="cpu"),
                data=DataConfig(source=str(_experts(tmp_path / "experts.jsonl"))),
                out=str(tmp_path / "s" / "synthetic.jsonl"), max_new_tokens=6, batch_size=4, samples_per_problem=1,
                temperature=1.0, tau=0.02)
    return SynthConfig(**(base | kw))


def test_synthesis_records_carry_the_prompts_and_a_rerun_with_others_is_refused(tiny_dir, tmp_path, monkeypatch):
    import dail.sampler as SM
    import dail.synthesis as S

    seen = []
    real = SM.decode
    monkeypatch.setattr(SM, "decode", lambda model, prompts, **kw: seen.append((prompts, kw["teacher_prompts"]))
                        or real(model, prompts, **kw))
    p = load_prompts(str(AUTHORS))
    out = S.synthesize(_synth(tiny_dir, tmp_path, prompts=str(AUTHORS)))
    recs = read_records(out)
    assert len(recs) == 3
    assert all((r["prompt_hash"], r["prompt_version"], r["teacher_context"]) == (p.hash, p.version, "solution")
               for r in recs)
    stats = json.loads(out.with_name("stats.json").read_text())
    assert (stats["prompt_hash"], stats["prompt_version"], stats["teacher_context"]) == (p.hash, p.version, "solution")
    tok = S.load_tokenizer(ModelConfig(name=str(tiny_dir), device="cpu"))
    (students, teachers), = seen
    assert students == [render(tok, student_messages(r["problem"], p)) for r in recs]
    assert teachers == [render(tok, teacher_messages(r["problem"], r["solution"], r["answer"], p)) for r in recs]
    before = out.read_text()
    with pytest.raises(ConfigError, match=f"different '{PROMPT_HASH}'"):
        S.synthesize(_synth(tiny_dir, tmp_path))  # the built-in texts into the same file
    assert out.read_text() == before


def test_answer_only_teacher_in_synthesis_and_training(tiny_dir, tiny_tok, tmp_path, monkeypatch):
    import dail.sampler as SM
    import dail.synthesis as S
    from dail.training import build_sequences

    with pytest.raises(ConfigError, match=r"'teacher_context': answer_only is a mixed-mode teacher; mode direct"):
        SynthConfig(mode="direct", teacher_context="answer_only")
    with pytest.raises(ConfigError, match=r"'teacher_context': expected solution\|answer_only"):
        SynthConfig(teacher_context="answer")
    assert "teacher_context" in resume_keys(SynthConfig)
    seen = []
    real = SM.decode
    monkeypatch.setattr(SM, "decode", lambda model, prompts, **kw: seen.append(kw["teacher_prompts"])
                        or real(model, prompts, **kw))
    cfg = _synth(tiny_dir, tmp_path, teacher_context="answer_only")
    out = S.synthesize(cfg)
    recs = read_records(out)
    assert [r["teacher_context"] for r in recs] == ["answer_only"] * 3
    assert seen == [[render(tiny_tok, answer_only_messages(r["problem"], r["answer"])) for r in recs]]
    assert all("solution" not in answer_only_messages(r["problem"], r["answer"])[0]["content"] for r in recs)
    with pytest.raises(ConfigError, match="different 'teacher_context'"):
        S.synthesize(_synth(tiny_dir, tmp_path))

    # Training builds the same teacher context from the record.
    train = TrainConfig(model=ModelConfig(name=str(tiny_dir), device="cpu"), data=str(out), out=str(tmp_path / "t"))
    for seq, r in zip(build_sequences(train, tiny_tok), recs):
        assert seq.contexts["teacher"] == render(tiny_tok, answer_only_messages(r["problem"], r["answer"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n" for r in recs))
    with pytest.raises(DataError, match=r"bad.jsonl: record 1: field 'answer': the teacher context is answer_only"):
        build_sequences(TrainConfig(data=str(bad)), tiny_tok)
    assert len(build_sequences(TrainConfig(data=str(bad), loss="nll"), tiny_tok)) == 3  # nll has no teacher
    bad.write_text("".join(json.dumps(r | {"teacher_context": "hint"}) + "\n" for r in recs))
    with pytest.raises(DataError, match=r"record 1: field 'teacher_context': expected solution\|answer_only"):
        build_sequences(TrainConfig(data=str(bad)), tiny_tok)

    # Every problem needs an answer, checked before any model loads.
    none = _experts(tmp_path / "none.jsonl", answers=False)
    with pytest.raises(DataError, match=r"teacher_context answer_only needs a gold 'answer' for every problem.*3 of 3"):
        S.synthesize(_synth(tiny_dir, tmp_path / "none", teacher_context="answer_only",
                            data=DataConfig(source=str(none))), sampler=object())


def _records(path: Path, tok, **fields) -> Path:
    rows = [{"id": f"p{i}", "problem": f"x = {i} + 4", "solution": f"{i}+4={i + 4}", "answer": str(i + 4),
             "sample_index": 0, "landmarks": [str(i + 4)],
             "trajectory_ids": tok(f"\\boxed{{{i + 4}}}", add_special_tokens=False)["input_ids"]} | fields
            for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_training_renders_with_its_prompts_and_refuses_records_made_with_others(tiny_tok, tmp_path):
    from dail.training import build_sequences

    p = load_prompts(str(AUTHORS))
    made = _records(tmp_path / "authors.jsonl", tiny_tok, prompt_hash=p.hash)
    with pytest.raises(DataError, match=rf"authors.jsonl: record 1: field 'prompt_hash': '{p.hash}', but training "
                                        rf"renders its contexts with the built-in prompts \(hash '{BUILT_IN.hash}'\)"):
        build_sequences(TrainConfig(data=str(made)), tiny_tok)
    seqs = build_sequences(TrainConfig(data=str(made), prompts=str(AUTHORS)), tiny_tok)
    for i, s in enumerate(seqs):
        problem = f"x = {i} + 4"
        assert s.contexts["student"] == render(tiny_tok, student_messages(problem, p))
        assert s.contexts["teacher"] == render(tiny_tok, teacher_messages(problem, f"{i}+4={i + 4}", str(i + 4), p))
        assert s.contexts["negative"] == render(tiny_tok, negative_messages(problem, [str(i + 4)], str(i + 4), p))
        assert s.contexts["teacher"] != render(tiny_tok, teacher_messages(problem, f"{i}+4={i + 4}"))
    # Records made before prompt files carry no hash: trained with whatever texts training has.
    old = _records(tmp_path / "old.jsonl", tiny_tok)
    assert len(build_sequences(TrainConfig(data=str(old), prompts=str(AUTHORS)), tiny_tok)) == 2
    assert len(build_sequences(TrainConfig(data=str(old)), tiny_tok)) == 2
    # sft reads the expert set, not records: its student context follows the prompt file too.
    experts = _experts(tmp_path / "experts.jsonl")
    mine = write(tmp_path, "mine.yaml", {"version": "mine-v1", "student": "Q: {problem}"})
    sft = build_sequences(TrainConfig(loss="sft", expert=DataConfig(source=str(experts)), prompts=mine), tiny_tok)
    assert sft[0].contexts["student"] == render(tiny_tok, [{"role": "user", "content": "Q: Tom has 0 apples and "
                                                                                      "buys 4 more."}])


def test_evaluation_renders_the_student_text_and_records_the_hash(tiny, tiny_dir, tmp_path, monkeypatch):
    import dail.sampler as SM
    from dail.evaluation import evaluate

    model, tok = tiny
    seen = []
    real = SM.decode
    monkeypatch.setattr(SM, "decode", lambda model, prompts, **kw: seen.append(prompts) or real(model, prompts, **kw))
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n"
                             for i in range(2)), encoding="utf-8")
    mine = write(tmp_path, "mine.yaml", {"version": "mine-v1", "student": "Q: {problem}\n{instruction}"})
    p = load_prompts(mine)
    cfg = EvalConfig(model=ModelConfig(name=str(tiny_dir), device="cpu"), data=DataConfig(source=str(bench)),
                     out=str(tmp_path / "ev"), n=1, ks=[1], max_new_tokens=4, prompts=mine)
    summary = evaluate(cfg, model, tok)
    assert (summary["prompt_hash"], summary["prompt_version"]) == (p.hash, "mine-v1")
    assert seen == [[render(tok, [{"role": "user", "content": f"Q: What is {i}+1?\n{BUILT_IN.texts['instruction']}"}])
                     for i in range(2)]]
    assert [r["prompt_hash"] for r in read_records(tmp_path / "ev" / "samples.jsonl")] == [p.hash] * 2
    export = EvalConfig(**(vars(cfg) | {"out": str(tmp_path / "ex"), "export_prompts": True}))
    evaluate(export, model, tok)
    lines = [json.loads(x) for x in (tmp_path / "ex" / "prompts.jsonl").read_text().splitlines()]
    assert [x["prompt_ids"] for x in lines] == [render(tok, student_messages(f"What is {i}+1?", p)) for i in range(2)]
    assert lines[0]["prompt"].count("Q: What is 0+1?\nSolve the following problem.") == 1
    with pytest.raises(ConfigError, match=f"different '{PROMPT_HASH}'"):
        evaluate(EvalConfig(**(vars(cfg) | {"prompts": ""})), model, tok)


def test_grpo_rollouts_use_the_prompt_files_student_text(tiny, tmp_path):
    pytest.importorskip("trl")
    from dail.data import Example
    from dail.grpo import Rollout

    _, tok = tiny
    mine = write(tmp_path, "mine.yaml", {"version": "mine-v1", "student": "Q: {problem}"})
    p = load_prompts(mine)
    exs = [Example("p0", "What is 1+1?", "1+1=2", "2"), Example("p1", "What is 2+2?", "2+2=4", "4")]
    rollout = Rollout(tok, exs, {"p1": "Add."}, GRPOConfig(prompts=mine))
    assert rollout.plain == {ex.id: render(tok, [{"role": "user", "content": f"Q: {ex.problem}"}]) for ex in exs}
    assert rollout.hinted == {"p1": render(tok, [{"role": "user", "content": "Q: What is 2+2?\n\nHint: Add."}])}
    assert set(rollout.by_prompt) == {student_messages(ex.problem, p)[0]["content"] for ex in exs}


def test_the_built_in_file_ships_with_the_package():
    from dail.prompts import BUILT_IN_FILE

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert BUILT_IN_FILE.name in text and BUILT_IN_FILE.exists()
