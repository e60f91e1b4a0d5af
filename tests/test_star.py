"""STaR synthesis (`dail synth --mode star`): both paths and the empty one, the stored context,
resume, refusals, sharding, and training on the output with `--loss nll`.

The tiny random model almost never answers correctly, so grading is made deterministic by the
gold answer (`install_fake_grading`): answer 7 is always right (the self path serves it),
answer 8 only after a context holding the hint (the rationalized path), anything else never
(nothing). Decoding itself is real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dail import sampler, synthesis
from dail.config import ConfigError, DataConfig, ModelConfig, SynthConfig, TrainConfig, save
from dail.data import DataError
from dail.decoding import decode as real_decode, generator_for
from dail.layout import synth_files
from dail.models import load_model, load_tokenizer
from dail.prompts import (PROMPT_VERSION, RATIONALIZATION_PROMPT_VERSION, end_of_turn_id, end_of_turn_ids,
                          rationalization_messages, render, student_messages)
from dail.records import read_records
from dail.synthesis import synthesize

GOLD = {"solo": "7", "hinted": "8", "stuck": "9"}
HINT = "Hint: the correct final answer is"
R0 = SynthConfig.STAR_RATIONALIZED_FROM


def install_fake_grading(setattr_, tok) -> dict:
    """Grade by gold answer: '7' right, '8' right only when the prompt held the hint, else wrong.

    `decode` is wrapped only to see its prompts (which rows carry the hint); `grade_many` gets
    the rows of the batch just decoded, in order. Returns a log of what was decoded.
    """
    log = {"rows": 0, "hinted_prompts": [], "writers": []}
    last: list[bool] = []

    def decode(model, prompts, **kw):
        texts = [tok.decode(p) for p in prompts]
        last[:] = [HINT in t for t in texts]
        log["rows"] += len(prompts)
        log["hinted_prompts"] += [t for t in texts if HINT in t]
        log["writers"] += [(HINT in t, kw["writer"]) for t in texts]
        return real_decode(model, prompts, **kw)

    def grade_many(texts, golds, timeout, **kw):
        assert len(texts) == len(last), "grading should follow the batch just decoded"
        return [g == "7" or (g == "8" and hinted) for g, hinted in zip(golds, last)]

    setattr_(sampler, "decode", decode)
    setattr_(synthesis, "grade_many", grade_many)
    return log


@pytest.fixture()
def graded(monkeypatch, tiny_tok):
    return install_fake_grading(monkeypatch.setattr, tiny_tok)


def _experts(path: Path, ids=("solo", "hinted", "stuck"), answers=True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for n, pid in enumerate(ids):
            rec = {"id": pid, "problem": f"Tom has {n} apples and buys 4 more. How many apples does he have?",
                   "solution": f"{n}+4={n + 4}. #### {n + 4}"}
            if answers:
                rec["answer"] = GOLD[pid.rstrip("0123456789")]
            f.write(json.dumps(rec) + "\n")
    return path


def _cfg(tiny_dir, folder: Path, **kw) -> SynthConfig:
    data = kw.pop("data", None) or DataConfig(source=str(_experts(folder / "experts.jsonl")))
    base = dict(model=ModelConfig(name=str(tiny_dir), device="cpu"), data=data, mode="star",
                out=str(folder / "s" / "synthetic.jsonl"), max_new_tokens=12, batch_size=4,
                samples_per_problem=2, rationalization_samples=2, temperature=1.0)
    return SynthConfig(**(base | kw))


def _keyed(records):
    return {(r["id"], r["sample_index"]): (r.get("star_path"), r["trajectory_ids"]) for r in records}


def _read(out: Path) -> tuple[list[dict], list[dict], dict]:
    files = synth_files(out)
    return (read_records(out), read_records(files["rejected"]),
            json.loads(files["stats"].read_text(encoding="utf-8")))


def test_star_paths_records_and_stats(tiny_dir, tmp_path, graded):
    cfg = _cfg(tiny_dir, tmp_path)
    kept, rejected, stats = _read(synthesize(cfg))
    tok = load_tokenizer(cfg.model)

    # Which (problem, index) went where: solo is solved alone, so it is never rationalized; hinted
    # fails alone and every hinted attempt is right; stuck fails both ways and keeps nothing.
    where = {(r["id"], r["sample_index"]): ("kept" if r in kept else "rejected", r["star_path"])
             for r in kept + rejected}
    assert where == {
        ("solo", 0): ("kept", "self"), ("solo", 1): ("kept", "self"),
        ("hinted", 0): ("rejected", "self"), ("hinted", 1): ("rejected", "self"),
        ("hinted", R0): ("kept", "rationalized"), ("hinted", R0 + 1): ("kept", "rationalized"),
        ("stuck", 0): ("rejected", "self"), ("stuck", 1): ("rejected", "self"),
        ("stuck", R0): ("rejected", "rationalized"), ("stuck", R0 + 1): ("rejected", "rationalized"),
    }
    assert all(r["correct"] is True for r in kept) and all(r["correct"] is False for r in rejected)
    # The hint reached exactly the rationalization attempts, with the right answer in it.
    assert sum(f"{HINT} 8" in t for t in graded["hinted_prompts"]) == 2
    assert sum(f"{HINT} 9" in t for t in graded["hinted_prompts"]) == 2
    assert len(graded["hinted_prompts"]) == 4
    assert set(graded["writers"]) == {(False, "student"), (True, "teacher")}  # who is credited with the tokens

    stops = set(end_of_turn_ids(tok))
    assert end_of_turn_id(tok) in stops
    experts = {json.loads(line)["id"]: json.loads(line) for line in Path(cfg.data.source).read_text().splitlines()}
    for r in kept + rejected:
        ids = r["trajectory_ids"]
        n = len(ids)
        assert len(r["teacher_mask"]) == len(r["p_student"]) == len(r["p_teacher"]) == len(r["q"]) == n
        # The rationale as generated: ends with end-of-turn exactly when it stopped there.
        assert (r["finish_reason"] == "stop") == (ids[-1] in stops) and not stops & set(ids[:-1])
        assert r["finish_reason"] == "stop" or n == cfg.max_new_tokens
        assert r["trajectory"] == tok.decode(ids, skip_special_tokens=True)
        # The hinted model's tokens are marked as the teacher's; the model alone is the student.
        assert set(r["teacher_mask"]) == ({1} if r["star_path"] == "rationalized" else {0})
        # The record holds the plain problem, never the hint.
        assert r["problem"] == experts[r["id"]]["problem"] and HINT not in json.dumps(r)
        assert r["mode"] == "star" and r["tau"] == cfg.tau and r["prompt_version"] == PROMPT_VERSION
        assert r.get("rationalization_prompt_version") == (
            RATIONALIZATION_PROMPT_VERSION if r["star_path"] == "rationalized" else None)

    # A rationalized trajectory is the tokens decoded after the hinted context with its own seed.
    model = load_model(cfg.model)
    rec = next(r for r in kept if r["star_path"] == "rationalized")
    again = real_decode(model, [render(tok, rationalization_messages(rec["problem"], rec["answer"]))],
                        generators=[generator_for(cfg.seed, rec["id"], rec["sample_index"])],
                        max_new_tokens=cfg.max_new_tokens, stop_ids=end_of_turn_ids(tok), pad_id=tok.pad_token_id,
                        temperature=cfg.temperature, top_p=cfg.top_p, writer="teacher")[0]
    assert again.tokens == rec["trajectory_ids"]

    assert stats["star"] == {
        "problems": 3, "self": 1, "rationalized": 1, "nothing": 1,
        "self_attempts": 6, "self_correct": 2, "rationalization_attempts": 4, "rationalization_correct": 2,
        "skipped_attempts": 0, "rationalization_prompt_version": RATIONALIZATION_PROMPT_VERSION}
    assert stats["kept"] == 4 and stats["rejected"] == 6 and stats["mode"] == "star"


def test_star_set_trains_with_nll_on_the_plain_student_context(tiny_dir, tmp_path, graded):
    from dail.training import build_sequences, train

    out = synthesize(_cfg(tiny_dir, tmp_path))
    kept = read_records(out)
    tcfg = TrainConfig(model=ModelConfig(name=str(tiny_dir), device="cpu"), data=str(out), out=str(tmp_path / "t"),
                       loss="nll", batch_size=2, micro_batch_size=1, max_steps=2, lora_r=4, lora_alpha=8,
                       warmup_steps=0, report_to="none", save_every=0)
    tok = load_tokenizer(tcfg.model)
    seqs = build_sequences(tcfg, tok)
    assert len(seqs) == len(kept) == 4
    for seq, rec in zip(seqs, kept):
        # problem -> rationale: the only context is the student's, rendered from the plain problem.
        assert set(seq.contexts) == {"student"}
        assert seq.contexts["student"] == render(tok, student_messages(rec["problem"]))
        assert HINT not in tok.decode(seq.contexts["student"])
        assert seq.target == rec["trajectory_ids"]
    adapter = train(tcfg)
    assert (adapter / "adapter_model.safetensors").exists()
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)


def test_star_resumes_an_interrupted_run_and_refuses_other_settings(tiny_dir, tmp_path, graded):
    ref_kept, ref_rejected, ref_stats = _read(synthesize(_cfg(tiny_dir, tmp_path / "ref")))

    cfg = _cfg(tiny_dir, tmp_path / "crash")
    out = synthesize(cfg)
    files = synth_files(out)
    # Killed while writing the rationalization batch: every self attempt written, one
    # rationalized record kept, the next one torn, none of stuck's rationalized ones rejected yet.
    kept_lines = out.read_text().splitlines(keepends=True)
    rejected_lines = files["rejected"].read_text().splitlines(keepends=True)
    assert [json.loads(x)["star_path"] for x in kept_lines] == ["self", "self", "rationalized", "rationalized"]
    assert [json.loads(x)["star_path"] for x in rejected_lines][:4] == ["self"] * 4
    out.write_text("".join(kept_lines[:3]) + kept_lines[3][:30])
    files["rejected"].write_text("".join(rejected_lines[:4]))

    before = graded["rows"]
    with pytest.warns(UserWarning, match="torn last line"):
        synthesize(cfg)
    assert graded["rows"] - before == 3  # only the missing attempts: hinted #1, stuck #0 and #1
    kept, rejected, stats = _read(out)
    assert _keyed(kept) == _keyed(ref_kept) and _keyed(rejected) == _keyed(ref_rejected)
    assert len(kept) == len(_keyed(kept)) and len(rejected) == len(_keyed(rejected))
    assert stats["star"] == ref_stats["star"]

    # Other settings that the records depend on are refused, and nothing written is lost.
    snapshot = (out.read_text(), files["rejected"].read_text())
    with pytest.raises(ConfigError, match="different 'rationalization_samples'"):
        synthesize(_cfg(tiny_dir, tmp_path / "crash", rationalization_samples=3))
    with pytest.raises(ConfigError, match="different 'mode'"):
        synthesize(_cfg(tiny_dir, tmp_path / "crash", mode="mixed"))
    assert (out.read_text(), files["rejected"].read_text()) == snapshot

    # More attempts without the hint may be added later: rationalization indices are a block apart.
    before = graded["rows"]
    synthesize(_cfg(tiny_dir, tmp_path / "crash", samples_per_problem=3))
    assert graded["rows"] - before == 3
    kept, rejected, stats = _read(out)
    assert {k for k, (path, _) in _keyed(kept).items() if path == "self"} == {("solo", 0), ("solo", 1), ("solo", 2)}
    assert stats["star"]["self_attempts"] == 9 and stats["star"]["rationalization_attempts"] == 4


def test_star_two_processes_give_the_same_records_as_one(tiny_dir, tmp_path, tiny_tok, monkeypatch):
    ids = ("solo1", "hinted1", "stuck1", "hinted2", "solo2")
    install_fake_grading(monkeypatch.setattr, tiny_tok)
    cfg = _cfg(tiny_dir, tmp_path / "one", data=DataConfig(source=str(_experts(tmp_path / "experts.jsonl", ids))))
    one_kept, one_rejected, one_stats = _read(synthesize(cfg))

    # Each launched process installs the same fake grading, then runs the ordinary CLI.
    script = tmp_path / "launch_star.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import make_tokenizer\n"
        "from test_star import install_fake_grading\n"
        "install_fake_grading(setattr, make_tokenizer())\n"
        "from dail.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out2 = tmp_path / "two" / "synthetic.jsonl"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                    "synth", "--mode", "star", "--model.name", str(tiny_dir), "--model.device", "cpu",
                    "--data.source", cfg.data.source, "--out", str(out2), "--max_new_tokens", "12",
                    "--batch_size", "4", "--samples_per_problem", "2", "--rationalization_samples", "2",
                    "--temperature", "1.0"],
                   check=True, env=env, capture_output=True)
    two_kept, two_rejected, two_stats = _read(out2)
    assert _keyed(two_kept) == _keyed(one_kept) and _keyed(two_rejected) == _keyed(one_rejected)
    assert two_stats["star"] == one_stats["star"]
    assert one_stats["star"] == {
        "problems": 5, "self": 2, "rationalized": 2, "nothing": 1, "self_attempts": 10, "self_correct": 4,
        "rationalization_attempts": 6, "rationalization_correct": 4, "skipped_attempts": 0,
        "rationalization_prompt_version": RATIONALIZATION_PROMPT_VERSION}
    assert not list(out2.parent.glob("*rank*"))  # shards merged and removed


def test_star_too_long_contexts_are_skipped_and_count_as_nothing(tiny_dir, tmp_path, graded):
    out = synthesize(_cfg(tiny_dir, tmp_path, max_new_tokens=5000))
    skipped = read_records(synth_files(out)["skipped"])
    # Nothing fits, so no self attempt solves anything and every problem is tried with the hint too.
    assert {(r["id"], r["sample_index"], r["star_path"]) for r in skipped} == (
        {(pid, i, "self") for pid in GOLD for i in (0, 1)}
        | {(pid, R0 + j, "rationalized") for pid in GOLD for j in (0, 1)})
    assert "exceeds the model window of 1024" in skipped[0]["reason"]
    assert read_records(out) == [] and graded["rows"] == 0
    star = json.loads(synth_files(out)["stats"].read_text())["star"]
    assert (star["self"], star["rationalized"], star["nothing"], star["skipped_attempts"]) == (0, 0, 3, 12)


def test_star_refuses_bad_input_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from dail.cli import main

    def no_model(*a, **k):
        raise AssertionError("no model should load for bad input")

    monkeypatch.setattr(sampler, "load_model", no_model)
    monkeypatch.setattr(synthesis, "load_tokenizer", no_model)
    data = _experts(tmp_path / "experts.jsonl")
    lines = data.read_text().splitlines()
    rec = json.loads(lines[1])
    del rec["answer"]
    data.write_text("\n".join([lines[0], json.dumps(rec), lines[2]]) + "\n")
    cfg = SynthConfig(model=ModelConfig(name="nowhere", device="cpu"), data=DataConfig(source=str(data)), mode="star",
                      out=str(tmp_path / "s" / "synthetic.jsonl"))
    with pytest.raises(DataError, match=r"mode star needs a gold 'answer' for every problem.*1 of 3 .*'hinted'"):
        synthesize(cfg)
    assert not Path(cfg.out).exists()

    # The same through the CLI: a clear message and exit status 2.
    with pytest.raises(SystemExit) as e:
        main(["synth", "--mode", "star", "--model.name", "nowhere", "--data.source", str(data),
              "--out", str(tmp_path / "c" / "synthetic.jsonl")])
    assert e.value.code == 2 and "needs a gold 'answer'" in capsys.readouterr().err

    # A star rerun into a mixed-mode output is refused before anything loads.
    mixed = SynthConfig(model=ModelConfig(name="nowhere", device="cpu"), data=DataConfig(source=str(data)),
                        out=str(tmp_path / "m" / "synthetic.jsonl"))
    save(mixed, synth_files(mixed.out)["config"])
    Path(mixed.out).write_text('{"id": "solo", "sample_index": 0}\n')
    with pytest.raises(ConfigError, match="different 'mode' \\('mixed', now 'star'\\)"):
        synthesize(SynthConfig(**{**mixed.__dict__, "mode": "star"}))

    for bad, match in ((dict(mode="starr"), "expected mixed\\|direct\\|star"),
                       (dict(mode="star", samples_per_problem=R0 + 1), f"must be <= {R0} in star mode"),
                       (dict(mode="star", rationalization_samples=-1), "rationalization_samples")):
        with pytest.raises(ConfigError, match=match):
            SynthConfig(**bad)
