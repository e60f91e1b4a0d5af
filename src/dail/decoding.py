"""The decoding loop: plain sampling and mixed-policy decoding, over token ids.

One small function, `decode`, serves every sampler in dail:
- evaluation and direct-mode synthesis: plain sampling from one set of prompts;
- mixed-policy decoding (docs/design.md "Stage 1"): the student proposes `t ~ p_S`, the teacher
  accepts it if `p_T(t) >= tau` (temperature 1, full vocabulary), else the teacher's own
  sample replaces it.

Fused two-role step. Student and teacher are the same frozen weights during synthesis, so
each step is ONE forward over 2B rows (B student contexts stacked on B teacher contexts),
left-padded, with explicit position ids, in one KV cache. Both rows of a pair receive the
chosen token, so `r` is the same ids in both contexts.

Prompts are prefilled once: identical prompts (n samples of one problem) share one prefill
row whose cache is then repeated. Finished rows leave the batch (`batch_select_indices`).

Randomness comes only from the per-row `torch.Generator`s the caller passes in, two uniform
draws per row per step (student proposal, teacher fallback) whether used or not, so a row's
tokens do not depend on which other rows share its batch (up to floating-point noise in
batched matmuls). Temperature 0 is argmax. The tokenizer stays outside.

Where we differ from the paper: when the teacher replaces a token it samples at the run's
sampling temperature and top-p (the paper only says "sample from M_T"), so that with
temperature 0 the pure-teacher limit is the teacher's greedy output. Acceptance always uses
the teacher's temperature-1, full-vocabulary probability, as the paper specifies.

Penalties and banned tokens shape only the sampling distributions (the student's proposal and
the teacher's replacement), never the acceptance probability:
- presence / frequency penalties, with OpenAI and vLLM semantics: `logits -= presence·1[c > 0]
  + frequency·c`, where `c` counts the token among this row's generated tokens (never the
  prompt's), applied before temperature and top-p. The paper's evaluation uses presence 1.5;
- `banned_ids` get probability 0 at every step: synthesis inside a thinking block bans the
  closing think tag, so a trajectory stays a thinking trace (`dail.prompts.think_close_ids`).
With both penalties 0 and nothing banned the code path is the one without them, bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from dail.padding import cache_arg, cache_kv, plain_cache, stack_caches


@dataclass
class Decoded:
    """One decoded sequence. Per-token lists are aligned with `tokens`."""
    tokens: list[int]
    finish_reason: str  # "stop" (end-of-turn token, included in tokens) or "length"
    teacher_mask: list[int] = field(default_factory=list)  # 1 = the teacher produced the token
    p_student: list[float] = field(default_factory=list)   # student's sampling prob of the token
    p_teacher: list[float] = field(default_factory=list)   # teacher's (plain sampling: writer's) T=1 prob
    q: list[float] = field(default_factory=list)           # behaviour-policy prob of the token
    entropy: list[float] = field(default_factory=list)     # plain sampling with `entropy`: the writer's T=1 entropy


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float, *, counts: torch.Tensor | None = None,
                   presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                   banned: torch.Tensor | None = None) -> torch.Tensor:
    """(R, V) logits -> (R, V) float32 sampling distribution (one-hot argmax at temperature 0).

    `counts` (R, V): how often each token occurs among the row's generated tokens; the
    penalties subtract `presence·1[count > 0] + frequency·count` from the logits first (OpenAI /
    vLLM semantics). `banned` (ids): tokens that may never be drawn.
    """
    logits = logits.float()
    if counts is not None and (presence_penalty or frequency_penalty):
        logits = logits - presence_penalty * (counts > 0).float() - frequency_penalty * counts
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        # Drop a token when the mass strictly before it (in descending order) already reaches top_p
        # (keeps >= 1 token). The nucleus lies inside the k most likely tokens once their mass
        # reaches top_p in every row; a full sort of the vocabulary costs ~25x a top-64 on a CPU
        # (benchmarks/bench_eval_precision.py), so k grows from 64 only where a row needs it.
        k = min(_NUCLEUS_START, probs.shape[-1])
        while True:
            top, order = probs.topk(k, dim=-1)
            if k == probs.shape[-1] or bool((top.sum(-1) >= top_p).all()):
                break
            k = min(k * 8, probs.shape[-1])
        kept = (top.cumsum(-1) - top) < top_p
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, kept)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


_NUCLEUS_START = 64  # top-p: the first candidate set (most LM steps' nucleus at p 0.95 is far smaller)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample per row: (R, V) probs, (R,) uniforms in [0, 1) -> (R,) ids."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _prefill_rows(model: Any, prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """One left-padded prefill forward: (last logits (R, V), cache, mask (R, L), next position (R,))."""
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id, device)
    pos = (mask.cumsum(-1) - 1).clamp_(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_arg(cache),
                logits_to_keep=1)
    return out.logits[:, -1], cache, mask, pos[:, -1] + 1


def _stack_left_padded(parts: list[tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]]) -> tuple | None:
    """Stack prefilled groups of rows into one batch, left-padding shorter caches with masked zeros.

    Returns None when the cache has layers other than plain DynamicLayer (sliding-window or
    linear-attention layers cannot be padded this way); the caller then prefills jointly.
    """
    caches = [p[1] for p in parts]
    if not all(plain_cache(c) for c in caches):
        return None
    mask = stack_caches(caches[0], [(cache_kv(c), p[2]) for c, p in zip(caches, parts)], side="left")
    return torch.cat([p[0] for p in parts]), caches[0], mask, torch.cat([p[3] for p in parts])


def _prefill(model: Any, prompts: list[list[int]], pad_id: int,
             groups: int = 1) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Prefill unique prompts once, then repeat their cache rows to match `prompts`.

    `groups` > 1 splits the rows into that many equal consecutive groups (student rows,
    teacher rows) and prefills each group padded only to its own longest prompt: teacher
    contexts carry the expert solution and are much longer, so one joint prefill would pad
    every student row to the teacher's length. The groups' caches are then stacked.

    Returns (last-position logits (R, V), cache, attention mask (R, L), next position (R,)).
    """
    device = next(model.parameters()).device
    unique: dict[tuple[int, ...], int] = {}
    index = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
    uniq = [list(p) for p in unique]
    size = len(prompts) // groups
    # Unique prompts stay in first-seen order, so each group's uniques are consecutive.
    bounds = [index[g * size] for g in range(groups)] + [len(uniq)]
    separable = all(bounds[g] <= i < bounds[g + 1] for g in range(groups)
                    for i in index[g * size:(g + 1) * size]) and len(prompts) == groups * size
    if not separable:  # a prompt shared across groups: prefill all rows jointly
        bounds = [0, len(uniq)]
    parts = [_prefill_rows(model, uniq[a:b], pad_id) for a, b in zip(bounds, bounds[1:]) if b > a]
    stacked = _stack_left_padded(parts) if len(parts) > 1 else parts[0]
    if stacked is None:
        stacked = _prefill_rows(model, uniq, pad_id)
    logits, cache, mask, next_pos = stacked
    sel = torch.tensor(index, device=device)
    if len(unique) != len(prompts) or index != sorted(index):
        cache.batch_select_indices(sel)
    return logits[sel], cache, mask[sel], next_pos[sel]


