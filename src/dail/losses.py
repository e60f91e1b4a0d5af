"""Token losses for stage 2, as pure functions of tensors (DESIGN.md "Stage 2").

Every loss returns *sums* and a token *count*, never a mean: the training loop adds the sums
and counts over all micro-batches and processes of one optimizer step and divides once.

The DAIL per-token loss, full vocabulary, temperature 1:

    l_t = KL(p_θ,t ‖ p_T,t) − γ · KL(p_θ,t ‖ p_NR,t)
        = Σ_v p_θ(v) [ (1−γ) log p_θ(v) − log p_T(v) + γ log p_NR(v) ]

Gradients flow through the student only; the teacher and negative-reference logits are
detached here, whatever the caller did. Log-softmax always runs in fp32, whatever the
input dtype (bf16 log-probs lose about 3 significant digits, which is the size of a typical
per-token KL).

Beyond the paper:
- `neg_cap > 0` clamps the per-token KL(p_θ ‖ p_NR) at `neg_cap` *after* the vocabulary
  sum (never single vocabulary terms), which keeps γ ≥ 1 bounded. The logged KL_NR is the
  uncapped value, so the log shows what the cap is doing.
- `chunked_*` compute the same sums from final hidden states and the LM head weight, a
  chunk of masked tokens at a time, fused with their gradient: the (N, V) logits of the
  three roles are never all alive at once, in forward or backward, so peak memory does not
  grow with 3 × T × V. They equal the dense versions in value and gradient (tested).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ContrastiveSums", "contrastive_kl", "contrastive_terms", "chunked_contrastive_terms",
           "nll", "chunked_nll"]


class ContrastiveSums(NamedTuple):
    """Sums over masked tokens (0-dim fp32 tensors) and the number of masked tokens."""
    loss: Tensor         # Σ_t l_t (with the cap, if any)
    kl_teacher: Tensor   # Σ_t KL(p_θ ‖ p_T)
    kl_negative: Tensor  # Σ_t KL(p_θ ‖ p_NR), uncapped
    count: Tensor        # number of masked tokens (int64)


def _rows(x: Tensor, mask: Tensor) -> Tensor:
    """(B, T, D) -> (N, D): the masked positions only. Masked-out positions are never read,
    so whatever sits there (padding, prompt, even inf) cannot leak into the loss."""
    if x.shape[:2] != mask.shape:
        raise ValueError(f"logits/hidden {tuple(x.shape)} and mask {tuple(mask.shape)} disagree on (B, T)")
    return x[mask.bool()]


def _token_terms(s_logits: Tensor, t_logits: Tensor, n_logits: Tensor, gamma: float,
                 neg_cap: float) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of logits (N, V) -> summed (loss, KL_T, KL_NR) over the N rows, in fp32."""
    log_s = s_logits.float().log_softmax(-1)
    log_t = t_logits.detach().float().log_softmax(-1)
    log_n = n_logits.detach().float().log_softmax(-1)
    p_s = log_s.exp()
    kl_t = (p_s * (log_s - log_t)).sum(-1)  # (N,)
    kl_n = (p_s * (log_s - log_n)).sum(-1)  # (N,)
    neg = kl_n.clamp(max=neg_cap) if neg_cap > 0 else kl_n
    loss = kl_t - gamma * neg
    return loss.sum(), kl_t.sum(), kl_n.sum()


def contrastive_terms(student_logits: Tensor, teacher_logits: Tensor, negative_logits: Tensor,
                      mask: Tensor, gamma: float, neg_cap: float = 0.0) -> ContrastiveSums:
    """The DAIL loss and its two KL terms, summed over masked positions.

    Logits are (B, T, V), aligned so that position t predicts trajectory token t; mask is
    (B, T) (bool or 0/1). With γ = 0 this is plain reverse-KL self-distillation.
    """
    loss, kl_t, kl_n = _token_terms(_rows(student_logits, mask), _rows(teacher_logits, mask),
                                    _rows(negative_logits, mask), gamma, neg_cap)
    return ContrastiveSums(loss, kl_t, kl_n, mask.bool().sum())


def contrastive_kl(student_logits: Tensor, teacher_logits: Tensor, negative_logits: Tensor,
                   mask: Tensor, gamma: float, neg_cap: float = 0.0) -> tuple[Tensor, Tensor]:
    """(sum of per-token DAIL losses over masked positions, number of masked tokens).

    The public contract (DESIGN.md): logits (B, T, V) already aligned, mask (B, T).
    """
    sums = contrastive_terms(student_logits, teacher_logits, negative_logits, mask, gamma, neg_cap)
    return sums.loss, sums.count


def nll(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of token cross-entropies over masked positions, number of masked tokens).

    logits (B, T, V) aligned with targets (B, T): position t predicts targets[:, t].
    """
    rows, tgt = _rows(logits, mask), targets[mask.bool()]
    return F.cross_entropy(rows.float(), tgt, reduction="sum"), mask.bool().sum()


# ----------------------------------------------------------------------------- chunked, from hidden states
#
# The chunked losses are fused with the LM head: each chunk's forward builds its (c, V) logits,
# the loss, and at once the gradient with respect to the student's hidden states, (c, H); then
# its logits are freed. The backward only scales the stored (N, H) gradient. Nothing of size V
# outlives a chunk, and nothing is recomputed (activation checkpointing would rebuild all three
# roles' logits in the backward: 3 more LM-head matmuls per chunk).
#
# Gradients, per token, with z the student logits (derivation in the comments below):
#   contrastive: ∂l/∂z = p_θ ⊙ (a − Σ_v p_θ a),  a = (log p_θ − log p_T) − g (log p_θ − log p_NR)
#                with g = γ, or g = 0 where the cap is active (KL_NR > cap: the clamp is flat);
#   nll:         ∂l/∂z = softmax(z) − onehot(target).
# The LM head weight and bias are frozen (LoRA never touches the LM head), so they get none.


_WORKSPACE: dict[int, list[Tensor]] = {}  # columns -> buffers


def _workspace(count: int, rows: int, cols: int, device: torch.device) -> list[Tensor]:
    """`count` (rows, cols) fp32 buffers for the chunk loops.

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


