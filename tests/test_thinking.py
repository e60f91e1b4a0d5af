"""Thinking models: the model.thinking setting, synthesis inside the thinking block, forced answers.

The tiny tokenizer here has `<think>` / `</think>` as (non-special) added tokens, as Qwen3's
has, and a chat template written after Qwen3's: it reads `enable_thinking` and writes an empty
think block when thinking is off.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dail.evaluation as E
import dail.sampler as SM
import dail.scoring as SC
from conftest import CHAT_TEMPLATE, make_model, make_tokenizer
from dail.config import ConfigError, DataConfig, EvalConfig, ModelConfig, SynthConfig, TrainConfig
from dail.data import DataError, Example
from dail.decoding import Decoded, decode
from dail.models import load_model, load_tokenizer
from dail.prompts import (FORCED_ANSWER_CUE, direct_messages, negative_messages, render, set_thinking,
                          student_messages, teacher_messages, think_close_ids, thinking_on)
from dail.records import read_records

_TURNS = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}")
# After Qwen3's template: the generation prompt is the assistant header; enable_thinking=false
# adds an empty, closed think block.
THINK_TEMPLATE = (_TURNS + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                  "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
                  "{% endif %}{% endif %}")
# After the DeepSeek-R1 distills' template: the generation prompt opens the block itself.
OPENING_TEMPLATE = _TURNS + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"


def make_thinking_tokenizer(template: str = THINK_TEMPLATE):
    tok = make_tokenizer()
    tok.add_tokens(["<think>", "</think>"])  # not special: decoding keeps them, as Qwen3's tokenizer does
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def think_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-thinking")
    tok = make_thinking_tokenizer()
    make_model(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def think(think_dir):
    cfg = ModelConfig(name=str(think_dir), device="cpu")
    return load_model(cfg), load_tokenizer(cfg)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _close_biased(model, close_id: int, bias: float = 4.0):
    """The model with a bias towards the closing tag: left alone, it closes its block early."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[close_id] = bias
    model.lm_head = head
    return model


# ----------------------------------------------------------------------------- the setting and render

def test_render_opens_the_block_for_every_role_and_follows_the_setting():
    tok = make_thinking_tokenizer()
    roles = [student_messages("x = 12"), teacher_messages("x = 12", "12"), negative_messages("x = 12", ["12"]),
             direct_messages("x = 12", "12")]
    assert thinking_on(tok)  # auto: the template reads enable_thinking, and the tags are tokens
    for on, tail in ((True, "<|im_start|>assistant\n<think>\n"),
                     (False, "<|im_start|>assistant\n<think>\n\n</think>\n\n")):
        set_thinking(tok, "on" if on else "off")
        for messages in roles:
            text = tok.decode(render(tok, messages), skip_special_tokens=False)
            assert text.endswith(tail) and text.count("<think>") == 1, text
        # every role ends in the same ids, so one trajectory follows any of them
        suffix = render(tok, roles[0])[-len(_ids(tok, tail)):]
        assert all(render(tok, m)[-len(suffix):] == suffix for m in roles)
    assert think_close_ids(tok) == [tok.convert_tokens_to_ids("</think>")]


def test_a_template_that_opens_the_block_itself_is_not_opened_twice():
    tok = make_thinking_tokenizer(OPENING_TEMPLATE)
    assert thinking_on(tok)
    text = tok.decode(render(tok, student_messages("x")), skip_special_tokens=False)
    assert text.endswith("assistant\n<think>\n") and text.count("<think>") == 1
    set_thinking(tok, "off")  # closed empty, as Qwen3 does with enable_thinking=False
    assert tok.decode(render(tok, student_messages("x")), skip_special_tokens=False).endswith(
        "assistant\n<think>\n\n</think>\n\n")


def test_a_template_without_thinking_is_left_as_it_is():
    tok = make_tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE and not thinking_on(tok)
    messages = student_messages("x = 12")
    assert render(tok, messages) == list(tok.apply_chat_template(messages, tokenize=True,
                                                                  add_generation_prompt=True)["input_ids"])
    with pytest.raises(ConfigError, match="'model.thinking': 'on', but the tokenizer has no <think>"):
        set_thinking(tok, "on")


def test_load_tokenizer_stores_model_thinking(think_dir):
    assert thinking_on(load_tokenizer(ModelConfig(name=str(think_dir), device="cpu")))
    assert not thinking_on(load_tokenizer(ModelConfig(name=str(think_dir), device="cpu", thinking="off")))
    with pytest.raises(ConfigError, match="'model.thinking': expected auto|on|off"):
        ModelConfig(thinking="yes")


# ----------------------------------------------------------------------------- synthesis

