"""Mixed-policy decoding: the limits, greedy equivalence with generate(), batching invariance."""

from __future__ import annotations

from collections import Counter

import torch

from dail.decoding import decode, sampling_probs


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _prompts(tok, problems, solution=None):
    from dail.prompts import render, student_messages, teacher_messages

    if solution is None:
        return [render(tok, student_messages(p)) for p in problems]
    return [render(tok, teacher_messages(p, solution)) for p in problems]


PROBLEMS = ["Tom has 3 apples and buys 4 more.", "x = 12", "How many apples does he have? 7 8 9 + 24"]


def _greedy_generate(model, prompt, max_new_tokens, eos):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_tau_zero_is_pure_student_and_tau_above_one_is_pure_teacher(tiny):
    model, tok = tiny
    s, t = _prompts(tok, PROBLEMS), _prompts(tok, PROBLEMS, "3+4=7. #### 7")
    kw = dict(max_new_tokens=12, stop_ids=[2], pad_id=0, temperature=1.0)
    for r in decode(model, s, teacher_prompts=t, tau=0.0, generators=_gens(3), **kw):
        assert r.teacher_mask and sum(r.teacher_mask) == 0
    for r in decode(model, s, teacher_prompts=t, tau=1.01, generators=_gens(3), **kw):
        assert all(m == 1 for m in r.teacher_mask)


def test_greedy_limits_equal_generate(tiny):
    model, tok = tiny
    s, t = _prompts(tok, PROBLEMS), _prompts(tok, PROBLEMS, "3+4=7. #### 7")
    kw = dict(max_new_tokens=10, stop_ids=[2], pad_id=0, temperature=0.0)
    student = decode(model, s, teacher_prompts=t, tau=0.0, generators=_gens(3), **kw)
    teacher = decode(model, s, teacher_prompts=t, tau=1.5, generators=_gens(3), **kw)
    for i in range(3):
        assert student[i].tokens == _greedy_generate(model, s[i], 10, 2)
        assert teacher[i].tokens == _greedy_generate(model, t[i], 10, 2)


def test_batched_mixed_decoding_equals_unbatched(tiny):
    model, tok = tiny
    s, t = _prompts(tok, PROBLEMS), _prompts(tok, PROBLEMS, "3+4=7. #### 7")
    assert len({len(p) for p in s}) > 1  # mixed lengths, so left padding is exercised
    kw = dict(max_new_tokens=10, stop_ids=[2], pad_id=0, temperature=0.0, tau=0.05)
    batched = decode(model, s, teacher_prompts=t, generators=_gens(3), **kw)
    for i in range(3):
        alone = decode(model, [s[i]], teacher_prompts=[t[i]], generators=_gens(1, i), **kw)[0]
        assert alone.tokens == batched[i].tokens
        assert alone.teacher_mask == batched[i].teacher_mask


def test_sampling_is_per_row_seeded_and_repeated_prompts_share_a_prefill(tiny):
    model, tok = tiny
    s, t = _prompts(tok, PROBLEMS[:1]), _prompts(tok, PROBLEMS[:1], "3+4=7")
    kw = dict(max_new_tokens=8, stop_ids=[2], pad_id=0, temperature=1.0, tau=0.1)
    # Three samples of one problem in one batch == each sample decoded alone with its seed.
    together = decode(model, s * 3, teacher_prompts=t * 3, generators=_gens(3, 10), **kw)
    for i in range(3):
        alone = decode(model, s, teacher_prompts=t, generators=_gens(1, 10 + i), **kw)[0]
        assert alone.tokens == together[i].tokens
    assert len({tuple(r.tokens) for r in together}) > 1  # different seeds, different samples


def test_behaviour_probability_matches_definition(tiny):
    model, tok = tiny
    s, t = _prompts(tok, PROBLEMS[:1]), _prompts(tok, PROBLEMS[:1], "3+4=7")
    # temperature 1, top_p 1: both roles sample their own temperature-1 distributions, so
    # q(t) = p_S(t)·1[p_T(t) >= tau] + (sum_{p_T(u)<tau} p_S(u))·p_T(t).
    r = decode(model, s, teacher_prompts=t, tau=0.2, generators=_gens(1), max_new_tokens=6, stop_ids=[2],
               pad_id=0, temperature=1.0)[0]
    with torch.no_grad():
        for i, tok_id in enumerate(r.tokens):
            ls = model(torch.tensor([s[0] + r.tokens[:i]])).logits[0, -1].softmax(-1)
            lt = model(torch.tensor([t[0] + r.tokens[:i]])).logits[0, -1].softmax(-1)
            rejected = ls[lt < 0.2].sum()
            q = ls[tok_id] * (lt[tok_id] >= 0.2) + rejected * lt[tok_id]
            assert abs(r.p_student[i] - ls[tok_id].item()) < 1e-4
            assert abs(r.p_teacher[i] - lt[tok_id].item()) < 1e-4
            assert abs(r.q[i] - q.item()) < 1e-4
            if r.teacher_mask[i] == 0:  # an accepted student token clears the threshold
                assert lt[tok_id] >= 0.2


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = sampling_probs(logits, 1.0, 0.75)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.equal(sampling_probs(logits, 0.0, 1.0), torch.tensor([[1.0, 0, 0, 0]]))


