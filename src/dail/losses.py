"""Token losses for stage 2, as pure functions of tensors (docs/design.md "Stage 2: training").

Every loss returns *sums* and a token *count*, never a mean: the training loop adds the sums
and counts over all micro-batches and processes of one optimizer step and divides once.

The objectives, per trajectory token, full vocabulary, temperature 1:

    contrastive (DAIL, the paper's reverse KL):
        l_t = KL(p_θ,t ‖ p_T,t) − γ · KL(p_θ,t ‖ p_NR,t)
            = Σ_v p_θ(v) [ (1−γ) log p_θ(v) − log p_T(v) + γ log p_NR(v) ]
    contrastive_forward (the forward-KL direction, an option of the authors' released code):
        l_t = KL(p_T,t ‖ p_θ,t) − γ · KL(p_NR,t ‖ p_θ,t)
    nll, sft: l_t = −log p_θ(target_t)

`OBJECTIVES` maps each loss name to the roles it needs and its per-token formula. It is the one
place that decides which reference passes training runs. A new per-token objective is a
formula (the per-row log-probs of its roles -> per-token loss and the two logged terms) and one
row of that table; the chunked loop below then computes it from hidden states, with autograd.
Besides this file, only the `loss` field of `TrainConfig` (its allowed names) needs the name.

Gradients flow through the student only; the references' logits are detached here, whatever
the caller did. Log-softmax always runs in fp32, whatever the input dtype (bf16 log-probs lose
about 3 significant digits, which is the size of a typical per-token KL).

Beyond the paper:
- `neg_cap > 0` clamps the per-token negative KL at `neg_cap` *after* the vocabulary sum (never
  single vocabulary terms), which keeps γ ≥ 1 bounded. The logged negative KL is the uncapped
  value, so the log shows what the cap is doing.
- `chunked_*` compute the same sums from final hidden states and the LM head weight, a chunk of
  masked tokens at a time, each chunk's gradient computed with it: the (N, V) logits of the
  roles are never all alive at once, in forward or backward, so peak memory does not grow with
  3 × T × V. They equal the dense versions in value and gradient (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossSums", "Objective", "OBJECTIVES", "contrastive_kl", "contrastive_terms",
           "forward_contrastive_terms", "nll", "reverse_contrastive_tokens", "forward_contrastive_tokens",
           "nll_tokens", "chunked_loss", "chunked_terms", "chunked_contrastive_terms", "chunked_nll",
           "free_workspace"]


class LossSums(NamedTuple):
    """Sums over masked tokens (0-dim fp32 tensors) and the number of masked tokens."""
    loss: Tensor         # Σ_t l_t (with the cap, if any)
    kl_teacher: Tensor   # Σ_t of the teacher KL (its direction is the objective's; 0 for nll)
    kl_negative: Tensor  # Σ_t of the negative-reference KL, uncapped (0 for nll)
    count: Tensor        # number of masked tokens (int64)


# ----------------------------------------------------------------------------- per-token formulas
#
# A formula takes the per-row log-probs of its roles, (N, V) fp32 each, student first, and the
# (N,) target ids, and returns per-token (loss, teacher KL, negative KL), each (N,). It must not
# change its inputs in place (the chunked path differentiates it with autograd).

def _capped(kl_n: Tensor, neg_cap: float) -> Tensor:
    return kl_n.clamp(max=neg_cap) if neg_cap > 0 else kl_n


def reverse_contrastive_tokens(logp: tuple[Tensor, ...], targets: Tensor, gamma: float, neg_cap: float
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """KL(p_θ ‖ p_T) − γ · KL(p_θ ‖ p_NR) per row, from log-probs (student, teacher, negative)."""
    log_s, log_t, log_n = logp
    p_s = log_s.exp()
    kl_t = (p_s * (log_s - log_t)).sum(-1)
    kl_n = (p_s * (log_s - log_n)).sum(-1)
    return kl_t - gamma * _capped(kl_n, neg_cap), kl_t, kl_n


def forward_contrastive_tokens(logp: tuple[Tensor, ...], targets: Tensor, gamma: float, neg_cap: float
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """KL(p_T ‖ p_θ) − γ · KL(p_NR ‖ p_θ) per row, from log-probs (student, teacher, negative).

    The gradient with respect to the student logits is (1−γ)·p_θ − p_T + γ·p_NR (without the
    cap): the student is pulled toward p_T and pushed off the tokens p_NR favours. Unlike the
    reverse direction this is unbounded below for any γ > 0 where γ·p_NR(v) > p_T(v) for some
    v (driving p_θ(v) to 0 sends the loss to −∞); a `neg_cap` bounds it.
    """
    log_s, log_t, log_n = logp
    kl_t = (log_t.exp() * (log_t - log_s)).sum(-1)
    kl_n = (log_n.exp() * (log_n - log_s)).sum(-1)
    return kl_t - gamma * _capped(kl_n, neg_cap), kl_t, kl_n


def nll_tokens(logp: tuple[Tensor, ...], targets: Tensor, gamma: float, neg_cap: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    """−log p_θ(target) per row; nothing else to log."""
    loss = -logp[0].gather(-1, targets[:, None])[:, 0]
    zero = torch.zeros_like(loss)
    return loss, zero, zero


# ----------------------------------------------------------------------------- dense, from logits

def _rows(x: Tensor, mask: Tensor) -> Tensor:
    """(B, T, D) -> (N, D): the masked positions only. Masked-out positions are never read,
    so whatever sits there (padding, prompt, even inf) cannot leak into the loss."""
    if x.shape[:2] != mask.shape:
        raise ValueError(f"logits/hidden {tuple(x.shape)} and mask {tuple(mask.shape)} disagree on (B, T)")
    return x[mask.bool()]


def _dense(formula: Callable, logits: tuple[Tensor, ...], targets: Tensor | None, mask: Tensor, gamma: float,
           neg_cap: float) -> LossSums:
    """Sums of `formula` over the masked rows of (B, T, V) logits (student first, references detached)."""
    logp = tuple(_rows(x if i == 0 else x.detach(), mask).float().log_softmax(-1) for i, x in enumerate(logits))
    tgt = targets[mask.bool()] if targets is not None else None
    loss, kl_t, kl_n = formula(logp, tgt, gamma, neg_cap)
    return LossSums(loss.sum(), kl_t.sum(), kl_n.sum(), mask.bool().sum())


def contrastive_terms(student_logits: Tensor, teacher_logits: Tensor, negative_logits: Tensor,
                      mask: Tensor, gamma: float, neg_cap: float = 0.0) -> LossSums:
    """The DAIL loss and its two KL terms, summed over masked positions.

    Logits are (B, T, V), aligned so that position t predicts trajectory token t; mask is
    (B, T) (bool or 0/1). With γ = 0 this is plain reverse-KL self-distillation.
    """
    return _dense(reverse_contrastive_tokens, (student_logits, teacher_logits, negative_logits), None, mask,
                  gamma, neg_cap)


def forward_contrastive_terms(student_logits: Tensor, teacher_logits: Tensor, negative_logits: Tensor,
                              mask: Tensor, gamma: float, neg_cap: float = 0.0) -> LossSums:
    """`contrastive_terms` in the forward-KL direction: KL(p_T ‖ p_θ) − γ · KL(p_NR ‖ p_θ)."""
    return _dense(forward_contrastive_tokens, (student_logits, teacher_logits, negative_logits), None, mask,
                  gamma, neg_cap)


def contrastive_kl(student_logits: Tensor, teacher_logits: Tensor, negative_logits: Tensor,
                   mask: Tensor, gamma: float, neg_cap: float = 0.0) -> tuple[Tensor, Tensor]:
    """(sum of per-token DAIL losses over masked positions, number of masked tokens).

    The public contract: logits (B, T, V) already aligned, mask (B, T).
    """
    sums = contrastive_terms(student_logits, teacher_logits, negative_logits, mask, gamma, neg_cap)
    return sums.loss, sums.count


def nll(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of token cross-entropies over masked positions, number of masked tokens).

    logits (B, T, V) aligned with targets (B, T): position t predicts targets[:, t].
    """
    sums = _dense(nll_tokens, (logits,), targets, mask, 0.0, 0.0)
    return sums.loss, sums.count