def test_synthesis_stays_inside_the_thinking_block_and_training_reads_it(think, think_dir, tmp_path):
    from dail.synthesis import synthesize
    from dail.training import build_sequences

    model, tok = think
    close = tok.convert_tokens_to_ids("</think>")
    _close_biased(model, close)
    examples = [Example(id=f"e{i}", problem=p, solution="3+4=7. The answer is 7.")
                for i, p in enumerate(["Tom has 3 apples and buys 4 more.", "x = 12"])]
    prompt = render(tok, student_messages(examples[0].problem))
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    free = decode(model, [prompt] * 4, generators=gens, max_new_tokens=16, stop_ids=[2], pad_id=0, temperature=1.0)
    assert any(close in d.tokens for d in free)  # left alone, this model closes its block

    model_cfg = ModelConfig(name=str(think_dir), device="cpu")
    for mode in ("mixed", "direct"):
        out = synthesize(SynthConfig(model=model_cfg, out=str(tmp_path / mode / "synthetic.jsonl"), mode=mode,
                                     samples_per_problem=3, max_new_tokens=16, temperature=1.0, tau=0.3),
                         model, tok, examples)
        recs = read_records(out)
        assert len(recs) == 6
        for r in recs:
            assert r["thinking"] is True and close not in r["trajectory_ids"]
            assert len(r["trajectory_ids"]) <= 16
    assert any(r["finish_reason"] == "length" for r in recs)

    # Training consumes the records unchanged: every role's context opens the block, the target
    # is the trajectory as written.
    open_ids = _ids(tok, "<think>\n")
    train_cfg = TrainConfig(model=model_cfg, data=str(tmp_path / "mixed" / "synthetic.jsonl"), loss="contrastive")
    seqs = build_sequences(train_cfg, tok)
    assert len(seqs) == 6
    by_id = {f"{r['id']}#{r['sample_index']}": r for r in read_records(tmp_path / "mixed" / "synthetic.jsonl")}
    for s in seqs:
        assert set(s.contexts) == {"student", "teacher", "negative"}
        assert all(c[-len(open_ids):] == open_ids for c in s.contexts.values())
        assert s.target == by_id[s.id]["trajectory_ids"]
    # ... and refuses them under contexts without the block
    off = load_tokenizer(ModelConfig(name=str(think_dir), device="cpu", thinking="off"))
    with pytest.raises(DataError, match="record 1: field 'thinking': True, but training formats its contexts "
                                        "with thinking off"):
        build_sequences(train_cfg, off)


# ----------------------------------------------------------------------------- forced answers

PROBLEMS = [{"id": "p1", "problem": "Tom has 3 apples and buys 4 more.", "answer": "12"},
            {"id": "p2", "problem": "x = 12", "answer": "12"}]


