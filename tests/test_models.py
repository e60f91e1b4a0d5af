"""Model loading and the transformers release dail is written against."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version
from transformers.models.llama.modeling_llama import LlamaForCausalLM


def test_the_cache_reaches_the_forward_in_the_installed_release(tiny):
    # The decoding loop and the reference passes hand their KV cache through `padding.cache_arg`.
    # Releases before 5.24.0 only know `past_key_values=` and would put `cache` into **kwargs
    # unused, so the cache stays empty (run once against 5.23.0 with `cache=`: 7 of 8 decoding
    # tests failed); 5.24 and later take `cache=`. The floor is the release vLLM pins.
    import torch
    from transformers import DynamicCache

    from dail.padding import cache_arg

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    floor = Version(re.search(r'"transformers>=([\d.]+)', pyproject).group(1))
    assert floor == Version("5.19.0")
    assert Version(version("transformers")) >= floor
    expected = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    assert list(cache_arg(None)) == [expected]
    model, _ = tiny
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **cache_arg(cache))
    assert cache.get_seq_length() == 3
    if expected == "past_key_values":  # before 5.24: masked GQA goes to torch's SDPA on the CPU (padding.py)
        from transformers.integrations import sdpa_attention

        kv = torch.zeros(1, 2, 3, 8)
        assert sdpa_attention.use_gqa_in_sdpa(torch.ones(1, 1, 1, 3, dtype=torch.bool), kv, kv)


# ----------------------------------------------------------------------------- GPU paths, checked on the CPU

def test_models_load_with_sdpa_attention(tiny):
    # transformers picks SDPA when nothing is asked for; dail's decoding and training rely on it
    # (left-padded rows with explicit masks) and never ask for eager attention.
    model, _ = tiny
    assert model.config._attn_implementation == "sdpa"


def test_auto_dtype_is_bf16_on_a_gpu_that_has_it(monkeypatch):
    import torch

    from dail.models import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32  # fp16 is never chosen for you
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16


def test_training_with_gradient_checkpointing_recomputes_the_student(tiny_dir, tiny_tok, tmp_path, monkeypatch):
    """train.gradient_checkpointing reaches the decoder layers: the student's forward goes through
    the checkpoint function (the reference passes, without gradients, do not)."""
    import transformers.modeling_utils as mu

    from dail.config import ModelConfig, TrainConfig
    from dail.training import train
    from test_training import write_synthetic

    calls = []
    real = mu.checkpoint
    monkeypatch.setattr(mu, "checkpoint", lambda fn, *a, **k: calls.append(1) or real(fn, *a, **k))
    data = write_synthetic(tmp_path / "synthetic.jsonl", tiny_tok, n=2)
    cfg = dict(model=ModelConfig(name=str(tiny_dir), device="cpu"), data=str(data), batch_size=2,
               micro_batch_size=2, max_steps=1, lora_r=4, lora_alpha=8, report_to="none", save_every=0)
    train(TrainConfig(out=str(tmp_path / "plain"), **cfg))
    assert not calls
    train(TrainConfig(out=str(tmp_path / "gc"), gradient_checkpointing=True, **cfg))
    assert len(calls) == 2  # one student forward through each of the 2 decoder layers


def test_gpu_loads_bf16_sdpa_and_decodes(tiny_dir):
    """On a GPU (skipped elsewhere): auto dtype is bf16 where supported, attention is SDPA, and
    the decoding loop runs with the model's own dtype."""
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from dail.config import ModelConfig
    from dail.decoding import decode
    from dail.models import load_model, load_tokenizer
    from dail.prompts import render, student_messages

    cfg = ModelConfig(name=str(tiny_dir))
    model, tok = load_model(cfg), load_tokenizer(cfg)
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == want
    assert model.config._attn_implementation == "sdpa"
    prompts = [render(tok, student_messages(p)) for p in ("x = 12", "Tom has 3 apples and buys 4 more.")]
    out = decode(model, prompts, generators=[torch.Generator().manual_seed(i) for i in range(2)], max_new_tokens=8,
                 stop_ids=[2], pad_id=tok.pad_token_id, temperature=0.7, presence_penalty=1.5)
    assert all(0 < p <= 1 for d in out for p in d.p_student) and all(len(d.tokens) >= 1 for d in out)
