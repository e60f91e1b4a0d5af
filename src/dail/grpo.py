"""GRPO and NuRL (`dail grpo`): TRL's GRPOTrainer, rewarded by the grader of `dail eval`.

Who does what. TRL (`trl.GRPOTrainer`, 1.16) owns the algorithm: group-relative advantages,
the clipped ratio, the KL to the reference (the base model), the optimizer, the schedule,
checkpoints and resume. dail owns what makes GRPO
comparable with its other methods:
- the model: loaded by `dail.models` (embedded GGUF, hub id or folder), LoRA attached by
  `attach_lora` with the same settings and defaults as `dail train`;
- the prompt: the student context of `dail eval`, `prompts.render(tok, student_messages(x, prompts))`,
  with the same prompt file (`GRPOConfig.prompts`);
- the sampler: `dail.sampler`, the seam `dail eval` samples through (same stop tokens, same
  temperature/top-p rule), with one seed per rollout, keyed on (run seed, step, problem, index
  in the group), so rollouts do not depend on batching or process count. Before each rollout
  the policy's weights are pushed to it (`Sampler.push_weights`; the HF engine samples the live
  module, so that costs nothing);
- the reward: `dail.grading.grade_many`, math-verify in its killable process pool under
  `grade_timeout`: 1.0 right; 0.0 wrong, without an answer, or past the timeout.

The hook. Every rollout goes through TRL's `rollout_func` (`Rollout` below), also for plain
GRPO, so both methods sample the same way. TRL calls it once per optimizer step with this
process's slice of the generation batch (problems_per_step x G rows over all processes, the G
rows of a problem adjacent) and takes back prompt and completion ids; rewards
(`reward_funcs`), advantages and the loss stay TRL's.

NuRL (`hints` self|landmarks; how hints are collected: `dail.hints`). After the G completions
of a problem are sampled, the rollout grades them. If all G score 0 (`needs_hint`) and the
problem has a hint, completions 2..G are dropped and sampled again from the hinted prompt
(`plan_hints`, `prompts.hinted_messages`); the first stays plain. TRL then scores all G and
computes the group's advantage over the mix.

Which prompt the hinted completions train under: the hinted one, as in NuRL. The rollout
returns each completion with the prompt that produced it, so TRL computes the policy's and
the reference's log-probabilities (ratio and KL) under the context the tokens were sampled
from, and the update stays on-policy. Training them under the plain prompt instead would be
an off-policy update without any correction (TRL would take the plain-prompt log-probs as the
sampling ones).

Hints never reach evaluation: the rollout adds them only while the trainer is in training
mode, and neither the adapter nor anything `dail eval` reads holds a hint
(tests/test_grpo.py checks the prompts `dail eval` builds for a NuRL adapter).

metrics.jsonl, one row per optimizer step: `reward` (mean), `zero_groups` (the fraction of
problems whose G completions all scored 0, which give no gradient: the paper's point),
`zero_groups_before_hints` and `hinted_groups` (with hints), `kl`, `loss`, `entropy`,
`completion_length`, `lr`, `grad_norm`, `tokens` (completion tokens trained on this step),
`tokens_per_s` and `step_s` (wall time of the whole step: sampling, grading, backward, update).

Processes. Under `accelerate launch` each process samples and grades its own rows; TRL
gathers the rewards. `problems_per_step` must be a multiple of the process count, so every
process holds whole groups and the hint decision needs no communication. DDP only: the
sampler runs the unwrapped model, so FSDP and DeepSpeed ZeRO-3 (sharded weights) cannot sample.

Departures from TRL's defaults are in GRPOConfig's help strings (beta, lr, generation length,
gradient checkpointing). Choices of ours around NuRL: G-1 completions are resampled, so one
plain failure stays in the group; hints are collected greedily, one per problem; a hint that
states the answer is not used (a string check, `hints.states_answer`). With beta > 0, TRL
keeps the KL reference as "ref", a frozen copy of the fresh LoRA adapter, which is exactly the
base model (LoRA's B starts at 0); only the trained adapter is saved.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from dail import dist
from dail.checkpoint import Logger
from dail.config import ConfigError, DataConfig, GRPOConfig, check_resumable, save, to_dict
from dail.data import DataError, Example, load_benchmark, load_examples
from dail.grading import grade_many
from dail.hints import collect_hints, read_hints, usable_hints
from dail.layout import finished_adapter, grpo_files
from dail.lock import output_lock
from dail.models import attach_lora, check_source, load_model, load_tokenizer, model_label
from dail.prompts import HINT_PROMPT_VERSION, hinted_messages, load_prompts, render, student_messages
from dail.sampler import Sampler, Sampling, open_sampler, sample_seed

__all__ = ["train_grpo", "needs_hint", "plan_hints", "make_reward", "Rollout", "load_train_problems"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pure pieces

def needs_hint(rewards: Sequence[float]) -> bool:
    """NuRL's trigger: every completion of the group scored 0, so the group gives no gradient."""
    return len(rewards) > 0 and all(r <= 0 for r in rewards)


