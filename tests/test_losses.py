"""Each loss against an independent reference: F.kl_div, float64 by hand, TRL, a worked case."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dail.losses import (OBJECTIVES, chunked_contrastive_terms, chunked_loss, chunked_nll, chunked_terms,
                         contrastive_kl, contrastive_terms, forward_contrastive_terms, nll, nll_tokens,
                         reverse_contrastive_tokens)


def _logits(seed: int, B: int = 2, T: int = 5, V: int = 11, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale


def _mask(B: int = 2, T: int = 5) -> torch.Tensor:
    m = torch.zeros(B, T, dtype=torch.bool)
    m[0, 1:5] = True   # prompt position 0 masked out
    m[1, 2:4] = True   # prompt and padding masked out
    return m


def _reverse_kl_64(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ_v p_s (log p_s − log p_t) per position, float64."""
    ls, lt = s.double().log_softmax(-1), t.double().log_softmax(-1)
    return (ls.exp() * (ls - lt)).sum(-1)


def test_gamma_zero_is_reverse_kl_by_kl_div():
    s, t, n, m = _logits(0), _logits(1), _logits(2), _mask()
    loss, count = contrastive_kl(s, t, n, m, gamma=0.0)
    # F.kl_div(input, target, log_target=True) = Σ exp(target)·(target − input) = KL(target ‖ input),
    # so KL(p_θ ‖ p_T) takes input = log p_T and target = log p_θ.
    ref = F.kl_div(t.log_softmax(-1), s.log_softmax(-1), reduction="none", log_target=True).sum(-1)
    assert count.item() == 6
    torch.testing.assert_close(loss, ref[m].sum())
    # The wrong argument order (forward KL) gives a different number, so the test can fail.
    wrong = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="none", log_target=True).sum(-1)
    assert not torch.allclose(loss, wrong[m].sum(), atol=1e-3)


def test_gamma_positive_matches_float64_by_hand():
    s, t, n, m = _logits(3), _logits(4), _logits(5), _mask()
    gamma = 0.3
    sums = contrastive_terms(s, t, n, m, gamma)
    ls, lt, ln = (x.double().log_softmax(-1) for x in (s, t, n))
    per_token = (ls.exp() * ((1 - gamma) * ls - lt + gamma * ln)).sum(-1)  # docs/design.md's second form
    torch.testing.assert_close(sums.loss.double(), per_token[m].sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.kl_teacher.double(), _reverse_kl_64(s, t)[m].sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.kl_negative.double(), _reverse_kl_64(s, n)[m].sum(), rtol=1e-5, atol=1e-5)
    assert sums.count.item() == int(m.sum())


def test_gamma_zero_matches_trl_generalized_jsd():
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    s, t, n, m = _logits(6), _logits(7), _logits(8), _mask()
    labels = torch.where(m, torch.zeros_like(m, dtype=torch.long), torch.full_like(m, -100, dtype=torch.long))
    # TRL's beta=1 branch is KL(student ‖ teacher) per token, then the mean over unmasked tokens.
    ref = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=1.0)
    loss, count = contrastive_kl(s, t, n, m, gamma=0.0)
    torch.testing.assert_close(loss / count, ref)


def test_masked_positions_contribute_nothing():
    s, t, n, m = _logits(9), _logits(10), _logits(11), _mask()
    s = s.requires_grad_()
    loss, _ = contrastive_kl(s, t, n, m, gamma=0.2)
    loss.backward()
    grad = s.grad.clone()
    assert torch.all(grad[~m] == 0) and grad[m].abs().sum() > 0
    # Anything at masked positions, even inf/nan, changes nothing.
    s2, t2, n2 = s.detach().clone(), t.clone(), n.clone()
    for x in (s2, t2, n2):
        x[~m] = float("nan")
    s2.requires_grad_()
    loss2, _ = contrastive_kl(s2, t2, n2, m, gamma=0.2)
    loss2.backward()
    torch.testing.assert_close(loss2, loss.detach())
    torch.testing.assert_close(s2.grad[m], grad[m])


