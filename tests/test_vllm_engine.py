"""The vLLM engine's decisions, replayed without vLLM: `VLLMSampler` over a stand-in engine.

The stand-in (`ReplayEngine`) does what vLLM's scheduler does to dail's logits processor: it
adds requests to a batch, computes each running request's next-token logits (here: a full
forward of the tiny model over prompt + output), calls `DailLogits.apply`, emits the argmax and
removes finished requests. It can also do what breaks lockstep in vLLM (a request scheduled a
step late) and what repeats a step (a discarded prefill step). Given the same logits, the vLLM
engine must take the HF loop's decisions exactly: same tokens, same teacher mask, same p_S, p_T
and q. The tests that run vLLM itself, on the embedded model, are in test_vllm_live.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dail.sampler import HFSampler, Sampling
from dail.vllm_engine import DailLogits, VLLMSampler


class ReplayEngine:
    """Schedules requests the way vLLM does for the processor; `late` request indices join one step
    late (a split prefill), `repeat` request indices have their first step computed twice (the
    first one discarded, as vLLM does for a chunked prefill)."""

    def __init__(self, model, late=(), repeat=()):
        self.model, self.late, self.repeat = model, set(late), set(repeat)
        self.calls = 0

    @torch.no_grad()
    def _logits(self, rows):
        out = []
        for r in rows:
            ids = torch.tensor([r["prompt"] + r["out"]])
            out.append(self.model(input_ids=ids).logits[0, -1].float())
        return torch.stack(out)

    def generate(self, requests, params, use_tqdm=False):
        self.calls += 1
        proc = DailLogits()
        reqs = [dict(prompt=list(q["prompt_token_ids"]), params=p, out=[], done=False, joined=False,
                     repeated=False, index=i) for i, (q, p) in enumerate(zip(requests, params))]
        step = 0
        while not all(r["done"] for r in reqs):
            added = []
            for r in reqs:
                if not r["joined"] and (r["index"] not in self.late or step >= 1):
                    r["joined"] = True
                    added.append((r["index"], r["params"], r["prompt"], r["out"]))
            proc.update_state(SimpleNamespace(batch_size=len(reqs), removed=[], added=added, moved=[]))
            live = [r for r in reqs if r["joined"] and not r["done"]]
            # logits rows by batch index (= request index here); rows not running get zeros
            logits = torch.zeros(len(reqs), self.model.config.vocab_size)
            logits[[r["index"] for r in live]] = self._logits(live)
            again = [r for r in live if r["index"] in self.repeat and not r["repeated"]]
            if again:  # a step vLLM computes and throws away: the processor sees it, nothing is emitted
                proc.apply(logits.clone())
                for r in again:
                    r["repeated"] = True
            logits = proc.apply(logits)
            removed = []
            for r in live:
                tok = int(logits[r["index"]].argmax())
                r["out"].append(tok)
                p = r["params"]
                if tok in p.stop_token_ids or len(r["out"]) >= p.max_tokens:
                    r["done"] = True
                    removed.append(r["index"])
            proc.update_state(SimpleNamespace(batch_size=len(reqs), removed=removed, added=[], moved=[]))
            step += 1
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=r["out"])]) for r in reqs]


def _params(**kw):
    return SimpleNamespace(**kw)


def _vllm_sampler(model, tok, engine):
    s = VLLMSampler.__new__(VLLMSampler)
    s.tokenizer, s.label, s.dtype = tok, "replay", "float32"
    s.stop_ids = HFSampler(model, tok).stop_ids
    s.llm, s._threads, s._sampling_params = engine, torch.get_num_threads(), _params
    return s


def _prompts(tok, n):
    texts = ["Problem: Tom has 3 apples and buys 4 more.", "the a an of to and is 7", "0 1 2 3 4 5 + - = 12"]
    return [tok.encode(texts[i % 3] + " " * (i // 3)) for i in range(n)]


def _same(a, b):
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
    assert a.teacher_mask == b.teacher_mask
    for f in ("p_student", "p_teacher", "q", "entropy"):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-4, abs=1e-6), f


SAMPLINGS = [Sampling(temperature=1.0, max_new_tokens=12),
             Sampling(temperature=0.6, top_p=0.95, presence_penalty=1.5, max_new_tokens=12)]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_mixed_decisions_replayed_through_the_processor_equal_the_hf_loop(tiny, sampling):
    model, tok = tiny
    prompts = _prompts(tok, 6)
    teacher = [tok.encode("An expert's solution, for your reference: 3+4=7.") + p for p in prompts]
    seeds = [11, 12, 13, 14, 15, 16]
    want = HFSampler(model, tok).mixed(prompts, teacher, seeds, sampling, 0.02)
    got = _vllm_sampler(model, tok, ReplayEngine(model)).mixed(prompts, teacher, seeds, sampling, 0.02)
    assert sum(sum(d.teacher_mask) for d in want) > 0 and sum(len(d.tokens) - sum(d.teacher_mask) for d in want) > 0
    for a, b in zip(got, want):
        _same(a, b)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_plain_sampling_through_the_processor_equals_the_hf_loop_with_entropy_and_banned_ids(tiny, sampling):
    model, tok = tiny
    prompts = _prompts(tok, 5)
    seeds = [3, 1, 4, 1, 5]  # a repeated seed: the same draws for two rows
    banned = [tok.encode("7")[0]]
    want = HFSampler(model, tok).sample(prompts, seeds, sampling, banned_ids=banned, writer="teacher", entropy=True)
    got = _vllm_sampler(model, tok, ReplayEngine(model)).sample(prompts, seeds, sampling, banned_ids=banned,
                                                               writer="teacher", entropy=True)
    for a, b in zip(got, want):
        _same(a, b)
        assert banned[0] not in a.tokens and set(a.teacher_mask) == {1}


def test_a_pair_out_of_lockstep_is_detected_and_decoded_again_to_the_same_result(tiny):
    model, tok = tiny
    prompts = _prompts(tok, 4)
    teacher = [tok.encode("Key intermediate results: 7; 12") + p for p in prompts]
    seeds = [21, 22, 23, 24]
    sampling = SAMPLINGS[1]
    want = HFSampler(model, tok).mixed(prompts, teacher, seeds, sampling, 0.02)
    engine = ReplayEngine(model, late={3})  # pair 1's teacher request (index 3) joins a step late
    got = _vllm_sampler(model, tok, engine).mixed(prompts, teacher, seeds, sampling, 0.02)
    assert engine.calls > 1  # the broken pair was decoded again
    for a, b in zip(got, want):
        _same(a, b)


def test_a_step_computed_twice_draws_nothing_new(tiny):
    model, tok = tiny
    prompts = _prompts(tok, 3)
    seeds = [7, 8, 9]
    sampling = SAMPLINGS[0]
    want = HFSampler(model, tok).sample(prompts, seeds, sampling)
    got = _vllm_sampler(model, tok, ReplayEngine(model, repeat={0, 2})).sample(prompts, seeds, sampling)
    for a, b in zip(got, want):
        _same(a, b)


def test_requests_without_dails_tag_pass_through_untouched():
    proc = DailLogits()
    proc.update_state(SimpleNamespace(batch_size=1, removed=[], moved=[],
                                      added=[(0, SimpleNamespace(extra_args=None), [1, 2], [])]))
    logits = torch.randn(1, 10)
    assert torch.equal(proc.apply(logits.clone()), logits)