def _fused_forward(h_s: Tensor, h_t: Tensor, h_n: Tensor, weight: Tensor, bias: Tensor | None,
                   gamma: float, neg_cap: float, chunk_size: int, need_grad: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    sums = torch.zeros(3, dtype=torch.float32, device=h_s.device)
    grad_h = torch.zeros_like(h_s) if need_grad else None
    rows = min(chunk_size, h_s.shape[0])
    # Four (c, V) fp32 buffers, reused by every chunk. Each op below is one pass over them, and
    # log_softmax / softmax are single row-wise kernels (the row stays in cache between their
    # max, sum and write), so the chunk costs its three matmuls plus about ten passes.
    bufs = _workspace(4, rows, weight.shape[0], h_s.device)
    for i in range(0, h_s.shape[0], chunk_size):
        sl = slice(i, i + chunk_size)
        c = h_s[sl].shape[0]
        z, d_t, d_n, log_s = (b[:c] for b in bufs)
        torch.log_softmax(_logits_into(z, h_t[sl], weight, bias), -1, out=d_t)  # log p_T
        torch.log_softmax(_logits_into(z, h_n[sl], weight, bias), -1, out=d_n)  # log p_NR
        torch.log_softmax(_logits_into(z, h_s[sl], weight, bias), -1, out=log_s)  # log p_θ
        p_s = torch.exp(log_s, out=z)
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
        sums += torch.stack([loss.sum(), kl_t.sum(), kl_n.sum()])
        if need_grad:
            # l = Σ_v p_v a_v(log p), and Σ_v p_v ∂(log p_v)/∂z_k = p_k − p_k = 0 for the part of a
            # that depends on z, so ∂l/∂z_k = p_k (a_k − Σ_v p_v a_v) with Σ_v p_v a_v = KL_T − g KL_NR.
            if g is None:
                a, mean_a = d_t.add_(d_n, alpha=-gamma), kl_t - gamma * kl_n
            else:
                a, mean_a = d_t.addcmul_(d_n, g[:, None], value=-1.0), kl_t - g * kl_n
            dz = a.sub_(mean_a[:, None]).mul_(p_s)  # (c, V)
            _grad_into(grad_h[sl], dz, weight)
    return sums[0], sums[1], sums[2], grad_h


class _FusedContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, h_t, h_n, weight, bias, gamma, neg_cap, chunk_size):
        loss, kl_t, kl_n, grad_h = _fused_forward(h_s, h_t, h_n, weight, bias, gamma, neg_cap, chunk_size,
                                                  need_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad_h)
        ctx.mark_non_differentiable(kl_t, kl_n)  # logged, not trained on
        return loss, kl_t, kl_n

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl_t, _grad_kl_n):
        (grad_h,) = ctx.saved_tensors
        return grad_loss * grad_h, None, None, None, None, None, None, None


def chunked_contrastive_terms(student_hidden: Tensor, teacher_hidden: Tensor, negative_hidden: Tensor,
                              weight: Tensor, mask: Tensor, gamma: float, neg_cap: float = 0.0,
                              chunk_size: int = 256, bias: Tensor | None = None) -> ContrastiveSums:
    """`contrastive_terms` from final hidden states (B, T, H) and the frozen LM head `weight` (V, H).

    The masked positions of the three roles are taken out first (N, H), then `chunk_size` of
    them at a time go through the LM head and the loss, fused with the gradient (see above):
    peak extra memory is a few (chunk, V) fp32 arrays whatever N is. Only `loss` carries a
    gradient (to the student hidden states); the KL sums are for logging.
    """
    h_s = _rows(student_hidden, mask)
    h_t = _rows(teacher_hidden, mask).detach()
    h_n = _rows(negative_hidden, mask).detach()
    loss, kl_t, kl_n = _FusedContrastive.apply(h_s, h_t, h_n, weight.detach(),
                                               None if bias is None else bias.detach(), gamma, neg_cap,
                                               chunk_size)
    return ContrastiveSums(loss, kl_t, kl_n, mask.bool().sum())


class _FusedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, tgt, chunk_size):
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if need_grad else None
        logits, log_p = _workspace(2, min(chunk_size, h.shape[0]), weight.shape[0], h.device)
        for i in range(0, h.shape[0], chunk_size):
            sl = slice(i, i + chunk_size)
            c = h[sl].shape[0]
            lp = torch.log_softmax(_logits_into(logits[:c], h[sl], weight, bias), -1, out=log_p[:c])
            picked = lp.gather(-1, tgt[sl, None])
            total -= picked.sum()
            if need_grad:
                dz = lp.exp_().scatter_add_(-1, tgt[sl, None], torch.full_like(picked, -1.0))
                _grad_into(grad_h[sl], dz, weight)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_h,) = ctx.saved_tensors
        return grad_total * grad_h, None, None, None, None


def chunked_nll(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, chunk_size: int = 256,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`nll` from final hidden states (B, T, H) and the frozen LM head `weight` (V, H), in fused chunks."""
    h, tgt = _rows(hidden, mask), targets[mask.bool()]
    total = _FusedNLL.apply(h, weight.detach(), None if bias is None else bias.detach(), tgt, chunk_size)
    return total, mask.bool().sum()