def test_small_case_by_hand():
    # V = 2, one token. Student logits (0, 0) -> p_θ = (1/2, 1/2).
    # Teacher logits (log 3, 0) -> p_T = (3/4, 1/4). NR logits (0, log 3) -> p_NR = (1/4, 3/4).
    # KL(p_θ ‖ p_T) = 1/2 log((1/2)/(3/4)) + 1/2 log((1/2)/(1/4)) = 1/2 log(2/3) + 1/2 log 2
    #              = 1/2 log(4/3) ≈ 0.143841.  By symmetry KL(p_θ ‖ p_NR) is the same number.
    # With γ = 0.5: l = (1 − 0.5) · 1/2 log(4/3) = 1/4 log(4/3) ≈ 0.071921.
    s = torch.tensor([[[0.0, 0.0]]])
    t = torch.tensor([[[math.log(3), 0.0]]])
    n = torch.tensor([[[0.0, math.log(3)]]])
    m = torch.ones(1, 1, dtype=torch.bool)
    sums = contrastive_terms(s, t, n, m, gamma=0.5)
    assert sums.kl_teacher.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert sums.kl_negative.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert sums.loss.item() == pytest.approx(0.25 * math.log(4 / 3), abs=1e-6)
    assert sums.count.item() == 1


def test_gamma_below_one_equals_tilted_kl_minus_log_z():
    # docs/design.md: for γ < 1, l = (1−γ)·[KL(p_θ ‖ q*) − log Z], q* ∝ p_T^{1/(1−γ)} · p_NR^{−γ/(1−γ)}.
    s, t, n, m = _logits(12), _logits(13), _logits(14), _mask()
    for gamma in (0.0, 0.3, 0.8):
        loss, _ = contrastive_kl(s, t, n, m, gamma)
        ls, lt, ln = (x.double().log_softmax(-1) for x in (s, t, n))
        log_unnorm = (lt - gamma * ln) / (1 - gamma)
        log_z = torch.logsumexp(log_unnorm, -1)
        log_q = log_unnorm - log_z[..., None]
        kl_q = (ls.exp() * (ls - log_q)).sum(-1)
        ref = ((1 - gamma) * (kl_q - log_z))[m].sum()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_gradient_flows_through_student_only():
    s, t, n = (_logits(i).requires_grad_() for i in (15, 16, 17))
    m = _mask()
    loss, _ = contrastive_kl(s, t, n, m, gamma=0.4)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and n.grad is None


def test_neg_cap_clamps_after_vocab_sum():
    s, t, n, m = _logits(18), _logits(19), _logits(20, scale=6.0), _mask()
    kl_n = _reverse_kl_64(s, n)[m]
    kl_t = _reverse_kl_64(s, t)[m]
    cap = float(kl_n.median())  # some tokens above, some below
    assert (kl_n > cap).any() and (kl_n < cap).any()
    gamma = 1.5
    sums = contrastive_terms(s, t, n, m, gamma, neg_cap=cap)
    ref = (kl_t - gamma * kl_n.clamp(max=cap)).sum()
    torch.testing.assert_close(sums.loss.double(), ref, rtol=1e-5, atol=1e-5)
    # Clamping single vocabulary terms instead would give another number.
    ls, ln = s.double().log_softmax(-1), n.double().log_softmax(-1)
    per_vocab = (ls.exp() * (ls - ln)).clamp(max=cap / s.shape[-1]).sum(-1)[m]
    assert not torch.allclose((kl_t - gamma * per_vocab).sum(), ref, atol=1e-3)
    # The logged KL_NR is uncapped, and a capped token pushes no gradient through the NR term.
    torch.testing.assert_close(sums.kl_negative.double(), kl_n.sum(), rtol=1e-5, atol=1e-5)
    huge = contrastive_terms(s, t, n, m, gamma, neg_cap=1e9)
    torch.testing.assert_close(huge.loss, contrastive_terms(s, t, n, m, gamma).loss)