@pytest.fixture()
def bench(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def _cfg(think_dir, bench, out, **kw):
    base = dict(model=ModelConfig(name=str(think_dir), device="cpu"), data=DataConfig(source=str(bench), split="test"),
                out=str(out), n=1, ks=[1], max_new_tokens=12, batch_size=6, temperature=0.7, seed=5, force_tokens=5)
    base.update(kw)
    return EvalConfig(**base)


def test_forced_answers_at_every_budget_from_hand_made_samples(think, think_dir, bench, tmp_path, monkeypatch):
    """p1's sample never leaves its block; p2's closes it at token c, then answers. Budgets: one
    before c (both forced), one after p2 ended (only p1 forced), and the largest, which p1 reaches
    through the length cap (forced) and p2 does not reach (not forced)."""
    model, tok = think
    inside = _ids(tok, "3 + 4 = 7 and 12 more, so the total is")
    closing = _ids(tok, "x = 12 so") + [tok.convert_tokens_to_ids("</think>")] + _ids(tok, " \\boxed{12}") + [2]
    c = closing.index(tok.convert_tokens_to_ids("</think>"))
    top = len(inside)
    assert 3 < c and len(closing) < top - 1
    b_early, b_late = 3, len(closing) + 1
    hand = {"p1": Decoded(inside, "length"), "p2": Decoded(closing, "stop")}
    answer = _ids(tok, "12}")
    calls = []
    real_prompts = {}

    def fake_decode(m, prompts, **kw):
        calls.append((prompts, kw))
        if len(calls) == 1:  # the sampling run: the hand-made samples
            order = [next(p for p in ("p1", "p2") if prompts[i] == real_prompts[p]) for i in range(len(prompts))]
            return [hand[p] for p in order]
        return [Decoded(list(answer), "stop") for _ in prompts]  # the forced continuations

    for p in PROBLEMS:
        real_prompts[p["id"]] = render(tok, student_messages(p["problem"]))
    monkeypatch.setattr(SM, "decode", fake_decode)
    cfg = _cfg(think_dir, bench, tmp_path / "ev", budgets=[b_early, b_late], max_new_tokens=top)
    s = E.evaluate(cfg, model, tok)

    assert len(calls) == 2  # one sampling run, then ONE batched decode for every forced (sample, budget)
    forced_prompts, kw = calls[1]
    cue = _ids(tok, FORCED_ANSWER_CUE)
    expect = sorted([real_prompts["p1"] + inside[:b] + cue for b in (b_early, b_late, top)]
                    + [real_prompts["p2"] + closing[:b_early] + cue], key=len)
    assert forced_prompts == expect and kw["max_new_tokens"] == 5
    recs = {r["id"]: r for r in read_records(tmp_path / "ev" / "samples.jsonl")}
    forced_text = FORCED_ANSWER_CUE + "12}"
    assert recs["p1"]["forced_at_budget"] == {str(b): forced_text for b in (b_early, b_late, top)}
    assert recs["p2"]["forced_at_budget"] == {str(b_early): forced_text, str(b_late): None, str(top): None}
    # unforced: p1 never answers, p2 answers once its box is there; forced: both answer 12 everywhere
    assert recs["p1"]["correct_at_budget"] == {str(b): False for b in (b_early, b_late, top)}
    assert recs["p2"]["correct_at_budget"] == {str(b_early): False, str(b_late): True, str(top): True}
    for r in recs.values():
        assert r["correct_forced_at_budget"] == {str(b): True for b in (b_early, b_late, top)}
        assert r["thinking"] is True
    by = s["by_budget"]
    assert [by[str(b)]["pass_at_k"]["1"]["mean"] for b in (b_early, b_late, top)] == [0.0, 0.5, 0.5]
    assert [by[str(b)]["forced_pass_at_k"]["1"]["mean"] for b in (b_early, b_late, top)] == [1.0, 1.0, 1.0]
    assert [by[str(b)]["forced_samples"] for b in (b_early, b_late, top)] == [2, 1, 1]
    assert s["forced_pass_at_k"] == by[str(top)]["forced_pass_at_k"] and s["thinking"] is True
    assert json.loads((tmp_path / "ev" / "summary.json").read_text()) == s

    # forcing turned off: the same samples, no forced columns anywhere
    calls.clear()
    s = E.evaluate(_cfg(think_dir, bench, tmp_path / "off", budgets=[b_early, b_late], max_new_tokens=top,
                        force_answer=False), model, tok)
    assert len(calls) == 1 and "forced_pass_at_k" not in s and "forced_pass_at_k" not in s["by_budget"][str(top)]
    assert all("forced_at_budget" not in r for r in read_records(tmp_path / "off" / "samples.jsonl"))


def test_forced_answers_do_not_depend_on_batching_and_resume_adds_them(think, think_dir, bench, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(SC, "grade_many", lambda preds, golds, timeout, kind="math", timed_out=None:
                        [len(p) % 2 == 0 for p in preds])
    model, tok = think
    kw = dict(n=3, ks=[1, 3], budgets=[4, 8], max_new_tokens=16, temperature=1.0)
    a = E.evaluate(_cfg(think_dir, bench, tmp_path / "a", batch_size=6, **kw), model, tok)
    b = E.evaluate(_cfg(think_dir, bench, tmp_path / "b", batch_size=2, **kw), model, tok)
    ra = {(r["id"], r["sample_index"]): r for r in read_records(tmp_path / "a" / "samples.jsonl")}
    rb = {(r["id"], r["sample_index"]): r for r in read_records(tmp_path / "b" / "samples.jsonl")}
    assert ra.keys() == rb.keys()
    n_forced = 0
    for key in ra:
        assert ra[key]["forced_at_budget"] == rb[key]["forced_at_budget"]
        for text in ra[key]["forced_at_budget"].values():
            n_forced += text is not None
            assert text is None or text.startswith(FORCED_ANSWER_CUE)
    assert n_forced > 0
    assert a["by_budget"] == b["by_budget"]
    # samples drawn with forcing off get their forced answers on a rerun, without sampling again
    off = _cfg(think_dir, bench, tmp_path / "c", batch_size=6, force_answer=False, **kw)
    E.evaluate(off, model, tok)
    real, sampled = SM.decode, []
    monkeypatch.setattr(SM, "decode", lambda m, p, **k: sampled.append(k["max_new_tokens"]) or real(m, p, **k))
    c = E.evaluate(_cfg(think_dir, bench, tmp_path / "c", batch_size=6, **kw), model, tok)
    assert sampled and set(sampled) == {5}  # only forced continuations were decoded
    rc = {(r["id"], r["sample_index"]): r for r in read_records(tmp_path / "c" / "samples.jsonl")}
    assert all(rc[k]["forced_at_budget"] == ra[k]["forced_at_budget"] for k in ra)
    assert c["by_budget"] == a["by_budget"]


def test_no_thinking_no_forcing(think_dir, bench, tmp_path, monkeypatch):
    monkeypatch.setattr(SC, "grade_many", lambda preds, golds, timeout, kind="math", timed_out=None:
                        [False] * len(preds))
    cfg = ModelConfig(name=str(think_dir), device="cpu", thinking="off")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    s = E.evaluate(_cfg(think_dir, bench, tmp_path / "ev", model=cfg, budgets=[4]), model, tok)
    assert s["thinking"] is False and "forced_pass_at_k" not in s
    recs = read_records(tmp_path / "ev" / "samples.jsonl")
    assert all(r["thinking"] is False and "forced_at_budget" not in r for r in recs)
    assert np.isfinite(s["pass_at_k"]["1"]["mean"])
