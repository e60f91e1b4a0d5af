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
  chunk of masked tokens at a time, under activation checkpointing: the (N, V) logits of
  the three roles are never all alive at once, in forward or backward, so peak memory does
  not grow with 3 × T × V. They equal the dense versions in value and gradient (tested).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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

def _logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(h, weight, bias)


def _contrastive_chunk(h_s: Tensor, h_t: Tensor, h_n: Tensor, weight: Tensor, bias: Tensor | None,
                       gamma: float, neg_cap: float) -> Tensor:
    loss, kl_t, kl_n = _token_terms(_logits(h_s, weight, bias), _logits(h_t, weight, bias),
                                    _logits(h_n, weight, bias), gamma, neg_cap)
    return torch.stack([loss, kl_t, kl_n])


def chunked_contrastive_terms(student_hidden: Tensor, teacher_hidden: Tensor, negative_hidden: Tensor,
                              weight: Tensor, mask: Tensor, gamma: float, neg_cap: float = 0.0,
                              chunk_size: int = 256, bias: Tensor | None = None) -> ContrastiveSums:
    """`contrastive_terms` from final hidden states (B, T, H) and the LM head `weight` (V, H).

    The masked positions of the three roles are taken out first (N, H), then `chunk_size` of
    them at a time go through the LM head and the loss. Each chunk runs under activation
    checkpointing, so its (chunk, V) logits are freed after the forward and rebuilt in the
    backward: peak extra memory is about 3 × chunk × V fp32 numbers whatever N is.
    """
    h_s = _rows(student_hidden, mask)
    h_t = _rows(teacher_hidden, mask).detach()
    h_n = _rows(negative_hidden, mask).detach()
    total = student_hidden.new_zeros(3, dtype=torch.float32)
    for i in range(0, h_s.shape[0], chunk_size):
        sl = slice(i, i + chunk_size)
        args = (h_s[sl], h_t[sl], h_n[sl], weight, bias, gamma, neg_cap)
        if h_s.requires_grad:
            total = total + checkpoint(_contrastive_chunk, *args, use_reentrant=False)
        else:
            total = total + _contrastive_chunk(*args)
    return ContrastiveSums(total[0], total[1], total[2], mask.bool().sum())


def _nll_chunk(h: Tensor, weight: Tensor, bias: Tensor | None, tgt: Tensor) -> Tensor:
    return F.cross_entropy(_logits(h, weight, bias).float(), tgt, reduction="sum")


def chunked_nll(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, chunk_size: int = 256,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`nll` from final hidden states (B, T, H) and the LM head `weight` (V, H), in chunks."""
    h, tgt = _rows(hidden, mask), targets[mask.bool()]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_size):
        sl = slice(i, i + chunk_size)
        if h.requires_grad:
            total = total + checkpoint(_nll_chunk, h[sl], weight, bias, tgt[sl], use_reentrant=False)
        else:
            total = total + _nll_chunk(h[sl], weight, bias, tgt[sl])
    return total, mask.bool().sum()
