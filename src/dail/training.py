"""Stage 2: train a LoRA student on the loss `cfg.loss` (docs/design.md "Stage 2: training").

`train(cfg)` reads top to bottom: load the base model and tokenizer, attach LoRA, build the
token sequences, then for each optimizer step: batch -> loss -> backward -> step -> log, and
finally save the adapter (standard PEFT format) to `<out>/adapter`. To change the objective,
add it to `losses.OBJECTIVES`: the loss name decides which roles run (reference.py runs them).

Normalization: the token count of a whole optimizer step is known from the data before any
forward, so it is summed over micro-batches and processes first, and each micro-batch
backpropagates `loss_sum / global_count` (times the number of processes, because DDP
averages gradients). The step's loss is exactly `Σ_t l_t / Σ_t mask_t` over the whole step.

Data order: the examples form one stream, the concatenation of a seeded permutation per
epoch (of problems, each followed by its samples, with `group_by_problem`); optimizer step k
takes items [k·batch_size, (k+1)·batch_size) of it, and process r takes its contiguous share.
So a step's global batch does not depend on the number of processes, and resuming at step k
needs nothing but k.

Beyond the paper: the chunked loss from hidden states (losses.py), a reference pass that
computes each context once and an optional reference cache (reference.py), resumable atomic
checkpoints (checkpoint.py), and a stop on non-finite loss that keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from dail.checkpoint import Logger, find_checkpoint, lr_lambda, resume_from, save_checkpoint
from dail.config import ConfigError, TrainConfig, check_resumable, save
from dail.data import DataError, load_examples
from dail.landmarks import extract_landmarks
from dail.layout import finished_adapter, train_files
from dail.lock import output_lock
from dail.losses import OBJECTIVES, LossSums, chunked_loss
from dail.models import attach_lora, load_model, load_tokenizer, model_label
from dail.prompts import (RECORD_CONTEXTS, Prompts, end_of_turn_id, load_prompts, negative_messages, render,
                          student_messages, teacher_context, thinking_on)
from dail.records import read_records
from dail.reference import (Batch, Sequence, build_ref_cache, cached_refs, collate, lm_head_params, reference_hidden,
                        role_hidden)

__all__ = ["train", "train_or_reuse", "build_sequences", "epoch_order", "batch_loss"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data

_SYNTH_FIELDS = {"id": (str, int), "problem": str, "solution": str, "trajectory_ids": list}


def _synthetic_records(path: str) -> list[dict]:
    if not Path(path).exists():
        raise DataError(f"{path}: synthetic set not found (run `dail synth` first, or set data)")
    records = read_records(path, repair=False)
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    for i, rec in enumerate(records, start=1):
        for key, types in _SYNTH_FIELDS.items():
            if not isinstance(rec.get(key), types):
                raise DataError(f"{path}: record {i}: field '{key}': expected "
                                f"{getattr(types, '__name__', 'a string or integer')}, got {rec.get(key)!r}")
        if not rec["trajectory_ids"] or not all(isinstance(t, int) for t in rec["trajectory_ids"]):
            raise DataError(f"{path}: record {i}: field 'trajectory_ids': expected a non-empty list of "
                            "token ids")
        marks = rec.get("landmarks")
        if marks is not None and not (isinstance(marks, list) and all(isinstance(m, str) for m in marks)):
            raise DataError(f"{path}: record {i}: field 'landmarks': expected a list of strings, got {marks!r}")
    return records


def _landmarks(path: str, i: int, rec: dict) -> tuple[list[str], str | None]:
    """The record's own landmarks (written by synthesis), or extracted with its `landmarks_kind`
    (math if absent); and the kind used, None for the record's own."""
    if rec.get("landmarks") is not None:
        return rec["landmarks"], None
    kind = rec.get("landmarks_kind", "math")
    try:
        return extract_landmarks(rec["solution"], kind), kind
    except ValueError as e:
        raise DataError(f"{path}: record {i}: field 'landmarks_kind': {e}") from None


