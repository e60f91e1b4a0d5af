"""The sampler seam: every stage that samples tokens does it through one `Sampler`.

Evaluation (and its forced answers), synthesis in every mode (mixed, direct, STaR), GRPO
rollouts and NuRL's self-hints all ask a sampler for tokens; none of them imports the decoding
loop or loads a model in order to sample. A sampler owns what every one of them used to work
out for itself: the model (and its adapter), the device of this process, the stop ids (the
chat template's end-of-turn tokens), the pad id and the model's window.

It has a few methods:
- `sample(prompts, seeds, sampling)`: plain sampling, one sequence per prompt, each row with its
  own seed (`sample_seed`), optionally with banned ids;
- `mixed(prompts, teacher_prompts, seeds, sampling, tau)`: mixed-policy decoding of (student,
  teacher) pairs, recording who wrote each token, p_S, p_T and q (docs/design.md "Sampling");
- `window`: the most positions the model takes;
- `push_weights(model)`: hand the sampler the policy's new (LoRA) weights. GRPO calls it before
  every rollout. The HF sampler samples the live module, so for it this only rebinds the module.

`Sampling` is the value that says how to sample: temperature, top-p, the presence / frequency
penalties and the token budget. `Sampling.of(cfg)` builds it from any stage's config.

`open_sampler` is the one factory. It opens the engine that `ModelConfig.engine` names, from the
config and an optional adapter, or wraps a model (and tokenizer) that is already loaded; a
sampler passed in comes back as it is. Adding an engine is a module of its own plus one row in
`_ENGINES` and one name in `config.ENGINES`.

The HF engine (`HFSampler`) wraps `dail.decoding.decode`, dail's own loop over transformers:
the default and the reference. A seed becomes the row's `torch.Generator` exactly as
`decoding.generator_for` makes it, so what sampled before samples the same tokens now.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch

from dail import dist
from dail.config import ModelConfig
from dail.decoding import Decoded, decode, sample_seed
from dail.models import context_window, load_adapter_for_inference, load_model, load_tokenizer, model_label
from dail.prompts import end_of_turn_ids

__all__ = ["Sampling", "Sampler", "HFSampler", "open_sampler", "release", "Decoded", "sample_seed"]


@dataclass(frozen=True)
class Sampling:
    """How to sample: the settings every engine honours the same way."""
    temperature: float = 1.0          # 0 = argmax
    top_p: float = 1.0
    presence_penalty: float = 0.0     # OpenAI / vLLM semantics, over the row's generated tokens
    frequency_penalty: float = 0.0
    max_new_tokens: int = 256

    @classmethod
    def of(cls, cfg: Any, **overrides: Any) -> "Sampling":
        """The sampling settings of a stage config (EvalConfig, SynthConfig, GRPOConfig: a config
        without penalty fields samples without penalties), with `overrides` on top."""
        values = {name: getattr(cfg, name) for name in ("temperature", "top_p", "max_new_tokens")}
        for name in ("presence_penalty", "frequency_penalty"):
            values[name] = getattr(cfg, name, 0.0)
        return cls(**(values | overrides))

    def with_budget(self, max_new_tokens: int) -> "Sampling":
        return replace(self, max_new_tokens=max_new_tokens)


@runtime_checkable
class Sampler(Protocol):
    """What every engine provides (see the module docstring)."""
    tokenizer: Any
    label: str           # the model as records name it (`models.model_label`, + adapter)
    engine: str          # `ModelConfig.engine`'s name for it; every record says which engine wrote it
    stop_ids: list[int]  # a sequence ends at any of these (included in its tokens)
    dtype: str           # the weights' dtype as torch names it ("float32", "bfloat16")

    @property
    def window(self) -> int: ...

    def sample(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, *,
               banned_ids: list[int] | None = None, writer: str = "student",
               entropy: bool = False) -> list[Decoded]: ...

    def mixed(self, prompts: list[list[int]], teacher_prompts: list[list[int]], seeds: list[int],
              sampling: Sampling, tau: float, *, banned_ids: list[int] | None = None) -> list[Decoded]: ...

    def push_weights(self, model: Any) -> None: ...


class HFSampler:
    """dail's own decoding loop (`decoding.decode`) over a transformers model, PEFT adapter or not."""

    engine = "hf"

    def __init__(self, model: Any, tokenizer: Any, label: str = "") -> None:
        self.model, self.tokenizer, self.label = model, tokenizer, label
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id

    @property
    def window(self) -> int:
        return context_window(getattr(self.model, "module", self.model))  # DDP wraps the model

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def sample(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, *,
               banned_ids: list[int] | None = None, writer: str = "student", entropy: bool = False) -> list[Decoded]:
        """Plain sampling; `writer` ("student" or "teacher") labels who produced the tokens; with
        `entropy`, each token also carries the model's temperature-1 entropy where it was written."""
        return self._decode(prompts, seeds, sampling, banned_ids=banned_ids, writer=writer,
                            **({"entropy": True} if entropy else {}))

    def mixed(self, prompts: list[list[int]], teacher_prompts: list[list[int]], seeds: list[int],
              sampling: Sampling, tau: float, *, banned_ids: list[int] | None = None) -> list[Decoded]:
        """Mixed-policy decoding: one fused forward over the 2B rows per token."""
        return self._decode(prompts, seeds, sampling, banned_ids=banned_ids, teacher_prompts=teacher_prompts, tau=tau)

    def push_weights(self, model: Any) -> None:
        # The loop runs the live module, so the trainer's updates are already what it samples.
        self.model = model

    def _decode(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, **kw: Any) -> list[Decoded]:
        if len(seeds) != len(prompts):
            raise ValueError(f"need one seed per prompt: {len(seeds)} seeds for {len(prompts)} prompts")
        training = self.model.training
        self.model.eval()  # no dropout, and a KV cache even where gradient checkpointing is on
        try:
            return decode(self.model, prompts, generators=[torch.Generator().manual_seed(s) for s in seeds],
                          max_new_tokens=sampling.max_new_tokens, stop_ids=self.stop_ids, pad_id=self.pad_id,
                          temperature=sampling.temperature, top_p=sampling.top_p,
                          presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
                          **kw)
        finally:
            self.model.train(training)