# ----------------------------------------------------------------------------- chunked, from hidden states
#
# One loop (`_chunk_loop`) serves every objective. Per chunk of c masked tokens it builds each
# role's (c, V) logits from the hidden states and the frozen LM head, their fp32 log-probs, and
# hands them to a chunk kernel, which returns the chunk's three sums and dz = ∂(Σ loss)/∂z, the
# gradient with respect to the student's logits (c, V). The loop turns dz into the gradient with
# respect to the student's hidden states (c, H) and frees the chunk. The autograd backward then
# only scales the stored (N, H) gradient: nothing of size V outlives a chunk, in forward or
# backward, and nothing is recomputed.
#
# Kernels:
# - generic (`_autograd_kernel`): any formula. Its gradient with respect to the student's
#   log-probs, g, comes from autograd over the chunk; then dz = g − p_θ · Σ_v g_v (the
#   Jacobian of log-softmax). Memory: the formula's own (c, V) intermediates, freed per chunk.
# - hand-derived, the fast default where one exists (fewer (c, V) passes, reused buffers):
#   contrastive: ∂l/∂z = p_θ ⊙ (a − Σ_v p_θ a),  a = (log p_θ − log p_T) − g (log p_θ − log p_NR)
#                with g = γ, or g = 0 where the cap is active (KL_NR > cap: the clamp is flat);
#   nll:         ∂l/∂z = softmax(z) − onehot(target).
# The LM head weight and bias are frozen (LoRA never touches the LM head), so they get none.