def plan_hints(rewards: Sequence[float], group_size: int, has_hint: Sequence[bool]) -> list[bool]:
    """Which rows to sample again with the hint: rows come in groups of `group_size` adjacent
    rows (one problem each); in a group that needs a hint (`needs_hint`) and whose problem has
    one (`has_hint`, per row), every row but the first."""
    if len(rewards) % group_size or len(has_hint) != len(rewards):
        raise ValueError(f"plan_hints: {len(rewards)} rewards, {len(has_hint)} flags, groups of {group_size}")
    redo: list[bool] = []
    for g in range(0, len(rewards), group_size):
        hint = needs_hint(rewards[g:g + group_size]) and bool(has_hint[g])
        redo += [False] + [hint] * (group_size - 1)
    return redo


def completion_text(completion: Any) -> str:
    """A completion as TRL hands it to reward functions: text, or (conversational prompts) a list
    of messages whose assistant contents are the text."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def make_reward(group_size: int, timeout: float) -> Callable[..., list[float]]:
    """The reward function for TRL: 1.0 if `dail.grading` finds the gold answer, else 0.0.

    Grades the rollout already computed (`dail_grade`, NuRL) are reused; the rest go through
    `grade_many` in one call. It also logs, through TRL's `log_metric`, the fraction of groups
    with all-zero reward, before and after hints."""
    def correct(completions: list, answer: list, dail_grade: list | None = None,
                dail_zero_before: list | None = None, dail_hinted: list | None = None,
                log_metric: Callable | None = None, **_: Any) -> list[float]:
        n = len(completions)
        rewards: list[float | None] = list(dail_grade) if dail_grade is not None else [None] * n
        todo = [i for i in range(n) if rewards[i] is None]
        texts = [completion_text(completions[i]) for i in todo]
        for i, ok in zip(todo, grade_many(texts, [str(answer[i]) for i in todo], timeout, kind="math")):
            rewards[i] = 1.0 if ok else 0.0
        if log_metric is not None and n % group_size == 0:
            starts = range(0, n, group_size)
            log_metric("zero_groups", sum(needs_hint(rewards[g:g + group_size]) for g in starts) / len(starts))
            if dail_zero_before is not None:
                log_metric("zero_groups_before_hints", sum(bool(dail_zero_before[g]) for g in starts) / len(starts))
                log_metric("hinted_groups", sum(any(dail_hinted[g:g + group_size]) for g in starts) / len(starts))
        return [float(r) for r in rewards]

    return correct


# ----------------------------------------------------------------------------- rollouts

class Rollout:
    """TRL's `rollout_func`: sample each row from its problem's student prompt through dail's
    sampler; with hints, resample G-1 rows of every all-zero group from the hinted prompt.

    `problems` are the training problems; `hints` {id: hint} the usable ones ({} = plain GRPO).
    `sampler`: the one to push the policy's weights to before each rollout (None: the first
    rollout wraps the trainer's model in cfg.model's engine).
    """

    def __init__(self, tok: Any, problems: list[Example], hints: dict[str, str], cfg: GRPOConfig,
                 sampler: Sampler | None = None) -> None:
        self.tok, self.cfg, self.hints, self.sampler = tok, cfg, hints, sampler
        self.sampling = Sampling.of(cfg)
        self.prompts = prompts = load_prompts(cfg.prompts)
        self.by_prompt = {student_messages(ex.problem, prompts)[0]["content"]: ex for ex in problems}
        if len(self.by_prompt) < len(problems):
            warnings.warn("some training problems have the same text; their rollouts share one problem's hint",
                          stacklevel=2)
        self.plain = {ex.id: render(tok, student_messages(ex.problem, prompts)) for ex in problems}
        self.hinted = {ex.id: render(tok, hinted_messages(ex.problem, hints[ex.id], prompts)) for ex in problems
                       if ex.id in hints}

    def longest_prompt(self) -> tuple[str, int]:
        """(problem id, length) of the longest prompt any rollout may use."""
        return max(((k, len(v)) for d in (self.plain, self.hinted) for k, v in d.items()), key=lambda t: t[1])

    def sample(self, prompts: list[list[int]], keys: list[tuple[str, int]]) -> list[list[int]]:
        """One completion per prompt (token ids, end-of-turn included when it stopped); `keys`
        name each rollout's seed."""
        seeds = [sample_seed(self.cfg.seed, k, j) for k, j in keys]
        return [d.tokens for d in self.sampler.sample(prompts, seeds, self.sampling)]

    def __call__(self, prompts: list, trainer: Any) -> dict[str, list]:
        G = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        n = len(prompts)
        if n % G:
            raise RuntimeError(f"rollout: {n} rows on this process is not a multiple of the group size {G}; "
                               "problems_per_step must be a multiple of the number of processes")
        exs = [self.by_prompt[p[-1]["content"]] for p in prompts]
        # The generation batch is split over processes in order, so this process's first row is
        # row rank * n of the global batch; the group index and the index in the group of a row do
        # not depend on the number of processes, nor do the generators named after them.
        first = trainer.accelerator.process_index * n
        step = trainer.state.global_step
        keys = [(f"grpo:{step}:{(first + i) // G}:{ex.id}", (first + i) % G) for i, ex in enumerate(exs)]
        ids = [self.plain[ex.id] for ex in exs]
        if self.sampler is None:
            self.sampler = open_sampler(self.cfg.model, model=trainer.model, tokenizer=self.tok)
        self.sampler.push_weights(trainer.model)  # this step's policy
        completions = self.sample(ids, keys)
        out: dict[str, list] = {"prompt_ids": ids, "completion_ids": completions, "logprobs": None}
        if not self.hints or not trainer.model.training:  # hints only ever in training rollouts
            return out

        texts = [self.tok.decode(c, skip_special_tokens=True) for c in completions]
        grades = [1.0 if ok else 0.0 for ok in grade_many(texts, [str(ex.answer) for ex in exs],
                                                          self.cfg.grade_timeout, kind="math")]
        redo = plan_hints(grades, G, [ex.id in self.hinted for ex in exs])
        zero = [needs_hint(grades[i - i % G:i - i % G + G]) for i in range(n)]
        rows = [i for i in range(n) if redo[i]]
        if rows:
            again = self.sample([self.hinted[exs[i].id] for i in rows],
                                [(keys[i][0] + ":hint", keys[i][1]) for i in rows])
            for i, c in zip(rows, again):
                ids[i], completions[i] = self.hinted[exs[i].id], c
        return out | {"dail_grade": [None if redo[i] else grades[i] for i in range(n)],
                      "dail_zero_before": zero, "dail_hinted": redo}