def choose(ls: torch.Tensor, lt: torch.Tensor | None, u: torch.Tensor, *, temperature: float, top_p: float,
           tau: float = 0.0, writer: str = "student", entropy: bool = False, counts: torch.Tensor | None = None,
           presence_penalty: float = 0.0, frequency_penalty: float = 0.0, banned: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, ...]:
    """One decoding step's decision for n rows, from their logits and their two uniforms each.

    `ls` (n, V): the writer's logits (the student's, in mixed decoding); `lt` (n, V): the
    teacher's (None: plain sampling); `u` (n, 2): the row's uniforms for this step, the
    proposal's and the teacher's fallback. Returns (chosen ids, written by the teacher, p_S, p_T,
    q, entropy or None), each (n,). Every engine takes its decisions here, so given the same
    logits and the same uniforms they take the same ones (tests/test_vllm_engine.py replays it).
    """
    shape = dict(counts=counts, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                 banned=banned)
    ps = sampling_probs(ls, temperature, top_p, **shape)                             # (n, V)
    t_student = _draw(ps, u[:, 0])
    ent = None
    if lt is not None:
        pt_full = torch.softmax(lt.float(), dim=-1)                                   # temperature 1
        pt_sample = sampling_probs(lt, temperature, top_p, **shape)
        t_teacher = _draw(pt_sample, u[:, 1])
        accept = pt_full.gather(-1, t_student[:, None]).squeeze(-1) >= tau
        chosen = torch.where(accept, t_student, t_teacher)
        # q(t) = p_S(t)·1[p_T(t) >= tau] + (sum of p_S over rejected tokens)·p_T,sample(t)
        rejected_mass = (ps * (pt_full < tau)).sum(-1)
        p_s = ps.gather(-1, chosen[:, None]).squeeze(-1)
        p_t = pt_full.gather(-1, chosen[:, None]).squeeze(-1)
        q = p_s * (p_t >= tau) + rejected_mass * pt_sample.gather(-1, chosen[:, None]).squeeze(-1)
        by_teacher = ~accept
    else:
        chosen = t_student
        p_s = ps.gather(-1, chosen[:, None]).squeeze(-1)
        lf = ls.float()  # the writer's temperature-1 probability, without a full softmax
        lse = torch.logsumexp(lf, dim=-1)
        p_t = (lf.gather(-1, chosen[:, None]).squeeze(-1) - lse).exp()
        if entropy:  # H = logsumexp(l) - sum softmax(l)·l
            ent = lse - (torch.softmax(lf, dim=-1) * lf.nan_to_num(neginf=0.0)).sum(-1)
        q = p_s
        by_teacher = torch.full_like(chosen, writer == "teacher", dtype=torch.bool)
    return chosen, by_teacher, p_s, p_t, q, ent


