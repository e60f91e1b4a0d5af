"""Model loading and the transformers release dail is written against."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version
from transformers.models.llama.modeling_llama import LlamaForCausalLM


def test_transformers_floor_takes_the_cache_argument():
    # The decoding loop and the reference passes call `model(..., cache=...)`. Releases before
    # 5.24.0 only know `past_key_values=` and put `cache` into **kwargs unused, so the cache
    # stays empty (run once against 5.23.0: 7 of 8 decoding tests and this one fail).
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    floor = Version(re.search(r'"transformers>=([\d.]+)', pyproject).group(1))
    assert floor == Version("5.24.0")
    assert Version(version("transformers")) >= floor
    assert "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