_WORKSPACE: dict[int, list[Tensor]] = {}  # columns -> buffers


def _workspace(count: int, rows: int, cols: int, device: torch.device) -> list[Tensor]:
    """`count` (rows, cols) fp32 buffers for the chunk loop.

    On CPU they are kept between calls: a fresh (c, V) fp32 array is tens of MB, which the
    allocator maps anew and the kernel zero-fills page by page on first touch, and that costs
    more than the arithmetic of the op that asked for it (17 ms per 48 MiB on the 2-core test
    machine, against 5 ms for an exp over it). Kept buffers hold between steps the memory the
    step needs anyway. On GPUs the caching allocator already reuses memory, so nothing is kept.
    """
    if device.type != "cpu":
        return [torch.empty(rows, cols, dtype=torch.float32, device=device) for _ in range(count)]
    bufs = _WORKSPACE.get(cols, [])
    if len(bufs) < count or bufs[0].shape[0] < rows:
        _WORKSPACE.clear()
        bufs = _WORKSPACE[cols] = [torch.empty(rows, cols, dtype=torch.float32) for _ in range(count)]
    return [b[:rows] for b in bufs[:count]]


def free_workspace() -> None:
    """Drop the CPU buffers `_workspace` keeps (they are rebuilt on the next call)."""
    _WORKSPACE.clear()