def _check_contexts(path: str, i: int, rec: dict, prompts: Prompts, teacher: bool) -> str:
    """The record's teacher context (solution if absent), checked against what training renders:
    the record's prompt_hash (absent in records made before prompt files: tolerated) must be the
    hash of training's prompt texts, and an answer_only teacher needs the record's answer. A
    direct-mode record's context is the direct text, whatever its teacher_context says."""
    made_with = rec.get("prompt_hash")
    if made_with is not None and made_with != prompts.hash:
        raise DataError(f"{path}: record {i}: field 'prompt_hash': {made_with!r}, but training renders its contexts "
                        f"with {prompts.source or 'the built-in prompts'} (hash {prompts.hash!r}); set prompts to the "
                        "prompt file synthesis used")
    # A direct-mode trajectory trains against the direct text that wrote it (records written before
    # this rule say teacher_context solution; their mode decides).
    kind = "direct" if rec.get("mode") == "direct" else rec.get("teacher_context", "solution")
    if kind not in RECORD_CONTEXTS:
        raise DataError(f"{path}: record {i}: field 'teacher_context': expected {'|'.join(RECORD_CONTEXTS)}, "
                        f"got {kind!r}")
    if teacher and kind == "answer_only" and not str(rec.get("answer") or "").strip():
        raise DataError(f"{path}: record {i}: field 'answer': the teacher context is answer_only (the problem and "
                        "its final answer), but the record has no answer")
    return kind


def build_sequences(cfg: TrainConfig, tok: Any) -> list[Sequence]:
    """Token sequences for `cfg.loss`, with the contexts of the roles it needs; those longer than
    `max_length` are left out with a warning. Contexts are rendered with `cfg.prompts`, which must
    be the texts synthesis used (`_check_contexts`)."""
    roles = OBJECTIVES[cfg.loss].roles
    prompts = load_prompts(cfg.prompts)
    seqs = []
    if cfg.loss == "sft":
        source = cfg.expert.source
        eot = end_of_turn_id(tok)
        for ex in load_examples(cfg.expert):
            # The raw expert solution, as the dataset gives it (the `sft` baseline of the paper).
            target = tok(ex.solution, add_special_tokens=False)["input_ids"] + [eot]
            seqs.append(Sequence(ex.id, target, {"student": render(tok, student_messages(ex.problem, prompts))},
                                 ex.id))
    else:
        source = cfg.data
        taken: set[str] = set()
        extracted: Counter[str | None] = Counter()  # landmark kind (None: the record's own) -> examples
        thinking = thinking_on(tok)
        unhashed = 0  # records made before prompt files, which carry no prompt_hash
        for i, rec in enumerate(_synthetic_records(cfg.data), start=1):
            # A trajectory written inside a thinking block follows contexts that open one, and only those.
            if rec.get("thinking") is not None and bool(rec["thinking"]) != thinking:
                raise DataError(f"{cfg.data}: record {i}: field 'thinking': {rec['thinking']}, but training formats "
                                f"its contexts with thinking {'on' if thinking else 'off'} (model.thinking "
                                f"{cfg.model.thinking!r}); set model.thinking as synthesis had it")
            kind = _check_contexts(cfg.data, i, rec, prompts, "teacher" in roles)
            unhashed += rec.get("prompt_hash") is None
            answer = None if rec.get("answer") is None else str(rec["answer"])
            ctx = {"student": render(tok, student_messages(rec["problem"], prompts))}
            if "teacher" in roles:
                ctx["teacher"] = render(tok, teacher_context(kind, rec["problem"], rec["solution"], answer, prompts))
            if "negative" in roles:
                marks, marks_kind = _landmarks(cfg.data, i, rec)
                extracted[marks_kind] += 1
                ctx["negative"] = render(tok, negative_messages(rec["problem"], marks, answer, prompts))
            # Ids are unique (the reference cache is keyed by them): "<id>#<sample_index>", plus
            # "@<record number>" for a record without a sample index or with a repeated one.
            index = rec.get("sample_index")
            sid = f"{rec['id']}#{index}" if index is not None else str(rec["id"])
            if index is None or sid in taken:
                sid = f"{sid}@{i}"
            taken.add(sid)
            seqs.append(Sequence(sid, list(rec["trajectory_ids"]), ctx, str(rec["id"])))
        if unhashed and prompts.source:
            log.warning("%s: %d records carry no prompt_hash (made before prompt files, with the built-in texts); "
                        "they are trained with %s", cfg.data, unhashed, prompts.source)
        if extracted:
            own = extracted.pop(None, 0)
            kinds = ", ".join(f"{n} with '{k}'" for k, n in sorted(extracted.items()))
            log.info("%s: landmarks: %d of %d examples use their record's list; %d are extracted%s", cfg.data,
                     own, len(seqs), sum(extracted.values()), f" ({kinds})" if kinds else "")
    kept = [s for s in seqs if max(len(c) for c in s.contexts.values()) + len(s.target) <= cfg.max_length]
    if len(kept) < len(seqs):
        warnings.warn(f"{source}: skipped {len(seqs) - len(kept)} of {len(seqs)} examples longer than "
                      f"max_length={cfg.max_length} tokens (context + target)", stacklevel=2)
    if not kept:
        raise DataError(f"{source}: no example fits in max_length={cfg.max_length} tokens")
    return kept