def test_bf16_inputs_are_computed_in_fp32():
    s, t, n, m = _logits(21), _logits(22), _logits(23), _mask()
    sb, tb, nb = (x.bfloat16() for x in (s, t, n))
    sums = contrastive_terms(sb, tb, nb, m, gamma=0.2)
    assert sums.loss.dtype == torch.float32
    ref = contrastive_terms(sb.float(), tb.float(), nb.float(), m, gamma=0.2)  # same bf16 values, fp32 math
    torch.testing.assert_close(sums.loss, ref.loss, rtol=1e-6, atol=1e-6)
    total, _ = nll(sb, torch.zeros(2, 5, dtype=torch.long), m)
    assert total.dtype == torch.float32


def test_nll_matches_cross_entropy():
    s, m = _logits(24), _mask()
    tgt = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    total, count = nll(s, tgt, m)
    ref = -s.double().log_softmax(-1).gather(-1, tgt[..., None])[..., 0][m].sum()
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-5)
    assert count.item() == int(m.sum())


@pytest.mark.parametrize("cap", [0.0, 4.0])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_equals_dense_value_and_grad(chunk, cap):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 7, 8, 13
    W = torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g)
    hs = torch.randn(B, T, H, generator=g).requires_grad_()
    ht, hn = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    m = torch.rand(B, T, generator=g) > 0.3
    gamma = 0.7
    if cap:  # the cap is active on some tokens and not on others
        kl_n = _reverse_kl_64(F.linear(hs, W, b), F.linear(hn, W, b))[m]
        assert (kl_n > cap).any() and (kl_n < cap).any()

    dense = contrastive_terms(F.linear(hs, W, b), F.linear(ht, W, b), F.linear(hn, W, b), m, gamma, cap)
    (g_dense,) = torch.autograd.grad(dense.loss, hs)
    chunked = chunked_contrastive_terms(hs, ht, hn, W, m, gamma, cap, chunk_size=chunk, bias=b)
    (g_chunked,) = torch.autograd.grad(chunked.loss, hs)
    for a, c in zip(dense, chunked):
        torch.testing.assert_close(a, c)
    torch.testing.assert_close(g_dense, g_chunked)

    tgt = torch.randint(0, V, (B, T), generator=g)
    d_nll, d_n = nll(F.linear(hs, W, b), tgt, m)
    (gd,) = torch.autograd.grad(d_nll, hs)
    c_nll, c_n = chunked_nll(hs, W, tgt, m, chunk_size=chunk, bias=b)
    (gc,) = torch.autograd.grad(c_nll, hs)
    torch.testing.assert_close(d_nll, c_nll)
    torch.testing.assert_close(gd, gc)
    assert d_n == c_n


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="disagree"):
        contrastive_kl(_logits(0), _logits(1), _logits(2), torch.ones(2, 4, dtype=torch.bool), 0.1)


# ----------------------------------------------------------------------------- forward-KL direction