# ----------------------------------------------------------------------------- metrics

# TRL's log keys -> metrics.jsonl fields.
_LOGGED = {"loss": "loss", "reward": "reward", "reward_std": "reward_std", "zero_groups": "zero_groups",
           "zero_groups_before_hints": "zero_groups_before_hints", "hinted_groups": "hinted_groups", "kl": "kl",
           "entropy": "entropy", "completions/mean_length": "completion_length",
           "completions/clipped_ratio": "clipped_ratio", "learning_rate": "lr", "grad_norm": "grad_norm"}


class StepLog(TrainerCallback):
    """One metrics.jsonl row per optimizer step (through `dail.checkpoint.Logger`) from what TRL
    logs at that step, plus completion tokens per second of the whole step."""

    def __init__(self, logger: Logger, completions_per_step: int) -> None:
        self.logger, self.n, self.t0 = logger, completions_per_step, time.perf_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.t0 = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if not logs or "reward" not in logs:  # e.g. the end-of-training summary
            return
        dt = time.perf_counter() - self.t0
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(float(state.epoch or 0), 4)}
        row |= {dst: logs[src] for src, dst in _LOGGED.items() if logs.get(src) is not None}
        tokens = float(logs.get("completions/mean_length") or 0.0) * self.n
        row |= {"tokens": int(round(tokens)), "tokens_per_s": round(tokens / dt, 2), "step_s": round(dt, 4)}
        self.logger.log(row)