def epoch_order(seqs: list[Sequence], seed: int, group_by_problem: bool) -> list[int]:
    """One epoch of the example stream: a seeded permutation of the examples, or with
    `group_by_problem` a seeded permutation of the problems, each followed by all its samples
    (in file order), so samples of one problem tend to share micro-batches."""
    gen = torch.Generator().manual_seed(seed)
    if not group_by_problem:
        return torch.randperm(len(seqs), generator=gen).tolist()
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(s.problem, []).append(i)
    order = list(groups.values())
    return [i for g in torch.randperm(len(order), generator=gen).tolist() for i in order[g]]


# ----------------------------------------------------------------------------- the loss of one micro-batch

def batch_loss(model: Any, batch: Batch, cfg: TrainConfig, refs: tuple[torch.Tensor, ...] | None = None) -> LossSums:
    """Loss sums of one micro-batch under `cfg.loss`.

    The student runs with the adapter on and builds the graph. The references the loss needs
    (`OBJECTIVES[cfg.loss].roles` after the student) run live, or come from `refs`, cached
    hidden states in that order.
    """
    references = OBJECTIVES[cfg.loss].roles[1:]
    weight, bias = lm_head_params(model)
    T = batch.targets.shape[1]
    h_s = role_hidden(model, batch.inputs["student"], T)
    if references and refs is None:
        refs = reference_hidden(model, batch, references)
    hidden = (h_s, *(h.to(h_s.dtype) for h in refs)) if references else (h_s,)
    return chunked_loss(cfg.loss, hidden, weight, batch.targets, batch.mask, cfg.gamma, cfg.neg_cap,
                        cfg.chunk_size, bias)


# ----------------------------------------------------------------------------- the loop

