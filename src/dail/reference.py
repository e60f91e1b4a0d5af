"""The reference passes of stage 2, and the role inputs they run on (docs/design.md "The three
roles", "Stage 2: training").

One copy of the weights plays every role. The student forward runs with the adapter on and
builds the graph; the reference forwards (teacher, negative reference) run under `no_grad`
inside `adapter_off(model)`. Each role sees its own context followed by the same trajectory
ids (never re-tokenized), and the final hidden states are gathered at the trajectory
positions, so position t of every role predicts trajectory token t. The loss then builds
logits from them chunk by chunk (losses.py), never (B, L, V) at once.

Which roles run is the loss's business (`losses.OBJECTIVES`); this module runs whichever roles
a batch holds: `collate` lays them out, `role_hidden` runs one, `reference_hidden` all the
references.

Beyond the paper:
- a reference pass that computes each context once: the part the teacher's and the NR's
  contexts share, and a problem's contexts for all its samples in the micro-batch
  (`SharedContexts`, `_shared_reference_hidden`);
- an optional reference cache (`build_ref_cache`) of the references' final hidden states,
  computed once before training and keyed on the content it was computed from (the ids of
  the trajectories and of the references' contexts) and on the settings that shape it
  (model, dtype, roles).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import DynamicCache

from dail.models import adapter_off
from dail.padding import cache_arg, cache_kv, plain_cache, right_pad, stack_caches

__all__ = ["ROLES", "Sequence", "Batch", "SharedContexts", "collate", "final_hidden", "role_hidden",
           "lm_head_params", "reference_hidden", "ref_cache_key", "build_ref_cache", "cached_refs"]

ROLES = ("student", "teacher", "negative")


# ----------------------------------------------------------------------------- role inputs

@dataclass
class Sequence:
    """One training example as token ids: a context per role and the target that follows it."""
    id: str                         # unique among the examples (the reference cache is keyed by it)
    target: list[int]               # trajectory ids, or for sft the expert solution + end-of-turn
    contexts: dict[str, list[int]]  # role -> chat-formatted prompt ids, for the roles the loss needs
    problem: str = ""               # the problem's id: a problem's samples share it (and their contexts)


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
    Roles keep the order they were collated in. targets and mask are (B, T) with T the longest
    target; mask is True on target tokens. `shared` is the teacher / NR input split for
    `reference_hidden` (when those are exactly the batch's references).
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


def collate(seqs: list[Sequence], pad_id: int, roles: tuple[str, ...]) -> Batch:
    T = max(len(s.target) for s in seqs)
    targets = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        targets[i, : len(s.target)] = torch.tensor(s.target)
        mask[i, : len(s.target)] = True
    inputs = {}
    for role in roles:
        ids, attn = right_pad([s.contexts[role] + s.target[:-1] for s in seqs], pad_id)
        inputs[role] = (ids, attn, torch.tensor([len(s.contexts[role]) - 1 for s in seqs]))
    shared = None
    if [r for r in roles if r != "student"] == ["teacher", "negative"]:
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
    traj = right_pad([[ctx[k][-1]] + seqs[i % B].target[:-1] for i, k in enumerate(pick)], pad_id)
    return SharedContexts(shared=P, teacher=right_pad([list(c[:-1]) for c in ctx[:U]], pad_id),
                          negative=right_pad([list(c[P:-1]) for c in ctx[U:]], pad_id), pick=torch.tensor(pick),
                          traj=traj, traj_pos=torch.tensor([len(ctx[k]) - 1 for k in pick]))


# ----------------------------------------------------------------------------- hidden states

def _base(model: Any) -> Any:
    """The transformers model inside DDP / PEFT wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def lm_head_params(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (weight (V, H), bias (V,) or None), which the chunked loss multiplies by."""
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
                  **cache_arg(cache))
    finally:
        handle.remove()
    return captured["h"]


def role_hidden(model: Any, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], T: int) -> torch.Tensor:
    """Final hidden states at the T positions that predict the target tokens: (B, T, H)."""
    ids, attn, start = inputs
    h = final_hidden(model, ids, attn)
    pos = (start[:, None] + torch.arange(T, device=ids.device)).clamp(max=h.shape[1] - 1)  # padding clamps
    return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))


# ----------------------------------------------------------------------------- the reference pass

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


def reference_hidden(model: Any, batch: Batch, roles: tuple[str, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """Hidden states (B, T, H) of the reference `roles` (default: every role of the batch but the
    student), in that order: base weights, no graph.

    For the teacher and NR with `batch.shared`, nothing is computed twice
    (`_shared_reference_hidden`); the result equals a full forward per role over `batch.inputs`
    within fp tolerance (tested). Models with sliding-window layers, whose caches cannot be
    cropped back, run the full forwards.
    """
    roles = tuple(roles or (r for r in batch.inputs if r != "student"))
    T = batch.targets.shape[1]
    with torch.no_grad(), adapter_off(model), _eval_mode(model):
        if batch.shared is not None and roles == ("teacher", "negative"):
            out = _shared_reference_hidden(model, batch.shared)
            if out is not None:
                return out
        return tuple(role_hidden(model, batch.inputs[r], T) for r in roles)


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
    cache = DynamicCache(config=_base(model).config)
    if not plain_cache(cache):
        return None
    P, dev = sc.shared, sc.pick.device
    ids, t_attn = sc.teacher
    final_hidden(model, ids, t_attn, cache)
    teacher_kv = cache_kv(cache)
    cache.crop(-(ids.shape[1] - P))
    ids, attn = sc.negative
    n_attn = torch.cat([t_attn[:, :P], attn], 1)
    final_hidden(model, ids, n_attn, cache, position_ids=P + torch.arange(ids.shape[1], device=dev).expand_as(ids))
    # (U, heads, L, d) per role -> (2U, heads, W, d), teacher rows first.
    ctx_attn = stack_caches(cache, [(teacher_kv, t_attn), (cache_kv(cache), n_attn)], side="right")
    cache.batch_select_indices(sc.pick)
    ids, attn = sc.traj
    pos = sc.traj_pos[:, None] + torch.arange(ids.shape[1], device=dev)
    h = final_hidden(model, ids, torch.cat([ctx_attn[sc.pick], attn], 1), cache, position_ids=pos)
    B = h.shape[0] // 2
    return h[:B], h[B:]


# ----------------------------------------------------------------------------- reference cache

def ref_cache_key(seqs: list[Sequence], roles: tuple[str, ...], settings: dict) -> str:
    """A digest of everything the cached states depend on: `settings` (model, dtype, ...), the
    reference roles, and every example's id, target ids and those roles' context ids."""
    digest = hashlib.sha256(json.dumps({"settings": settings, "roles": list(roles)}, sort_keys=True).encode())
    for s in seqs:
        digest.update(json.dumps([s.id, s.target, [s.contexts[r] for r in roles]]).encode())
    return digest.hexdigest()


def build_ref_cache(model: Any, seqs: list[Sequence], roles: tuple[str, ...], folder: Path, settings: dict,
                    pad_id: int, accelerator: Any) -> dict[str, tuple[torch.Tensor, ...]]:
    """id -> final hidden states (T, H) per reference role (`roles`, in order), computed once
    and kept in `folder`.

    Reused only when `ref_cache_key` matches, so regenerated data, other prompts, another
    model or dtype rebuild it. Costs H numbers per trajectory token and role in the model dtype
    (SmolLM2-135M, H = 576, fp32: 2.25 KiB), against V for cached logits (V = 49152: 192 KiB).
    Each process computes its share and writes its own file; then every process reads them all.
    """
    meta = {"key": ref_cache_key(seqs, roles, settings), "settings": settings, "roles": list(roles),
            "examples": len(seqs)}
    meta_path = folder / "meta.json"
    rank, world = accelerator.process_index, accelerator.num_processes
    fresh = meta_path.exists() and json.loads(meta_path.read_text()).get("key") == meta["key"]
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
            batch = collate([s], pad_id, roles).to(accelerator.device)
            with accelerator.autocast():
                refs = reference_hidden(model, batch)
            mine[s.id] = tuple(h[0, : len(s.target)].cpu() for h in refs)
        torch.save(mine, folder / f"rank{rank}-of-{world}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta_path.write_text(json.dumps(meta))
        accelerator.wait_for_everyone()
    cache: dict[str, tuple[torch.Tensor, ...]] = {}
    for f in sorted(folder.glob("rank*.pt")):
        cache.update(torch.load(f, weights_only=True))
    return cache


def cached_refs(cache: dict, batch: Batch, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Stack cached (T_i, H) rows into right-padded (B, T, H) tensors, one per cached role."""
    B, T = batch.targets.shape
    out = []
    for k in range(len(cache[batch.ids[0]])):
        first = cache[batch.ids[0]][k]
        x = torch.zeros(B, T, first.shape[-1], dtype=first.dtype)
        for i, sid in enumerate(batch.ids):
            h = cache[sid][k]
            x[i, : h.shape[0]] = h
        out.append(x.to(device))
    return tuple(out)