# ----------------------------------------------------------------------------- problems

_TABLE_SUFFIXES = (".json", ".parquet", ".csv")


def load_train_problems(data: DataConfig) -> list[Example]:
    """The training problems, each with a gold answer for the reward.

    Expert sets (JSONL, built-in sources, Hugging Face) load as for `dail train`; a local
    .json/.parquet/.csv benchmark file as for `dail eval` (no solution needed). A problem
    without a gold answer, or a multiple-choice one, is an error naming its file and line (or
    its id): the math grader could never reward it.
    """
    source = data.source
    if os.path.isfile(source) and source.lower().endswith(_TABLE_SUFFIXES):
        problems = load_benchmark(source, data.fields)  # a missing answer is already an error there
        problems = problems[: data.limit] if data.limit else problems
    else:
        problems = load_examples(data)
    lines = None
    if os.path.isfile(source) and not source.lower().endswith(_TABLE_SUFFIXES):
        with open(source, "rb") as fh:  # load_jsonl reads the non-blank lines, in order
            lines = [n for n, raw in enumerate(fh, start=1) if raw.strip()]
    for i, ex in enumerate(problems):
        where = f"{source}:{lines[i]}" if lines else f"{source}: problem {ex.id!r}"
        if ex.answer is None or not str(ex.answer).strip():
            raise DataError(f"{where}: field 'answer': missing. GRPO's reward grades each completion against "
                            "the gold answer, so every training problem needs one")
        if isinstance(ex.meta, dict) and ex.meta.get("choices"):
            raise DataError(f"{where}: field 'meta.choices': multiple-choice problems are not supported by dail "
                            "grpo (its reward is the math grader on one shared prompt per group)")
    if not problems:
        raise DataError(f"{source}: no training problems")
    return problems


# ----------------------------------------------------------------------------- outputs

def _last_checkpoint(folder: Path) -> Path | None:
    """TRL's last `checkpoint-N` folder under `folder` (transformers' own rule), or None."""
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return Path(last) if last else None