def native_bf16(cpu: bool) -> bool:
    """Whether the device computes in bf16 natively: oneDNN's bf16 kernels on a CPU, or the GPU's."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) if cpu else torch.cuda.is_bf16_supported()


def use_bf16(precision: str, cpu: bool) -> bool:
    """Whether the training step runs under bf16 autocast (`train.precision`)."""
    if precision == "fp32":
        return False
    native = native_bf16(cpu)
    if precision == "bf16" and not native:
        why = "CPU has no bf16 kernels (oneDNN needs AVX512-BF16 or AMX)" if cpu else "GPU does not support bf16"
        raise ConfigError(f"config field 'precision': bf16, but this {why}; use fp32")
    return precision == "bf16" or (not cpu and native)  # auto: a GPU's bf16, never a CPU's


def train(cfg: TrainConfig) -> Path:
    """Train the LoRA student; returns the adapter folder `<out>/adapter`."""
    cpu = cfg.model.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if use_bf16(cfg.precision, cpu) else "no")
    with output_lock(train_files(cfg.out)["lock"], f"{cfg.out}: training", accelerator.process_index):
        return _train(cfg, accelerator)


def train_or_reuse(cfg: TrainConfig) -> Path:
    """The adapter in `cfg.out` if a finished run is there; otherwise train, continuing the
    checkpoint of an interrupted run in that folder. What `dail run`, `compare` and `sweep`
    do for each adapter they need."""
    adapter = finished_adapter(cfg.out)
    if adapter is not None:
        log.info("%s already holds a finished adapter; not retraining", cfg.out)
        return adapter
    return train(dataclasses.replace(cfg, resume=cfg.resume or Path(cfg.out).exists()))


def _refuse_to_replace(cfg: TrainConfig, accelerator: Any) -> None:
    """A run folder that already holds training output is continued (--resume) or replaced
    (--overwrite), never silently overwritten."""
    files = train_files(cfg.out)
    found = [name for name in ("adapter", "checkpoint", "info") if files[name].exists()]
    if not found or cfg.resume:
        return
    if not cfg.overwrite:
        raise ConfigError(f"{cfg.out}: already holds a training run ({', '.join(files[n].name for n in found)}); "
                          "pass --resume to continue it or --overwrite to replace it")
    if accelerator.is_main_process:
        log.warning("%s: --overwrite: replacing the earlier training run", cfg.out)
        for name in ("adapter", "checkpoint", "info", "metrics"):
            path = files[name]
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        shutil.rmtree(files["checkpoint"].with_name("checkpoint.old"), ignore_errors=True)
    accelerator.wait_for_everyone()


def _train(cfg: TrainConfig, accelerator: Any) -> Path:
    out = Path(cfg.out)
    world, rank = accelerator.num_processes, accelerator.process_index
    _refuse_to_replace(cfg, accelerator)
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"config field 'batch_size': {cfg.batch_size} sequences per step must split evenly "
                          f"into micro-batches of {cfg.micro_batch_size} on {world} processes")
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    if cfg.resume and find_checkpoint(out) is not None:
        # The checkpoint's step count means nothing under another data order or objective.
        check_resumable(out / "config.yaml", cfg, "a checkpoint")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save(cfg, out / "config.yaml")

    # --- load: one copy of the base weights, LoRA on top
    set_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device=accelerator.device)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # the name before 5.24 (the floor, vLLM's pin)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    model.train()

    seqs = build_sequences(cfg, tok)
    roles = OBJECTIVES[cfg.loss].roles
    steps_per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(seqs) / cfg.batch_size)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.scheduler, total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by hand, once per step

    cache = None
    if cfg.ref_cache and len(roles) > 1:
        # What shapes the cached states besides the sequences' ids (which the cache key covers).
        settings = {"model": cfg.model.name, "dtype": str(next(model.parameters()).dtype),
                    "mixed_precision": str(accelerator.mixed_precision)}
        cache = build_ref_cache(model, seqs, roles[1:], out / "ref_cache", settings, tok.pad_token_id, accelerator)

    step = resume_from(out, model, optimizer, scheduler, accelerator) if cfg.resume else 0
    logger = Logger(out, step, accelerator.is_main_process, cfg.report_to, asdict(cfg))

    n_epochs_needed = math.ceil(total_steps * cfg.batch_size / len(seqs)) + 1
    stream = [i for e in range(n_epochs_needed) for i in epoch_order(seqs, cfg.seed * 1000 + e, cfg.group_by_problem)]

    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    while step < total_steps:
        t0 = time.perf_counter()
        # --- batch: this process's share of the global batch, in micro-batches
        global_idx = stream[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        per_rank = cfg.batch_size // world
        mine = [seqs[i] for i in global_idx[rank * per_rank:(rank + 1) * per_rank]]
        micro = [collate(mine[j:j + cfg.micro_batch_size], tok.pad_token_id, roles)
                 for j in range(0, len(mine), cfg.micro_batch_size)]
        # Tokens of the whole step, over all processes, known before any forward.
        n_tokens = accelerator.reduce(torch.tensor(float(sum(int(b.mask.sum()) for b in micro)),
                                                   device=accelerator.device), reduction="sum")

        # --- loss -> backward, normalized once over the whole step
        sums = torch.zeros(3, device=accelerator.device)
        for j, batch in enumerate(micro):
            batch = batch.to(accelerator.device)
            refs = cached_refs(cache, batch, accelerator.device) if cache is not None else None
            sync = j == len(micro) - 1
            with (nullcontext() if sync or world == 1 else accelerator.no_sync(model)), accelerator.autocast():
                terms = batch_loss(model, batch, cfg, refs)
            # DDP averages gradients over processes; × world turns that into the global sum.
            accelerator.backward(terms.loss * world / n_tokens)
            sums += torch.stack([terms.loss, terms.kl_teacher, terms.kl_negative]).detach().float()
        sums = accelerator.reduce(sums, reduction="sum") / n_tokens
        loss, kl_t, kl_n = sums.tolist()
        for name, value in (("loss", loss), ("kl_teacher", kl_t), ("kl_negative", kl_n)):
            if not math.isfinite(value):
                optimizer.zero_grad(set_to_none=True)
                logger.close()
                kept = find_checkpoint(out)
                raise RuntimeError(
                    f"training stopped at optimizer step {step + 1}: {name} is {value} (non-finite). "
                    f"No update was applied; the last good checkpoint "
                    f"{'is ' + str(kept) if kept else 'does not exist yet (save_every=' + str(cfg.save_every) + ')'}"
                    f". Try a lower lr, a neg_cap, or check the data of this step: {global_idx}")

        # --- step
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            logger.close()
            raise RuntimeError(f"training stopped at optimizer step {step + 1}: the gradient norm is {grad_norm} "
                               f"(non-finite); no update was applied, last good checkpoint: {find_checkpoint(out)}")
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # --- log
        dt = time.perf_counter() - t0
        row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss, "kl_teacher": kl_t,
               "kl_negative": kl_n, "lr": lr, "grad_norm": grad_norm, "tokens": int(n_tokens.item()),
               "tokens_per_s": round(float(n_tokens.item()) / dt, 2), "step_s": round(dt, 4)}
        logger.log(row)
        bar.set_postfix(loss=f"{loss:.4f}", kl_t=f"{kl_t:.4f}", kl_nr=f"{kl_n:.4f}", lr=f"{lr:.2e}",
                        gnorm=f"{grad_norm:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save_checkpoint(out, step, model, optimizer, scheduler, accelerator)
    bar.close()
    logger.close()

    # --- save: the adapter in PEFT format, a final checkpoint, and optionally the merged model
    save_checkpoint(out, step, model, optimizer, scheduler, accelerator)
    adapter_dir = out / "adapter"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(adapter_dir)
        (out / "train_info.json").write_text(json.dumps({
            "model": model_label(cfg.model), "prompt_version": load_prompts(cfg.prompts).version,
            "prompt_hash": load_prompts(cfg.prompts).hash, "examples": len(seqs),
            "steps": step, "processes": world, "grad_accum_steps": accum}, indent=2))
        if cfg.merge:
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(out / "merged")
            tok.save_pretrained(out / "merged")
    accelerator.wait_for_everyone()
    return adapter_dir
