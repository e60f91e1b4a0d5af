"""Ragged rows into rectangular batches: token-id rows and KV caches.

Two places stack KV caches of different widths into one batch: the decoder's split prefill
(student rows and teacher rows prefilled apart, then decoded together, left-padded) and the
training reference pass (the teacher's and the negative reference's context caches, then
every row's trajectory on top, right-padded). Both go through `stack_caches`: each part is
padded to the widest with zero key/value columns that its attention mask marks as padding,
so attention never reads them.

Only plain `DynamicLayer` caches (full keys and values per position) can be padded so;
sliding-window or linear-attention layers cannot, and callers then fall back to running
the rows together (`plain_cache`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from transformers.cache_utils import DynamicLayer

__all__ = ["right_pad", "plain_cache", "cache_kv", "stack_caches", "cache_arg"]

def cache_arg(cache: Any) -> dict[str, Any]:
    """The keyword argument that hands a KV `cache` to a model's forward in the installed release.

    transformers 5.24 renamed `past_key_values=` to `cache=` (the old name is accepted, with a
    warning, up to 5.40). Releases before 5.24, such as the one vLLM pins, know only the old name
    and would put `cache` into **kwargs unused, leaving the cache empty. The release decides, not
    the module's signature, because PEFT and DDP wrappers take **kwargs.
    """
    return {_CACHE_ARG: cache}


_CACHE_ARG = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"


def _gqa_in_sdpa_on_cpu() -> None:
    """Before 5.24, transformers' SDPA attention copies every key/value head `groups` times
    (`repeat_kv`) whenever a mask is given, which dail's left-padded decoding always gives: the
    whole KV cache, every step (measured on the embedded model: mixed decoding 15.8 tok/s on 5.19
    against 38.6 on 5.24, which packs the query heads instead). torch's CPU SDPA takes masked GQA
    itself (`enable_gqa`), so on the CPU this lets it: 34.6 tok/s on 5.19. Other devices keep
    transformers' rule."""
    from transformers.integrations import sdpa_attention

    rule = sdpa_attention.use_gqa_in_sdpa
    if getattr(rule, "dail", False):
        return

    def use_gqa_in_sdpa(attention_mask: Any, key: torch.Tensor, value: torch.Tensor) -> bool:
        return key.device.type == "cpu" or rule(attention_mask, key, value)

    use_gqa_in_sdpa.dail = True  # type: ignore[attr-defined]
    sdpa_attention.use_gqa_in_sdpa = use_gqa_in_sdpa


if _CACHE_ARG == "past_key_values":
    _gqa_in_sdpa_on_cpu()


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, each (R, heads, L, head_dim)


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids (R, L), attention (R, L)), right-padded with `pad_id` to the longest row."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
    return ids, attn


def plain_cache(cache: Any) -> bool:
    """True when every layer of `cache` is a plain DynamicLayer, which `stack_caches` can pad."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def cache_kv(cache: Any) -> KV:
    """The cache's current per-layer (keys, values): a snapshot that later crops or writes leave alone."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_to(x: torch.Tensor, width: int, dim: int, side: str) -> torch.Tensor:
    """Pad dimension `dim` (counted from the end: -1 or -2) of `x` with zeros up to `width`."""
    gap = width - x.shape[dim]
    before, after = (gap, 0) if side == "left" else (0, gap)
    return F.pad(x, (before, after) if dim == -1 else (0, 0, before, after))


def stack_caches(cache: Any, parts: list[tuple[KV, torch.Tensor]], side: str) -> torch.Tensor:
    """Put the rows of every part, one after another, into `cache`; return their attention mask.

    `parts` are (per-layer keys and values (R_i, heads, L_i, head_dim), attention mask
    (R_i, L_i)). Each part is padded on `side` ("left" or "right") to the widest L with zero
    columns, masked out. `cache` (a plain cache with as many layers) gets the stacked keys and
    values (ΣR_i, heads, W, head_dim); the returned mask is (ΣR_i, W).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    W = max(mask.shape[1] for _, mask in parts)
    for i, layer in enumerate(cache.layers):
        layer.keys = torch.cat([_pad_to(kv[i][0], W, -2, side) for kv, _ in parts])
        layer.values = torch.cat([_pad_to(kv[i][1], W, -2, side) for kv, _ in parts])
    return torch.cat([_pad_to(mask, W, -1, side) for _, mask in parts])