def _check_outputs(cfg: GRPOConfig, files: dict[str, Path]) -> Path | None:
    """What is already in `out`, read only: the checkpoint to resume from, or None. A folder that
    holds a training run (finished or not, GRPO's or another method's) is continued (--resume) or
    replaced (--overwrite), never silently overwritten."""
    out = Path(cfg.out)
    ckpt = _last_checkpoint(files["checkpoints"])
    found = [files[n].name for n in ("adapter", "checkpoints", "checkpoint", "info") if files[n].exists()]
    if cfg.overwrite or (not found and not cfg.resume):
        return None
    if cfg.resume:
        if ckpt is not None:
            check_resumable(files["config"], cfg, "a GRPO run")
            return ckpt
        if found:
            raise ConfigError(f"{out}: holds {', '.join(found)} but no GRPO checkpoint "
                              f"({files['checkpoints'].name}/checkpoint-N) to resume from; pass --overwrite true to "
                              "start over, or use another --out")
        log.info("%s: resume=true but no checkpoint yet; starting from step 0", out)
        return None
    what = ("a finished run" if finished_adapter(out) is not None else
            f"an interrupted GRPO run (last checkpoint {ckpt.name})" if ckpt is not None else "a training run")
    raise ConfigError(f"{out}: already holds {what}: {', '.join(found)}. Pass --resume true to continue it (e.g. "
                      "with a larger --max_steps), --overwrite true to start over, or use another --out")


def _clear(files: dict[str, Path]) -> None:
    """--overwrite: remove this stage's outputs (never the hints file, which may hold edits)."""
    for key in ("checkpoints", "adapter", "checkpoint"):
        shutil.rmtree(files[key], ignore_errors=True)
    for key in ("metrics", "info"):
        files[key].unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the stage

def train_grpo(cfg: GRPOConfig) -> Path:
    """Train a LoRA adapter with GRPO (NuRL with hints); returns `<out>/adapter`."""
    try:
        import trl  # noqa: F401
        import datasets  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"dail grpo needs TRL and datasets ({e.name} is missing): pip install 'trl>=1.16,<2' "
                          "datasets") from None
    rank, world = dist.world()
    files = grpo_files(cfg.out)
    hints_path = Path(cfg.hints_file) if cfg.hints_file else files["hints"]

    # --- everything that can be checked before the model loads (read only, on every rank)
    check_source(cfg.model)
    per_step = cfg.problems_per_step * cfg.num_generations
    if cfg.problems_per_step % world or per_step % (cfg.micro_batch_size * world):
        raise ConfigError(f"config field 'problems_per_step': {cfg.problems_per_step} problems x "
                          f"{cfg.num_generations} completions must split into whole groups and micro-batches of "
                          f"{cfg.micro_batch_size} on each of {world} processes")
    problems = load_train_problems(cfg.data)
    if cfg.problems_per_step > len(problems):
        raise ConfigError(f"config field 'problems_per_step': {cfg.problems_per_step} is more than the "
                          f"{len(problems)} training problems")
    have = read_hints(hints_path, problems) if cfg.hints != "none" else {}
    resume_from = _check_outputs(cfg, files)
    dist.barrier()  # every rank has decided before rank 0 changes anything

    with output_lock(files["lock"], f"{cfg.out}: GRPO training", rank):
        return _train(cfg, files, hints_path, problems, have, resume_from, rank, world)