def _process_device(cfg: ModelConfig) -> torch.device | None:
    """This process's device under `accelerate launch` with several GPUs (one GPU per rank); None
    lets `models.load_model` resolve `model.device` as it is."""
    _, world = dist.world()
    if world > 1 and cfg.device == "auto" and torch.cuda.is_available():
        rank, _ = dist.world()
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return None


def _open_hf(cfg: ModelConfig, adapter: str, model: Any, tokenizer: Any, device: torch.device | None) -> HFSampler:
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    if model is None:
        model = load_model(cfg, device or _process_device(cfg))
        if adapter:
            model = load_adapter_for_inference(model, adapter)
    return HFSampler(model, tokenizer, model_label(cfg) + (f" + {adapter}" if adapter else ""))


def _open_vllm(cfg: ModelConfig, adapter: str, model: Any, tokenizer: Any, device: torch.device | None) -> Any:
    from dail.vllm_engine import open_vllm  # imports vllm only when asked for

    return open_vllm(cfg, adapter, model, tokenizer, device)


# One row per engine: `ModelConfig.engine` -> the function that opens it.
_ENGINES = {"hf": _open_hf, "vllm": _open_vllm}


def release(sampler: Any) -> None:
    """Free what a sampler holds beyond its Python object (a vLLM engine and its KV cache); an HF
    sampler holds nothing more than its model."""
    close = getattr(sampler, "close", None)
    if callable(close):
        close()


def with_dtype(cfg: ModelConfig, dtype: str) -> ModelConfig:
    """`cfg` with its weights in `dtype` ('' = as it is): a stage that samples in another precision."""
    return replace(cfg, dtype=dtype) if dtype else cfg


def open_sampler(cfg: ModelConfig, adapter: str = "", *, model: Any = None, tokenizer: Any = None,
                 device: torch.device | None = None) -> Sampler:
    """The sampler of `cfg.engine` for the model `cfg` (+ `adapter`, a PEFT folder).

    `model`: a model already loaded (carrying any adapter), which the sampler wraps instead of
    loading one; or a `Sampler`, returned as it is. `tokenizer`: one already loaded.
    """
    if isinstance(model, Sampler):
        return model
    return _ENGINES[cfg.engine](cfg, adapter, model, tokenizer, device)
