"""Stage 2: train a LoRA student with the DAIL contrastive loss (DESIGN.md "Stage 2").

`train(cfg)` reads top to bottom: load the base model and tokenizer, attach LoRA, build the
token sequences, then for each optimizer step: batch -> loss -> backward -> step -> log,
and finally save the adapter (standard PEFT format) to `<out>/adapter`.

One copy of the weights plays all three roles. The student forward runs with the adapter on
and builds the graph; the teacher and negative-reference forwards run under `no_grad` inside
`adapter_off(model)`. Each role sees its own context followed by the same trajectory ids
(never re-tokenized), and the three sets of final hidden states are gathered at the
trajectory positions, so position t of every role predicts trajectory token t.

Normalization: the token count of a whole optimizer step is known from the data before any
forward, so it is summed over micro-batches and processes first, and each micro-batch
backpropagates `loss_sum / global_count` (times the number of processes, because DDP
averages gradients). The step's loss is exactly `Σ_t l_t / Σ_t mask_t` over the whole step.

Data order: the examples form one stream, the concatenation of a seeded permutation per
epoch (of problems, each followed by its samples, with `group_by_problem`); optimizer step k
takes items [k·batch_size, (k+1)·batch_size) of it, and process r takes its contiguous share.
So a step's global batch does not depend on the number of processes, and resuming at step k
needs nothing but k.

Beyond the paper: chunked loss from hidden states (losses.py), a reference pass that computes
each context once (the teacher/NR shared prefix, and a problem's context for all its samples
in the micro-batch), resumable atomic checkpoints, a stop on non-finite loss that keeps the
last good checkpoint, and an optional reference cache (`ref_cache`) of the teacher's and NR's
final hidden states.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from dail.config import ConfigError, DataConfig, TrainConfig, check_resumable, save
from dail.data import DataError, load_examples, read_records
from dail.landmarks import extract_landmarks
from dail.losses import ContrastiveSums, chunked_contrastive_terms, chunked_nll
from dail.models import adapter_off, attach_lora, load_model, load_tokenizer, model_label
from dail.prompts import (PROMPT_VERSION, end_of_turn_id, negative_messages, render, student_messages,
                          teacher_messages)

__all__ = ["Sequence", "Batch", "train", "build_sequences", "collate", "batch_loss", "final_hidden"]

log = logging.getLogger(__name__)

ROLES = ("student", "teacher", "negative")

# What a resumed run must share with the run that wrote the checkpoint (max_steps, epochs,
# lr and logging may change).
_RESUME_FIELDS = ("model", "data", "loss", "gamma", "neg_cap", "landmarks", "lora_r", "lora_alpha",
                  "target_modules", "batch_size", "seed", "group_by_problem", "max_length")


# ----------------------------------------------------------------------------- data

@dataclass
class Sequence:
    """One training example as token ids: a context per role and the target that follows it."""
    id: str
    target: list[int]               # trajectory ids (contrastive, nll) or expert solution + end-of-turn (sft)
    contexts: dict[str, list[int]]  # role -> chat-formatted prompt ids; only "student" for nll/sft
    problem: str = ""               # the problem's id: a problem's samples share it (and their contexts)


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
    return records


def build_sequences(cfg: TrainConfig, tok: Any) -> list[Sequence]:
    """Token sequences for `cfg.loss`, longer-than-`max_length` ones left out with a warning."""
    seqs = []
    if cfg.loss == "sft":
        source = cfg.data
        examples = load_examples(DataConfig(source=source, split="train"))
        eot = end_of_turn_id(tok)
        for ex in examples:
            # The raw expert solution, as the dataset gives it (the `sft` baseline of the paper).
            target = tok(ex.solution, add_special_tokens=False)["input_ids"] + [eot]
            seqs.append(Sequence(ex.id, target, {"student": render(tok, student_messages(ex.problem))}, ex.id))
    else:
        for rec in _synthetic_records(cfg.data):
            ctx = {"student": render(tok, student_messages(rec["problem"]))}
            if cfg.loss == "contrastive":
                marks = rec.get("landmarks")
                if marks is None:
                    marks = extract_landmarks(rec["solution"], cfg.landmarks)
                ctx["teacher"] = render(tok, teacher_messages(rec["problem"], rec["solution"]))
                ctx["negative"] = render(tok, negative_messages(rec["problem"], marks))
            sid = f"{rec['id']}#{rec.get('sample_index', 0)}"
            seqs.append(Sequence(sid, list(rec["trajectory_ids"]), ctx, str(rec["id"])))
    kept = [s for s in seqs if max(len(c) for c in s.contexts.values()) + len(s.target) <= cfg.max_length]
    if len(kept) < len(seqs):
        warnings.warn(f"{cfg.data}: skipped {len(seqs) - len(kept)} of {len(seqs)} examples longer than "
                      f"max_length={cfg.max_length} tokens (context + target)", stacklevel=2)
    if not kept:
        raise DataError(f"{cfg.data}: no example fits in max_length={cfg.max_length} tokens")
    return kept


@dataclass
class SharedContexts:
    """The teacher and NR inputs of a micro-batch, laid out so each piece is computed once.

    Rows of one problem have identical contexts, and both roles' contexts open with the same
    `shared` tokens (chat header, instruction, problem). For U distinct problems and B rows:
    `teacher` = (ids, attention) (U, L) is each problem's teacher context but its last token;
    `negative` the same for the NR context, from `shared` on; both right-padded. `pick` (2B,)
    is each teacher row's problem, then U + each NR row's problem; `traj` = (ids, attention)
    (2B, T) is that role's last context token and then the row's target[:-1]; `traj_pos`
    (2B,) is the position of that first token. See `_shared_reference_hidden`.
    """
    shared: int
    teacher: tuple[torch.Tensor, torch.Tensor]
    negative: tuple[torch.Tensor, torch.Tensor]
    pick: torch.Tensor
    traj: tuple[torch.Tensor, torch.Tensor]
    traj_pos: torch.Tensor

    def to(self, device: torch.device) -> "SharedContexts":
        def mv(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            return pair[0].to(device), pair[1].to(device)
        return SharedContexts(self.shared, mv(self.teacher), mv(self.negative), self.pick.to(device), mv(self.traj),
                              self.traj_pos.to(device))


@dataclass
class Batch:
    """Right-padded role inputs and the aligned targets.

    inputs[role] = (ids (B, L_role), attention (B, L_role), start (B,)): context + target[:-1],
    and `start` is the position whose output predicts target token 0 (last context position).
    targets and mask are (B, T) with T the longest target; mask is True on target tokens.
    `shared` is the same teacher / NR input split for `reference_hidden` (contrastive only).
    """
    ids: list[str]
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    targets: torch.Tensor
    mask: torch.Tensor
    shared: SharedContexts | None = None

    def to(self, device: torch.device) -> "Batch":
        inputs = {r: tuple(x.to(device) for x in v) for r, v in self.inputs.items()}
        return Batch(self.ids, inputs, self.targets.to(device), self.mask.to(device),
                     None if self.shared is None else self.shared.to(device))


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
    return ids, attn


def collate(seqs: list[Sequence], pad_id: int, roles: tuple[str, ...]) -> Batch:
    T = max(len(s.target) for s in seqs)
    targets = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        targets[i, : len(s.target)] = torch.tensor(s.target)
        mask[i, : len(s.target)] = True
    inputs = {}
    for role in roles:
        ids, attn = _right_pad([s.contexts[role] + s.target[:-1] for s in seqs], pad_id)
        inputs[role] = (ids, attn, torch.tensor([len(s.contexts[role]) - 1 for s in seqs]))
    shared = None
    if "teacher" in roles and "negative" in roles:
        shared = _shared_contexts(seqs, pad_id)
    return Batch([s.id for s in seqs], inputs, targets, mask, shared)


def _shared_contexts(seqs: list[Sequence], pad_id: int) -> SharedContexts:
    problems: dict[tuple, int] = {}
    row = [problems.setdefault((tuple(s.contexts["teacher"]), tuple(s.contexts["negative"])), len(problems))
           for s in seqs]
    U, B = len(problems), len(seqs)
    ctx = [t for t, _ in problems] + [n for _, n in problems]  # the U teacher contexts, then the U NR ones
    # The shared part ends at least two tokens before each context's end, so the NR keeps a token.
    P = max(0, min(min(len(os.path.commonprefix([t, n])), len(t) - 2, len(n) - 2) for t, n in problems))
    pick = row + [U + u for u in row]
    traj = _right_pad([[ctx[k][-1]] + seqs[i % B].target[:-1] for i, k in enumerate(pick)], pad_id)
    return SharedContexts(shared=P, teacher=_right_pad([list(c[:-1]) for c in ctx[:U]], pad_id),
                          negative=_right_pad([list(c[P:-1]) for c in ctx[U:]], pad_id), pick=torch.tensor(pick),
                          traj=traj, traj_pos=torch.tensor([len(ctx[k]) - 1 for k in pick]))


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

def _base(model: Any) -> Any:
    """The transformers model inside DDP / PEFT wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def lm_head_params(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = _base(model).get_output_embeddings()
    if getattr(_base(model).config, "final_logit_softcapping", None):
        raise NotImplementedError("models with final_logit_softcapping (e.g. Gemma 2) are not supported by "
                                  "the chunked loss yet")
    return head.weight, getattr(head, "bias", None)


def final_hidden(model: Any, ids: torch.Tensor, attn: torch.Tensor, cache: Any = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final (normed) hidden states (B, L, H) of the decoder, without building (B, L, V) logits.

    The call goes through the full (possibly DDP-wrapped) model so gradient sync works; only
    the last position's logits are built (`logits_to_keep=1`), and a forward hook on the
    decoder picks up its output. With a KV `cache`, `ids` continue the cached columns (`attn`
    then covers cached + new columns, `position_ids` place them) and the cache grows by them.
    """
    captured = {}

    def hook(_module: Any, _args: Any, out: Any) -> None:
        captured["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    handle = _base(model).get_decoder().register_forward_hook(hook)
    try:
        if cache is None:
            model(input_ids=ids, attention_mask=attn, logits_to_keep=1, use_cache=False)
        else:
            model(input_ids=ids, attention_mask=attn, position_ids=position_ids, logits_to_keep=1, use_cache=True,
                  cache=cache)
    finally:
        handle.remove()
    return captured["h"]


def role_hidden(model: Any, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], T: int) -> torch.Tensor:
    """Final hidden states at the T positions that predict the target tokens: (B, T, H)."""
    ids, attn, start = inputs
    h = final_hidden(model, ids, attn)
    pos = (start[:, None] + torch.arange(T, device=ids.device)).clamp(max=h.shape[1] - 1)  # padding clamps
    return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """The references are the frozen base model: no dropout, and no gradient checkpointing
    (which would also refuse the KV cache the shared contexts need)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def reference_hidden(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and negative-reference hidden states (B, T, H): base weights, no graph.

    With `batch.shared`, nothing is computed twice (`_shared_reference_hidden`); the result
    equals two full forwards over `batch.inputs` within fp tolerance (tested). Models with
    sliding-window layers, whose caches cannot be cropped back, run the two full forwards.
    """
    T = batch.targets.shape[1]
    with torch.no_grad(), adapter_off(model), _eval_mode(model):
        if batch.shared is not None:
            out = _shared_reference_hidden(model, batch.shared)
            if out is not None:
                return out
        return role_hidden(model, batch.inputs["teacher"], T), role_hidden(model, batch.inputs["negative"], T)


def _shared_reference_hidden(model: Any, sc: SharedContexts) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Three forwards, every context token once:

    1. each distinct problem's teacher context (U rows);
    2. the NR contexts after the part they share with the teacher's, on the teacher cache cut
       back to that part (U rows);
    3. both roles' caches stacked (2U rows, the shorter padded with masked columns), picked
       for every row (2B rows: a problem's contexts serve all its samples), and each row's
       trajectory after each role's context.

    Step 3 attends over masked gaps, so it gets explicit positions. Few, large calls matter:
    on CPU every call streams all the weights from memory. The call count does not depend on
    the data, so every process makes the same calls, which DDP (buffer broadcast) and FSDP
    (all-gathers) need.
    """
    import torch.nn.functional as F
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=_base(model).config)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    P, dev = sc.shared, sc.pick.device
    ids, t_attn = sc.teacher
    final_hidden(model, ids, t_attn, cache)
    teacher_kv = [(layer.keys, layer.values) for layer in cache.layers]
    cache.crop(-(ids.shape[1] - P))
    ids, attn = sc.negative
    n_attn = torch.cat([t_attn[:, :P], attn], 1)
    final_hidden(model, ids, n_attn, cache, position_ids=P + torch.arange(ids.shape[1], device=dev).expand_as(ids))
    W = max(t_attn.shape[1], n_attn.shape[1])
    for layer, (k, v) in zip(cache.layers, teacher_kv):  # (U, heads, L, d) per role -> (2U, heads, W, d)
        layer.keys = torch.cat([F.pad(x, (0, 0, 0, W - x.shape[2])) for x in (k, layer.keys)])
        layer.values = torch.cat([F.pad(x, (0, 0, 0, W - x.shape[2])) for x in (v, layer.values)])
    ctx_attn = torch.cat([F.pad(a, (0, W - a.shape[1])) for a in (t_attn, n_attn)])
    cache.batch_select_indices(sc.pick)
    ids, attn = sc.traj
    pos = sc.traj_pos[:, None] + torch.arange(ids.shape[1], device=dev)
    h = final_hidden(model, ids, torch.cat([ctx_attn[sc.pick], attn], 1), cache, position_ids=pos)
    B = h.shape[0] // 2
    return h[:B], h[B:]


def batch_loss(model: Any, batch: Batch, cfg: TrainConfig,
               refs: tuple[torch.Tensor, torch.Tensor] | None = None) -> ContrastiveSums:
    """Loss sums of one micro-batch. To change the objective, edit this function.

    `refs` are cached teacher / NR hidden states; without them the references run live.
    """
    weight, bias = lm_head_params(model)
    T = batch.targets.shape[1]
    h_s = role_hidden(model, batch.inputs["student"], T)  # adapter on, with graph
    if cfg.loss == "contrastive":
        h_t, h_n = refs if refs is not None else reference_hidden(model, batch)
        return chunked_contrastive_terms(h_s, h_t.to(h_s.dtype), h_n.to(h_s.dtype), weight, batch.mask,
                                         cfg.gamma, cfg.neg_cap, cfg.chunk_size, bias)
    total, count = chunked_nll(h_s, weight, batch.targets, batch.mask, cfg.chunk_size, bias)
    zero = torch.zeros((), device=total.device)
    return ContrastiveSums(total, zero, zero, count)


# ----------------------------------------------------------------------------- reference cache

def build_ref_cache(model: Any, seqs: list[Sequence], cfg: TrainConfig, tok: Any, accelerator: Any
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """id -> (teacher (T, H), negative (T, H)) final hidden states, computed once, kept on disk.

    Costs 2 × H numbers per trajectory token in the model dtype (SmolLM2-135M, H = 576, fp32:
    4.5 KiB per token; bf16 half that), against 2 × V for cached logits (V = 49152: 384 KiB).
    Each process computes its share and writes its own file; then every process reads them all.
    """
    folder = Path(cfg.out) / "ref_cache"
    meta = {"model": cfg.model.name, "data": str(Path(cfg.data).resolve()), "prompt_version": PROMPT_VERSION,
            "landmarks": cfg.landmarks, "ids": [s.id for s in seqs], "max_length": cfg.max_length}
    meta_path = folder / "meta.json"
    rank, world = accelerator.process_index, accelerator.num_processes
    fresh = meta_path.exists() and json.loads(meta_path.read_text()) == meta
    if not fresh:
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        accelerator.wait_for_everyone()
        mine = {}
        # Every process makes the same number of forward calls (DDP broadcasts buffers and FSDP
        # all-gathers in each): the last share is padded by repeating an example.
        for i in range(rank, math.ceil(len(seqs) / world) * world, world):
            s = seqs[min(i, len(seqs) - 1)]
            batch = collate([s], tok.pad_token_id, ROLES).to(accelerator.device)
            with accelerator.autocast():
                h_t, h_n = reference_hidden(model, batch)
            mine[s.id] = (h_t[0, : len(s.target)].cpu(), h_n[0, : len(s.target)].cpu())
        torch.save(mine, folder / f"rank{rank}-of-{world}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta_path.write_text(json.dumps(meta))
        accelerator.wait_for_everyone()
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for f in sorted(folder.glob("rank*.pt")):
        cache.update(torch.load(f, weights_only=True))
    return cache


def cached_refs(cache: dict, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack cached (T_i, H) rows into right-padded (B, T, H) tensors."""
    B, T = batch.targets.shape
    out = []
    for k in (0, 1):
        first = cache[batch.ids[0]][k]
        x = torch.zeros(B, T, first.shape[-1], dtype=first.dtype)
        for i, sid in enumerate(batch.ids):
            h = cache[sid][k]
            x[i, : h.shape[0]] = h
        out.append(x.to(device))
    return out[0], out[1]


# ----------------------------------------------------------------------------- schedule, checkpoints, logging

def lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:  # step = optimizer steps already taken
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model: Any, optimizer: Any, scheduler: Any, accelerator: Any) -> None:
    """<out>/checkpoint, written atomically: a temp folder, then renames.

    Rename over a non-empty folder is impossible, so the old checkpoint moves to
    `checkpoint.old` first and is deleted last; `find_checkpoint` falls back to it if a crash
    hits between the two renames.
    """
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        accelerator.unwrap_model(model).save_pretrained(tmp / "adapter")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "state.pt")
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "COMPLETE").write_text(str(step))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(out: Path) -> Path | None:
    for cand in (out / "checkpoint", out / "checkpoint.old"):
        if (cand / "COMPLETE").exists():
            return cand
    return None


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any, accelerator: Any) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The schedule follows the *current* config (max_steps may have grown): set this step's lr.
    step = int(state["step"])
    for group, base_lr, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * f(step)
    rng = ckpt / f"rng{accelerator.process_index}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return step


class Logger:
    """One line per optimizer step to metrics.jsonl, plus TensorBoard or W&B if asked (main process only)."""

    def __init__(self, cfg: TrainConfig, out: Path, resume_step: int, enabled: bool) -> None:
        self.enabled, self.tb, self.wandb = enabled, None, None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        # On resume keep the lines up to the checkpoint; a fresh run starts a fresh file.
        kept = [r for r in read_records(path) if r.get("step", 0) <= resume_step] if resume_step else []
        self.fh = open(path, "w", encoding="utf-8")
        for r in kept:
            self.fh.write(json.dumps(r) + "\n")
        if cfg.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional: degrade to console + metrics.jsonl
                self.tb = None
        elif cfg.report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("config field 'report_to': wandb is not installed (pip install wandb), "
                                  "or use report_to=tensorboard|none") from None
            self.wandb = wandb.init(project="dail", dir=str(out), config=asdict(cfg), resume="allow")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        for k, v in row.items():
            if k != "step" and self.tb is not None:
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.fh.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> Path:
    """Train the LoRA student; returns the adapter folder `<out>/adapter`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    cpu = cfg.model.device == "cpu" or not torch.cuda.is_available()
    bf16 = not cpu and torch.cuda.is_bf16_supported()
    accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no")
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"config field 'batch_size': {cfg.batch_size} sequences per step must split evenly "
                          f"into micro-batches of {cfg.micro_batch_size} on {world} processes")
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    if cfg.resume and find_checkpoint(out) is not None:
        # The checkpoint's step count means nothing under another data order or objective.
        check_resumable(out / "config.yaml", cfg, _RESUME_FIELDS, "a checkpoint")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save(cfg, out / "config.yaml")

    # --- load: one copy of the base weights, LoRA on top
    set_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device=accelerator.device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    model.train()

    seqs = build_sequences(cfg, tok)
    roles = ROLES if cfg.loss == "contrastive" else ("student",)
    steps_per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(seqs) / cfg.batch_size)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by hand, once per step

    cache = None
    if cfg.ref_cache and cfg.loss == "contrastive":
        cache = build_ref_cache(model, seqs, cfg, tok, accelerator)

    step = 0
    ckpt = find_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        step = load_checkpoint(ckpt, model, optimizer, scheduler, accelerator)
        log.info("resumed from %s at step %d", ckpt, step)
    elif cfg.resume:
        warnings.warn(f"{out}: resume=true but there is no complete checkpoint; starting from step 0",
                      stacklevel=2)
    logger = Logger(cfg, out, step, accelerator.is_main_process)

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
            "model": model_label(cfg.model), "prompt_version": PROMPT_VERSION, "examples": len(seqs),
            "steps": step, "processes": world, "grad_accum_steps": accum}, indent=2))
        if cfg.merge:
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(out / "merged")
            tok.save_pretrained(out / "merged")
    accelerator.wait_for_everyone()
    return adapter_dir