def _train(cfg: GRPOConfig, files: dict[str, Path], hints_path: Path, problems: list[Example],
           have: dict, resume_from: Path | None, rank: int, world: int) -> Path:
    import trl
    from datasets import Dataset
    from transformers import set_seed

    out = Path(cfg.out)
    per_step = cfg.problems_per_step * cfg.num_generations  # completions per optimizer step, all processes
    if rank == 0:
        if cfg.overwrite:
            _clear(files)
        out.mkdir(parents=True, exist_ok=True)
        save(cfg, files["config"])
    dist.barrier()

    # --- load: the base model, hints (collected with the base model, before LoRA), LoRA on top
    cpu = cfg.model.device == "cpu" or not torch.cuda.is_available()
    device = torch.device("cpu") if cpu else None
    if not cpu and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device)
    sampler = open_sampler(cfg.model, model=model, tokenizer=tok)  # the base model, until LoRA is on
    hints: dict[str, str] = {}
    if cfg.hints != "none":
        collect_hints(cfg.hints, hints_path, problems, have, sampler, cfg.max_new_tokens, cfg.hint_tokens,
                      cfg.seed, model_label(cfg.model))
        hints = usable_hints(read_hints(hints_path, problems), problems)
    rollout = Rollout(tok, problems, hints, cfg, sampler)
    longest_id, longest = rollout.longest_prompt()
    window = sampler.window
    if longest + cfg.max_new_tokens > window:
        raise DataError(f"problem {longest_id!r}: its prompt has {longest} tokens; with max_new_tokens "
                        f"{cfg.max_new_tokens} it does not fit the model's window of {window} positions")
    set_seed(cfg.seed)  # LoRA init
    model = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    # TRL ends a completion at the model's eos ids; make them dail's end-of-turn ids (as in dail eval).
    model.generation_config.eos_token_id = sampler.stop_ids

    # Newer transformers name TrainingArguments' gradient_checkpointing activation_checkpointing;
    # 5.19 (dail's floor, which vLLM pins) knows only the old name.
    known = inspect.signature(trl.GRPOConfig.__init__).parameters
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    args = trl.GRPOConfig(
        output_dir=str(files["checkpoints"]), seed=cfg.seed, data_seed=cfg.seed,
        num_generations=cfg.num_generations, beta=cfg.beta, learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=per_step // (cfg.micro_batch_size * world),  # one generation per step
        **{checkpointing: cfg.gradient_checkpointing},
        use_cpu=cpu, bf16=not cpu and torch.cuda.is_bf16_supported(), fp16=False,
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_every or 10**9, save_total_limit=1,
        ddp_find_unused_parameters=False,  # every trainable (LoRA) parameter is used in each forward
        report_to="none",  # dail's Logger writes metrics.jsonl and, if asked, TensorBoard / W&B
    )
    resume_step = json.loads((resume_from / "trainer_state.json").read_text())["global_step"] if resume_from else 0
    logger = Logger(out, resume_step, rank == 0, cfg.report_to, to_dict(cfg))
    dataset = Dataset.from_list([{"prompt": student_messages(ex.problem, rollout.prompts), "id": ex.id,
                                  "answer": str(ex.answer)}
                                 for ex in problems])
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL 1.16
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[make_reward(cfg.num_generations, cfg.grade_timeout)],
                              args=args, train_dataset=dataset, processing_class=tok, rollout_func=rollout,
                              callbacks=[StepLog(logger, per_step)])
    if trainer.accelerator.num_processes != world:  # e.g. `accelerate launch --cpu` on a GPU-less machine
        raise RuntimeError(f"launched as {world} processes, but the trainer runs {trainer.accelerator.num_processes}")
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        logger.close()

    # --- save: the adapter in PEFT format and what was run
    adapter = files["adapter"]
    if trainer.accelerator.is_main_process:
        # Only the trained adapter: with beta > 0 TRL also holds "ref", a frozen copy of the fresh adapter
        # (LoRA's B starts at 0, so it is exactly the base model), which `dail eval` has no use for.
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(adapter, selected_adapters=["default"])
        info = {"method": "nurl" if cfg.hints != "none" else "grpo", "model": model_label(cfg.model),
                "prompt_version": rollout.prompts.version, "prompt_hash": rollout.prompts.hash,
                "problems": len(problems), "steps": trainer.state.global_step,
                "processes": world, "grad_accum_steps": args.gradient_accumulation_steps,
                "completions_per_step": per_step, "trl_version": trl.__version__, "hints": cfg.hints}
        if cfg.hints != "none":
            info |= {"hints_file": str(hints_path), "hints_used": len(hints),
                     "hint_prompt_version": HINT_PROMPT_VERSION}
        files["info"].write_text(json.dumps(info, indent=2), encoding="utf-8")
    dist.barrier()
    return adapter