def test_top_p_from_the_top_k_equals_the_full_sort_bit_for_bit():
    def full_sort(logits, temperature, top_p):  # the definition: sort the whole vocabulary
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_p, dtype=torch.bool).scatter(-1, order, (sorted_p.cumsum(-1) - sorted_p) >= top_p)
        probs = probs.masked_fill(drop, 0.0)
        return probs / probs.sum(-1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(16, 5000, generator=g) * 6  # nucleus inside the first 64 tokens
    flat = torch.randn(16, 5000, generator=g) * 0.5  # nucleus of thousands: the candidate set must grow
    for logits in (peaked, flat, torch.cat([peaked, flat])):
        for top_p in (0.5, 0.9, 0.95, 0.999):
            assert torch.equal(sampling_probs(logits, 0.6, top_p), full_sort(logits, 0.6, top_p)), top_p


def test_split_prefill_equals_joint_prefill(tiny):
    """Student and teacher rows prefilled separately and stacked == one joint left-padded prefill."""
    from dail.decoding import _prefill

    model, tok = tiny
    s, t = _prompts(tok, PROBLEMS), _prompts(tok, PROBLEMS, "3+4=7. #### 7 and a much longer expert solution " * 3)
    with torch.no_grad():
        l1, c1, m1, p1 = _prefill(model, s + t, 0, groups=2)
        l2, c2, m2, p2 = _prefill(model, s + t, 0, groups=1)
        assert torch.equal(m1, m2) and torch.equal(p1, p2)
        assert torch.allclose(l1, l2, atol=1e-5)
        step = torch.tensor([[5]] * len(s + t))
        kw = dict(position_ids=p1[:, None], use_cache=True)
        o1 = model(input_ids=step, attention_mask=torch.cat([m1, m1.new_ones(len(m1), 1)], 1), cache=c1, **kw).logits
        o2 = model(input_ids=step, attention_mask=torch.cat([m2, m2.new_ones(len(m2), 1)], 1), cache=c2, **kw).logits
    assert torch.allclose(o1, o2, atol=1e-5)
    # A prompt shared between the groups falls back to the joint prefill.
    l3, _, _, _ = _prefill(model, s + s, 0, groups=2)
    assert torch.allclose(l3[:3], l3[3:])


def test_plain_sampling_records_the_writers_probabilities(tiny):
    model, tok = tiny
    s = _prompts(tok, PROBLEMS[:1])
    r = decode(model, s, generators=_gens(1), max_new_tokens=5, stop_ids=[2], pad_id=0, temperature=0.7,
               writer="teacher")[0]
    assert r.teacher_mask == [1] * len(r.tokens)
    with torch.no_grad():
        for i, t in enumerate(r.tokens):
            logits = model(torch.tensor([s[0] + r.tokens[:i]])).logits[0, -1]
            assert abs(r.p_teacher[i] - logits.softmax(-1)[t].item()) < 1e-5
            assert abs(r.p_student[i] - (logits / 0.7).softmax(-1)[t].item()) < 1e-5 and r.q[i] == r.p_student[i]



def test_entropy_is_the_models_temperature_one_entropy_where_it_wrote_and_changes_no_token(tiny):
    model, tok = tiny
    s = _prompts(tok, PROBLEMS[:2])
    kw = dict(max_new_tokens=6, stop_ids=[2], pad_id=0, temperature=0.7, top_p=0.9, presence_penalty=1.5)
    plain = decode(model, s, generators=_gens(2), **kw)
    withh = decode(model, s, generators=_gens(2), entropy=True, **kw)
    assert [r.tokens for r in withh] == [r.tokens for r in plain] and not plain[0].entropy
    with torch.no_grad():
        for row, r in zip(s, withh):
            assert len(r.entropy) == len(r.tokens)
            for i in range(len(r.tokens)):
                p = model(torch.tensor([row + r.tokens[:i]])).logits[0, -1].float().softmax(-1)
                assert abs(r.entropy[i] - float(-(p * p.clamp_min(1e-30).log()).sum())) < 1e-4


# ----------------------------------------------------------------------------- penalties and banned tokens

def test_penalties_match_a_hand_computation():
    # logits (2, 1, 0.5, 0); token 0 generated 3 times, token 1 once; presence 0.5, frequency 0.25:
    # penalized logits = (2 - 0.5 - 0.75, 1 - 0.5 - 0.25, 0.5, 0) = (0.75, 0.25, 0.5, 0).
    import math

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    want = [0.75, 0.25, 0.5, 0.0]
    for temperature in (1.0, 0.5):
        z = sum(math.exp(w / temperature) for w in want)
        p = sampling_probs(logits, temperature, 1.0, counts=counts, presence_penalty=0.5, frequency_penalty=0.25)
        assert torch.allclose(p, torch.tensor([[math.exp(w / temperature) / z for w in want]]), atol=1e-7)
    # greedy follows the penalized logits: token 0 (2.0) loses to token 2 (0.5) under presence 1.6
    p = sampling_probs(logits, 0.0, 1.0, counts=counts, presence_penalty=1.6)
    assert p.argmax().item() == 2
    # banned tokens get probability 0, also under top-p and greedy
    p = sampling_probs(logits, 1.0, 0.9, banned=torch.tensor([0]))
    assert p[0, 0] == 0 and abs(p.sum().item() - 1) < 1e-6
    assert sampling_probs(logits, 0.0, 1.0, banned=torch.tensor([0, 1])).argmax().item() == 2


def test_penalized_decoding_equals_a_step_by_step_reference(tiny):
    """decode with penalties == recomputing every step from scratch with hand-counted penalties."""
    model, tok = tiny
    s = _prompts(tok, PROBLEMS[:2])
    pres, freq, temp = 1.5, 0.4, 0.8
    out = decode(model, s, generators=_gens(2, 3), max_new_tokens=10, stop_ids=[2], pad_id=0, temperature=temp,
                 presence_penalty=pres, frequency_penalty=freq)
    plain = decode(model, s, generators=_gens(2, 3), max_new_tokens=10, stop_ids=[2], pad_id=0, temperature=temp)
    assert any(a.tokens != b.tokens for a, b in zip(out, plain))  # the penalties changed something
    with torch.no_grad():
        for prompt, r in zip(s, out):
            for i, t in enumerate(r.tokens):
                logits = model(torch.tensor([prompt + r.tokens[:i]])).logits[0, -1].double()
                seen = Counter(r.tokens[:i])
                for v, c in seen.items():
                    logits[v] -= pres + freq * c
                p = (logits / temp).softmax(-1)
                assert abs(r.p_student[i] - p[t].item()) < 1e-4


def test_greedy_presence_penalty_never_repeats_when_large(tiny):
    model, tok = tiny
    s = _prompts(tok, PROBLEMS)
    kw = dict(generators=_gens(3), max_new_tokens=20, stop_ids=[], pad_id=0, temperature=0.0)
    plain = decode(model, s, **kw)
    assert any(len(set(r.tokens)) < len(r.tokens) for r in plain)  # greedy repeats itself on this model
    for r in decode(model, s, presence_penalty=2.0, frequency_penalty=2.0, **kw):
        assert len(set(r.tokens)) == len(r.tokens)


def test_zero_penalties_and_no_ban_change_nothing(tiny):
    model, tok = tiny
    s, t = _prompts(tok, PROBLEMS), _prompts(tok, PROBLEMS, "3+4=7. #### 7")
    kw = dict(max_new_tokens=10, stop_ids=[2], pad_id=0, temperature=0.9, tau=0.1, teacher_prompts=t)
    a = decode(model, s, generators=_gens(3), **kw)
    b = decode(model, s, generators=_gens(3), presence_penalty=0.0, frequency_penalty=0.0, banned_ids=[], **kw)
    assert [(r.tokens, r.p_student, r.q) for r in a] == [(r.tokens, r.p_student, r.q) for r in b]


def test_banned_ids_are_never_drawn_by_either_role(tiny):
    model, tok = tiny
    s, t = _prompts(tok, PROBLEMS), _prompts(tok, PROBLEMS, "3+4=7. #### 7")
    kw = dict(max_new_tokens=12, stop_ids=[2], pad_id=0, temperature=1.0, teacher_prompts=t)
    for tau in (0.0, 1.01):  # the student's and the teacher's own samples
        free = decode(model, s, generators=_gens(3), tau=tau, **kw)
        common = Counter(x for r in free for x in r.tokens).most_common(2)
        banned = [x for x, _ in common]
        for r in decode(model, s, generators=_gens(3), tau=tau, banned_ids=banned, **kw):
            assert not set(r.tokens) & set(banned)