def _forward_kl_64(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ_v p_t (log p_t − log p_s) per position, float64: KL(p_t ‖ p_s)."""
    ls, lt = s.double().log_softmax(-1), t.double().log_softmax(-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def _mid_cap(kl: torch.Tensor) -> float:
    """A cap active on half the tokens, halfway between two of them (so no token sits on it)."""
    v = kl.double().sort().values
    return float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def test_forward_direction_matches_kl_div():
    s, t, n, m = _logits(30), _logits(31), _logits(32), _mask()
    gamma = 0.3
    sums = forward_contrastive_terms(s, t, n, m, gamma)
    # F.kl_div(input, target, log_target=True) = Σ exp(target)·(target − input) = KL(target ‖ input):
    # KL(p_T ‖ p_θ) takes input = log p_θ, target = log p_T (the reverse of test_gamma_zero_is_reverse_kl...).
    kl_t = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="none", log_target=True).sum(-1)[m]
    kl_n = F.kl_div(s.log_softmax(-1), n.log_softmax(-1), reduction="none", log_target=True).sum(-1)[m]
    torch.testing.assert_close(sums.kl_teacher, kl_t.sum())
    torch.testing.assert_close(sums.kl_negative, kl_n.sum())
    torch.testing.assert_close(sums.loss, (kl_t - gamma * kl_n).sum())
    assert sums.count.item() == int(m.sum())
    # It is not the reverse direction, so the test can tell them apart.
    assert not torch.allclose(sums.loss, contrastive_terms(s, t, n, m, gamma).loss, atol=1e-3)


@pytest.mark.parametrize("capped", [False, True])
def test_forward_direction_value_and_grad_match_float64_by_hand(capped):
    s, t, n, m = _logits(33), _logits(34), _logits(35, scale=4.0), _mask()
    gamma = 0.4
    kl_t, kl_n = _forward_kl_64(s, t), _forward_kl_64(s, n)
    cap = _mid_cap(kl_n[m]) if capped else 0.0
    if capped:
        assert (kl_n[m] > cap).any() and (kl_n[m] < cap).any()
    s = s.requires_grad_()
    sums = forward_contrastive_terms(s, t, n, m, gamma, neg_cap=cap)
    (grad,) = torch.autograd.grad(sums.loss, s)
    neg = kl_n.clamp(max=cap) if cap else kl_n
    torch.testing.assert_close(sums.loss.double(), (kl_t - gamma * neg)[m].sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.kl_negative.double(), kl_n[m].sum(), rtol=1e-5, atol=1e-5)  # uncapped
    # ∂/∂z of −Σ p_T log p_θ is p_θ − p_T (Σ p_T = 1), so ∂l/∂z = (p_θ − p_T) − g (p_θ − p_NR),
    # with g = γ, or 0 where the cap is active (the clamp is flat there); 0 at masked positions.
    p_s, p_t, p_n = (x.detach().double().softmax(-1) for x in (s, t, n))
    g = torch.where(kl_n <= cap, gamma, 0.0) if cap else torch.full_like(kl_n, gamma)
    want = ((p_s - p_t) - g[..., None] * (p_s - p_n)) * m[..., None]
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)


def test_forward_small_case_by_hand():
    # V = 2, one token, the same logits as test_small_case_by_hand: p_θ = (1/2, 1/2),
    # p_T = (3/4, 1/4), p_NR = (1/4, 3/4).
    # KL(p_T ‖ p_θ) = 3/4 log((3/4)/(1/2)) + 1/4 log((1/4)/(1/2)) = 3/4 log 3 − log 2 ≈ 0.130812.
    # By symmetry KL(p_NR ‖ p_θ) is the same; with γ = 0.5, l = 0.5 · (3/4 log 3 − log 2) ≈ 0.065406.
    s = torch.tensor([[[0.0, 0.0]]])
    t = torch.tensor([[[math.log(3), 0.0]]])
    n = torch.tensor([[[0.0, math.log(3)]]])
    m = torch.ones(1, 1, dtype=torch.bool)
    sums = forward_contrastive_terms(s, t, n, m, gamma=0.5)
    kl = 0.75 * math.log(3) - math.log(2)
    assert sums.kl_teacher.item() == pytest.approx(kl, abs=1e-6)
    assert sums.kl_negative.item() == pytest.approx(kl, abs=1e-6)
    assert sums.loss.item() == pytest.approx(0.5 * kl, abs=1e-6)


# ----------------------------------------------------------------------------- the one chunked loop

def _hidden_case(seed: int = 0, B: int = 2, T: int = 7, H: int = 8, V: int = 13):
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    hs = torch.randn(B, T, H, generator=g).requires_grad_()
    ht, hn = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g) * 2
    m = torch.rand(B, T, generator=g) > 0.3
    tgt = torch.randint(0, V, (B, T), generator=g)
    return W, b, hs, ht, hn, m, tgt


@pytest.mark.parametrize("capped", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_forward_direction_chunked_equals_dense_value_and_grad(chunk, capped):
    """contrastive_forward has no hand-derived gradient: the generic chunked path (autograd per
    chunk) must equal the dense loss in value and gradient."""
    W, b, hs, ht, hn, m, tgt = _hidden_case(1)
    kl_n = _forward_kl_64(F.linear(hs, W, b), F.linear(hn, W, b))[m]
    cap = _mid_cap(kl_n) if capped else 0.0
    if capped:
        assert (kl_n > cap).any() and (kl_n < cap).any()
    dense = forward_contrastive_terms(F.linear(hs, W, b), F.linear(ht, W, b), F.linear(hn, W, b), m, 0.6, cap)
    (g_dense,) = torch.autograd.grad(dense.loss, hs)
    assert OBJECTIVES["contrastive_forward"].kernel is None  # so this runs the generic path
    chunked = chunked_loss("contrastive_forward", (hs, ht, hn), W, tgt, m, 0.6, cap, chunk_size=chunk, bias=b)
    (g_chunked,) = torch.autograd.grad(chunked.loss, hs)
    for a, c in zip(dense, chunked):
        torch.testing.assert_close(a, c)
    torch.testing.assert_close(g_dense, g_chunked)


@pytest.mark.parametrize("chunk", [1, 5])
def test_generic_chunked_path_equals_the_hand_derived_kernels(chunk):
    """The autograd path over the dense formulas == the hand-fused contrastive and nll kernels."""
    W, b, hs, ht, hn, m, tgt = _hidden_case(2)
    kl_n = _reverse_kl_64(F.linear(hs, W, b), F.linear(hn, W, b))[m]
    for cap in (0.0, _mid_cap(kl_n)):
        fused = chunked_contrastive_terms(hs, ht, hn, W, m, 0.7, cap, chunk_size=chunk, bias=b)
        generic = chunked_terms(reverse_contrastive_tokens, (hs, ht, hn), W, tgt, m, 0.7, cap, chunk, b)
        for a, c in zip(fused, generic):
            torch.testing.assert_close(a, c)
        torch.testing.assert_close(torch.autograd.grad(fused.loss, hs)[0], torch.autograd.grad(generic.loss, hs)[0])
    total, count = chunked_nll(hs, W, tgt, m, chunk_size=chunk, bias=b)
    generic = chunked_terms(nll_tokens, (hs,), W, tgt, m, chunk_size=chunk, bias=b)
    torch.testing.assert_close(total, generic.loss)
    assert count == generic.count
    torch.testing.assert_close(torch.autograd.grad(total, hs)[0], torch.autograd.grad(generic.loss, hs)[0])


def test_every_loss_name_has_one_objective():
    """The table decides which roles run; the config accepts exactly its names."""
    from dail.config import ConfigError, TrainConfig

    for name, obj in OBJECTIVES.items():
        assert TrainConfig(loss=name, neg_cap=5.0).loss == name
        assert obj.roles[0] == "student" and set(obj.roles) <= {"student", "teacher", "negative"}
    assert OBJECTIVES["contrastive"].roles == OBJECTIVES["contrastive_forward"].roles == ("student", "teacher",
                                                                                           "negative")
    assert OBJECTIVES["nll"].roles == OBJECTIVES["sft"].roles == ("student",)
    with pytest.raises(ConfigError, match="loss"):
        TrainConfig(loss="reverse")
    with pytest.raises(ValueError, match="needs the hidden states"):
        W, b, hs, ht, hn, m, tgt = _hidden_case(3)
        chunked_loss("contrastive", (hs,), W, tgt, m, 0.1, 0.0)