@torch.no_grad()
def decode(
    model: Any,
    prompts: list[list[int]],
    *,
    generators: list[torch.Generator],
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    teacher_prompts: list[list[int]] | None = None,
    tau: float = 0.0,
    writer: str = "student",
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    banned_ids: list[int] | None = None,
    entropy: bool = False,
) -> list[Decoded]:
    """Decode one sequence per prompt.

    Without `teacher_prompts`: plain sampling from `prompts`; `writer` ("student" or
    "teacher") only labels who produced the tokens. With `teacher_prompts` (aligned with
    `prompts`): mixed-policy decoding with threshold `tau`, one fused forward per token.
    `presence_penalty`, `frequency_penalty` and `banned_ids` shape the sampling distributions
    (module docstring); `p_student` and `q` are then the probabilities actually sampled from.
    With `entropy` (plain sampling), each step also records the entropy in nats of the writer's
    temperature-1, full-vocabulary distribution at that position: how broad the model is where
    it wrote, whatever the sampler's settings.
    """
    B = len(prompts)
    if len(generators) != B:
        raise ValueError(f"need one generator per prompt: {len(generators)} generators for {B} prompts")
    mixed = teacher_prompts is not None
    if mixed and len(teacher_prompts) != B:
        raise ValueError("teacher_prompts must align with prompts")
    rows = list(prompts) + (list(teacher_prompts) if mixed else [])
    logits, cache, mask, next_pos = _prefill(model, rows, pad_id, groups=2 if mixed else 1)
    device = logits.device
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    banned = torch.tensor(sorted(set(banned_ids)), dtype=torch.long, device=device) if banned_ids else None
    penalized = bool(presence_penalty or frequency_penalty)
    # (n, V) occurrences of each token among a live row's generated tokens (penalties only).
    counts = torch.zeros(B, logits.shape[-1], device=device) if penalized else None
    shape = dict(counts=counts, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                 banned=banned)

    results: list[Decoded | None] = [None] * B
    toks: list[list[int]] = [[] for _ in range(B)]
    if entropy and mixed:
        raise ValueError("entropy is recorded for plain sampling only")
    fields = ("teacher_mask", "p_student", "p_teacher", "q") + (("entropy",) if entropy else ())
    rec = {k: [[] for _ in range(B)] for k in fields}
    active = list(range(B))  # original index of each live pair
    for step in range(max_new_tokens):
        n = len(active)
        u = torch.stack([torch.rand(2, generator=generators[i]) for i in active]).to(device)  # (n, 2)
        chosen, by_teacher, p_s, p_t, q, ent = choose(
            logits[:n], logits[n:] if mixed else None, u, temperature=temperature, top_p=top_p, tau=tau,
            writer=writer, entropy=entropy, **shape)
        if entropy:
            ent_l = ent.tolist()

        if counts is not None:
            counts[torch.arange(n, device=device), chosen] += 1
        chosen_l, by_t, ps_l, pt_l, q_l = (x.tolist() for x in (chosen, by_teacher, p_s, p_t, q))
        is_stop = torch.isin(chosen, stop).tolist()
        keep = []
        for j, i in enumerate(active):
            toks[i].append(chosen_l[j])
            rec["teacher_mask"][i].append(int(by_t[j]))
            rec["p_student"][i].append(ps_l[j])
            rec["p_teacher"][i].append(pt_l[j])
            rec["q"][i].append(q_l[j])
            if entropy:
                rec["entropy"][i].append(ent_l[j])
            if is_stop[j] or step == max_new_tokens - 1:
                results[i] = Decoded(toks[i], "stop" if is_stop[j] else "length",
                                     **{k: v[i] for k, v in rec.items()})
            else:
                keep.append(j)
        if not keep:
            break
        if len(keep) < n:  # finished pairs leave the batch
            active = [active[j] for j in keep]
            sel = torch.tensor(keep + ([n + j for j in keep] if mixed else []), device=device)
            cache.batch_select_indices(sel)
            mask, next_pos = mask[sel], next_pos[sel]
            chosen = chosen[sel[: len(keep)]]
            if counts is not None:
                counts = counts[sel[: len(keep)]]
                shape["counts"] = counts
        feed = torch.cat([chosen, chosen]) if mixed else chosen                         # (R,)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    use_cache=True, **cache_arg(cache))
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return results  # type: ignore[return-value]


def sample_seed(run_seed: int, problem_id: str, sample_index: int) -> int:
    """The seed of one (problem, sample): a stable hash of the run seed, id and index.

    It does not depend on batch composition, process rank or order, so a record can be
    regenerated alone and sharded runs match single-process runs.
    """
    digest = hashlib.sha256(f"{run_seed}\x00{problem_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(run_seed: int, problem_id: str, sample_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(run_seed, problem_id, sample_index))