def _logits_into(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """out ← h @ weightᵀ (+ bias) as fp32, in a reused (c, V) buffer (see `_workspace`).

    Under autocast, or with a bf16/fp16 model, the matmul runs in the compute dtype and is
    copied up to fp32.
    """
    if h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
        torch.mm(h, weight.t(), out=out)
        return out if bias is None else out.add_(bias)
    return out.copy_(F.linear(h, weight, bias))


def _grad_into(out: Tensor, dz: Tensor, weight: Tensor) -> None:
    """out ← dz @ weight: the gradient of the loss with respect to hidden states (c, H)."""
    if out.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(dz.device.type):
        torch.mm(dz, weight, out=out)
    else:
        out.copy_(dz.to(weight.dtype) @ weight)


# A chunk kernel: (log-probs per role (c, V) each, student first, in reused buffers it may
# overwrite; target ids (c,); a free (c, V) scratch buffer; need_grad; gamma; neg_cap)
#   -> (the chunk's (loss, teacher KL, negative KL) sums (3,), dz (c, V) or None).
Kernel = Callable[[list[Tensor], Tensor, Tensor, bool, float, float], tuple[Tensor, Tensor | None]]


def _chunk_loop(kernel: Kernel, hidden: tuple[Tensor, ...], targets: Tensor, weight: Tensor, bias: Tensor | None,
                gamma: float, neg_cap: float, chunk_size: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(Σ loss, Σ teacher KL, Σ negative KL) (3,) over rows (N, H) of each role, and the gradient
    of Σ loss with respect to the student's rows (N, H) if `need_grad`."""
    h_s = hidden[0]
    sums = torch.zeros(3, dtype=torch.float32, device=h_s.device)
    grad_h = torch.zeros_like(h_s) if need_grad else None
    # A logits buffer and a log-prob buffer per role, (c, V) fp32 each, reused by every chunk.
    # log_softmax is one row-wise kernel (the row stays in cache between its max, sum and write).
    scratch, *logp = _workspace(1 + len(hidden), min(chunk_size, h_s.shape[0]), weight.shape[0], h_s.device)
    for i in range(0, h_s.shape[0], chunk_size):
        sl = slice(i, i + chunk_size)
        c = h_s[sl].shape[0]
        lp = [buf[:c] for buf in logp]
        for k in reversed(range(len(hidden))):  # the student last: its log-probs are read first
            torch.log_softmax(_logits_into(scratch[:c], hidden[k][sl], weight, bias), -1, out=lp[k])
        chunk_sums, dz = kernel(lp, targets[sl], scratch[:c], need_grad, gamma, neg_cap)
        sums += chunk_sums
        if need_grad:
            _grad_into(grad_h[sl], dz, weight)
    return sums, grad_h


def _autograd_kernel(formula: Callable, logp: list[Tensor], targets: Tensor, scratch: Tensor, need_grad: bool,
                     gamma: float, neg_cap: float) -> tuple[Tensor, Tensor | None]:
    """Any per-token formula, its gradient by autograd over this chunk only."""
    log_s = logp[0].detach().requires_grad_(need_grad)
    with torch.enable_grad(), torch.autocast(log_s.device.type, enabled=False):
        loss, kl_t, kl_n = formula((log_s, *logp[1:]), targets, gamma, neg_cap)
        total = loss.sum()
        dz = None
        if need_grad:
            (g,) = torch.autograd.grad(total, log_s)  # ∂(Σ loss)/∂ log p_θ, (c, V)
            # Through log-softmax: dz = g − p_θ · Σ_v g_v (g may be a broadcast view: not in place).
            p_s = torch.exp(log_s.detach(), out=scratch).mul_(g.sum(-1, keepdim=True))
            dz = torch.sub(g, p_s, out=scratch)
    return torch.stack([total.detach(), kl_t.sum().detach(), kl_n.sum().detach()]), dz


def _contrastive_kernel(logp: list[Tensor], targets: Tensor, scratch: Tensor, need_grad: bool, gamma: float,
                        neg_cap: float) -> tuple[Tensor, Tensor | None]:
    """`reverse_contrastive_tokens` with its hand-derived gradient, in place in the four buffers."""
    log_s, d_t, d_n = logp  # d_t, d_n hold log p_T, log p_NR until overwritten below
    p_s = torch.exp(log_s, out=scratch)
    torch.sub(log_s, d_t, out=d_t)  # log p_θ − log p_T
    torch.sub(log_s, d_n, out=d_n)  # log p_θ − log p_NR
    kl_t = torch.mul(p_s, d_t, out=log_s).sum(-1)  # (c,); log p_θ is no longer needed
    kl_n = torch.mul(p_s, d_n, out=log_s).sum(-1)
    if neg_cap > 0:
        g = torch.where(kl_n <= neg_cap, gamma, 0.0)  # clamp(max=cap) passes gradient where kl_n <= cap
        loss = kl_t - gamma * kl_n.clamp(max=neg_cap)
    else:
        g = None
        loss = kl_t - gamma * kl_n
    sums = torch.stack([loss.sum(), kl_t.sum(), kl_n.sum()])
    if not need_grad:
        return sums, None
    # l = Σ_v p_v a_v(log p), and Σ_v p_v ∂(log p_v)/∂z_k = p_k − p_k = 0 for the part of a
    # that depends on z, so ∂l/∂z_k = p_k (a_k − Σ_v p_v a_v) with Σ_v p_v a_v = KL_T − g KL_NR.
    if g is None:
        a, mean_a = d_t.add_(d_n, alpha=-gamma), kl_t - gamma * kl_n
    else:
        a, mean_a = d_t.addcmul_(d_n, g[:, None], value=-1.0), kl_t - g * kl_n
    return sums, a.sub_(mean_a[:, None]).mul_(p_s)  # (c, V)


def _nll_kernel(logp: list[Tensor], targets: Tensor, scratch: Tensor, need_grad: bool, gamma: float,
                neg_cap: float) -> tuple[Tensor, Tensor | None]:
    """`nll_tokens` with its hand-derived gradient softmax(z) − onehot(target), in place."""
    (lp,) = logp
    picked = lp.gather(-1, targets[:, None])
    zero = picked.new_zeros(())
    sums = torch.stack([-picked.sum(), zero, zero])
    if not need_grad:
        return sums, None
    return sums, lp.exp_().scatter_add_(-1, targets[:, None], torch.full_like(picked, -1.0))


class _Chunked(torch.autograd.Function):
    """The chunk loop as one autograd node: forward stores the (N, H) student gradient, backward scales it."""

    @staticmethod
    def forward(ctx, kernel, weight, bias, targets, gamma, neg_cap, chunk_size, h_s, *h_refs):
        sums, grad_h = _chunk_loop(kernel, (h_s, *h_refs), targets, weight, bias, gamma, neg_cap, chunk_size,
                                   need_grad=ctx.needs_input_grad[7])
        ctx.save_for_backward(grad_h)
        loss, kl_t, kl_n = sums[0], sums[1], sums[2]
        ctx.mark_non_differentiable(kl_t, kl_n)  # logged, not trained on
        return loss, kl_t, kl_n

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl_t, _grad_kl_n):
        (grad_h,) = ctx.saved_tensors
        n_refs = len(ctx.needs_input_grad) - 8
        return (None,) * 7 + (grad_loss * grad_h,) + (None,) * n_refs


def _chunked(kernel: Kernel, hidden: tuple[Tensor, ...], weight: Tensor, targets: Tensor | None, mask: Tensor,
             gamma: float, neg_cap: float, chunk_size: int, bias: Tensor | None) -> LossSums:
    rows = [_rows(h if i == 0 else h.detach(), mask) for i, h in enumerate(hidden)]
    m = mask.bool()
    tgt = targets[m] if targets is not None else torch.zeros(rows[0].shape[0], dtype=torch.long,
                                                            device=rows[0].device)
    loss, kl_t, kl_n = _Chunked.apply(kernel, weight.detach(), None if bias is None else bias.detach(), tgt,
                                      gamma, neg_cap, chunk_size, *rows)
    return LossSums(loss, kl_t, kl_n, m.sum())


def chunked_terms(formula: Callable, hidden: tuple[Tensor, ...], weight: Tensor, targets: Tensor | None,
                  mask: Tensor, gamma: float = 0.0, neg_cap: float = 0.0, chunk_size: int = 256,
                  bias: Tensor | None = None) -> LossSums:
    """The sums of any per-token `formula` from final hidden states, chunk by chunk, with autograd.

    `hidden` are (B, T, H) per role, student first (only the student gets a gradient); `weight`
    (V, H) is the frozen LM head; targets (B, T) are needed by formulas that read them.
    Peak extra memory is a few (chunk, V) fp32 arrays whatever the number of tokens.
    """
    return _chunked(partial(_autograd_kernel, formula), hidden, weight, targets, mask, gamma, neg_cap,
                    chunk_size, bias)


def chunked_contrastive_terms(student_hidden: Tensor, teacher_hidden: Tensor, negative_hidden: Tensor,
                              weight: Tensor, mask: Tensor, gamma: float, neg_cap: float = 0.0,
                              chunk_size: int = 256, bias: Tensor | None = None) -> LossSums:
    """`contrastive_terms` from final hidden states (B, T, H) and the frozen LM head `weight` (V, H).

    The masked positions of the three roles are taken out first (N, H), then `chunk_size` of
    them at a time go through the LM head and the loss, with the hand-derived gradient (see
    above). Only `loss` carries a gradient (to the student hidden states); the KL sums are for
    logging.
    """
    return _chunked(_contrastive_kernel, (student_hidden, teacher_hidden, negative_hidden), weight, None, mask,
                    gamma, neg_cap, chunk_size, bias)


def chunked_nll(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, chunk_size: int = 256,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`nll` from final hidden states (B, T, H) and the frozen LM head `weight` (V, H), in chunks."""
    sums = _chunked(_nll_kernel, (hidden,), weight, targets, mask, 0.0, 0.0, chunk_size, bias)
    return sums.loss, sums.count


# ----------------------------------------------------------------------------- the objectives, by loss name

@dataclass(frozen=True)
class Objective:
    """What a loss name means: the roles whose hidden states it needs (the student first; the
    others are frozen references that training runs adapter-off), its per-token formula, and
    optionally a chunk kernel with a hand-derived gradient (the same numbers, faster)."""
    roles: tuple[str, ...]
    tokens: Callable
    kernel: Kernel | None = None


OBJECTIVES: dict[str, Objective] = {
    "contrastive": Objective(("student", "teacher", "negative"), reverse_contrastive_tokens, _contrastive_kernel),
    "contrastive_forward": Objective(("student", "teacher", "negative"), forward_contrastive_tokens),
    "nll": Objective(("student",), nll_tokens, _nll_kernel),
    "sft": Objective(("student",), nll_tokens, _nll_kernel),  # the same loss, on the expert solutions
}


def chunked_loss(name: str, hidden: tuple[Tensor, ...], weight: Tensor, targets: Tensor, mask: Tensor,
                 gamma: float, neg_cap: float, chunk_size: int = 256, bias: Tensor | None = None) -> LossSums:
    """The sums of objective `name` from hidden states (B, T, H), one per role of
    `OBJECTIVES[name].roles` in that order: its hand-derived kernel if it has one, else autograd."""
    obj = OBJECTIVES[name]
    if len(hidden) != len(obj.roles):
        raise ValueError(f"loss {name!r} needs the hidden states of {obj.roles}, got {len(hidden)} tensors")
    kernel = obj.kernel or partial(_autograd_kernel, obj.tokens)
    return _chunked(kernel, hidden, weight, targets, mask, gamma, neg_cap, chunk_size, bias)
