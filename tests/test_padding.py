"""Ragged rows into batches: token rows and the KV-cache stacking decoding and training share."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from dail.padding import cache_kv, plain_cache, right_pad, stack_caches


def test_right_pad_rows():
    ids, attn = right_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert attn.tolist() == [[1, 1, 1], [1, 0, 0]]


def _cache(rows: int, width: int, start: float, layers: int = 2) -> DynamicCache:
    """A cache whose keys count up from `start` and whose values are the keys negated, (rows, 1, width, 2)."""
    cache = DynamicCache()
    for i in range(layers):
        k = start + 100 * i + torch.arange(rows * width * 2, dtype=torch.float32).reshape(rows, 1, width, 2)
        cache.update(k, -k, layer_idx=i)
    return cache


@pytest.mark.parametrize("side", ["left", "right"])
def test_stack_caches_pads_each_part_to_the_widest_with_masked_zeros(side):
    a, b = _cache(2, 3, 0.0), _cache(1, 5, 1000.0)
    a_kv, b_kv = cache_kv(a), cache_kv(b)
    mask_a, mask_b = torch.ones(2, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)
    mask_a[1, 0] = 0  # a part's own padding stays padding
    assert plain_cache(a) and plain_cache(b)
    mask = stack_caches(a, [(a_kv, mask_a), (b_kv, mask_b)], side)
    cols = slice(2, 5) if side == "left" else slice(0, 3)  # where part a's columns land
    gap = slice(0, 2) if side == "left" else slice(3, 5)
    assert mask.shape == (3, 5)
    assert mask[:2, cols].tolist() == mask_a.tolist() and (mask[:2, gap] == 0).all()
    assert (mask[2] == 1).all()
    for layer, (k_a, v_a), (k_b, v_b) in zip(a.layers, a_kv, b_kv):
        assert layer.keys.shape == layer.values.shape == (3, 1, 5, 2)
        assert torch.equal(layer.keys[:2, :, cols], k_a) and torch.equal(layer.values[:2, :, cols], v_a)
        assert (layer.keys[:2, :, gap] == 0).all() and (layer.values[:2, :, gap] == 0).all()
        assert torch.equal(layer.keys[2:], k_b) and torch.equal(layer.values[2:], v_b)
    with pytest.raises(ValueError, match="side"):
        stack_caches(a, [(a_kv, mask_a)], "middle")
