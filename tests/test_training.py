"""Stage 2 on the tiny random model: the loop, the role switch, normalization, resume, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dail.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from dail.prompts import end_of_turn_ids
from dail.training import train

PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3+4=7. #### 7", "x = 3 + 4 = 7 \\boxed{7}"),
    ("Tom has 6 apples and buys 6 more. How many apples does he have?", "6+6=12. #### 12", "6 + 6 = 12 \\boxed{12}"),
    ("Tom has 12 apples and buys 12 more. How many?", "12+12=24. #### 24", "the answer is 24 \\boxed{24}"),
    ("An apple costs 2. How much do 4 apples cost?", "2*4=8. #### 8", "2 * 4 = 8 so \\boxed{8}"),
    ("Tom has 9 apples and eats 2. How many are left?", "9-2=7. #### 7", "9 - 2 = 7 \\boxed{7}"),
    ("x = 5 + 3. What is x?", "5+3=8. #### 8", "x is 8 \\boxed{8}"),
]


def write_synthetic(path: Path, tok, n: int = 6, reverse: bool = False) -> Path:
    """n records, one per problem; `reverse` writes each trajectory's tokens backwards (another
    trajectory of the same length, as a regenerated set might have)."""
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    with open(path, "w", encoding="utf-8") as fh:
        for i, (problem, solution, traj) in enumerate(PROBLEMS[:n]):
            ids = tok(traj, add_special_tokens=False)["input_ids"]
            ids = (ids[::-1] if reverse else ids) + [eot]
            rec = {"id": f"p{i}", "problem": problem, "solution": solution, "answer": solution.split()[-1],
                   "landmarks": None if i % 2 else ["7"], "trajectory": traj, "trajectory_ids": ids,
                   "teacher_mask": [0] * len(ids), "finish_reason": "stop", "sample_index": 0, "correct": None}
            fh.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture()
def synth(tmp_path, tiny_tok):
    return write_synthetic(tmp_path / "synthetic.jsonl", tiny_tok)


def _cfg(tiny_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=ModelConfig(name=str(tiny_dir), device="cpu"), data=str(data), out=str(out), lr=5e-2,
                batch_size=4, micro_batch_size=2, epochs=2, lora_r=4, lora_alpha=8, warmup_steps=1,
                report_to="none", save_every=0, gamma=0.2)
    base.update(kw)
    return TrainConfig(**base)


def _adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


def test_contrastive_training_writes_loadable_adapter_and_role_switch_holds(tiny_dir, synth, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dail.models import adapter_off
    from dail.training import train

    out = tmp_path / "run"
    adapter = train(_cfg(tiny_dir, synth, out, merge=True))
    assert adapter == out / "adapter"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # 6 examples × 2 epochs / 4 per step
    for r in rows:
        assert {"loss", "kl_teacher", "kl_negative", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert r["loss"] == pytest.approx(r["kl_teacher"] - 0.2 * r["kl_negative"], rel=1e-4, abs=1e-5)
    assert (out / "config.yaml").exists() and (out / "checkpoint" / "COMPLETE").exists()

    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).eval()
    with torch.no_grad():
        on = model(ids).logits
        with adapter_off(model):
            off = model(ids).logits
    torch.testing.assert_close(off, base_logits)  # teacher / NR role == the base model, after training
    assert (on - base_logits).abs().max() > 1e-3  # and the trained student differs
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, on, rtol=1e-4, atol=1e-4)


def test_live_teacher_hidden_equals_base_model_during_training(tiny, synth, tmp_path):
    """reference_hidden (adapter off, inside the training model) == plain base forwards."""
    from dail.models import attach_lora
    from dail.reference import collate, reference_hidden, role_hidden
    from dail.training import build_sequences

    model, tok = tiny
    cfg = _cfg("unused", synth, tmp_path)
    seqs = build_sequences(cfg, tok)
    batch = collate(seqs[:3], tok.pad_token_id, ("student", "teacher", "negative"))
    assert batch.shared is not None and batch.shared.shared > 0  # the shared path is under test
    T = batch.targets.shape[1]
    with torch.no_grad():
        want_t = role_hidden(model, batch.inputs["teacher"], T)
        want_n = role_hidden(model, batch.inputs["negative"], T)
    peft = attach_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.5)  # a LoRA that visibly changes the model
    h_t, h_n = reference_hidden(peft, batch)
    m = batch.mask  # padding positions hold whatever each path computes there; the loss never reads them
    torch.testing.assert_close(h_t[m], want_t[m], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_n[m], want_n[m], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        h_s_teacher_ctx = role_hidden(peft, batch.inputs["teacher"], T)  # adapter on
    assert (h_s_teacher_ctx - want_t)[batch.mask].abs().max() > 1e-3


def test_shared_reference_pass_is_exact_and_computes_each_context_once(tiny, synth, tmp_path):
    """Rows of the same problem (different trajectories) and of different problems, unequal
    lengths everywhere: the shared pass equals two full forwards, and runs each problem's
    prefix and context rest once."""
    import dataclasses

    from dail.reference import collate, reference_hidden
    from dail.training import build_sequences

    model, tok = tiny
    seqs = build_sequences(_cfg("unused", synth, tmp_path), tok)
    # Two more samples of problems 0 and 3, with other trajectories.
    extra = [dataclasses.replace(seqs[0], id="p0#1", target=seqs[0].target[2:]),
             dataclasses.replace(seqs[3], id="p3#1", target=seqs[1].target + seqs[3].target)]
    rows = [seqs[0], seqs[1], extra[0], seqs[3], extra[1]]
    batch = collate(rows, tok.pad_token_id, ("student", "teacher", "negative"))
    sc = batch.shared
    U, P = sc.teacher[0].shape[0], sc.shared
    assert U == 3 and P > 0 and sc.pick.tolist() == [0, 1, 0, 2, 2, 3, 4, 3, 5, 5]
    for s in rows:
        assert s.contexts["teacher"][:P] == s.contexts["negative"][:P]
    calls = []
    hook = model.get_decoder().register_forward_hook(
        lambda m, args, kw, out: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    shared = reference_hidden(model, batch)
    batch.shared = None  # two full forwards
    full = reference_hidden(model, batch)
    hook.remove()
    T = batch.targets.shape[1]
    L_t, L_n = (max(len(s.contexts[r]) for s in rows) - 1 for r in ("teacher", "negative"))
    assert calls[:3] == [(3, L_t), (3, L_n - P), (10, T)]  # contexts per problem (NR after the shared part), rows
    assert calls[3:] == [tuple(batch.inputs["teacher"][0].shape), tuple(batch.inputs["negative"][0].shape)]
    for a, b in zip(shared, full):
        assert a.shape == b.shape == (5, T, a.shape[-1])
        torch.testing.assert_close(a[batch.mask], b[batch.mask], rtol=1e-4, atol=1e-5)
    assert collate(rows, tok.pad_token_id, ("student",)).shared is None
    # Contexts that share no token: the NR runs on a cache cut back to nothing.
    apart = [dataclasses.replace(r, contexts={**r.contexts, "negative": [tok.pad_token_id] + r.contexts["negative"]})
             for r in rows]
    batch = collate(apart, tok.pad_token_id, ("student", "teacher", "negative"))
    assert batch.shared.shared == 0
    shared = reference_hidden(model, batch)
    batch.shared = None
    for a, b in zip(shared, reference_hidden(model, batch)):
        torch.testing.assert_close(a[batch.mask], b[batch.mask], rtol=1e-4, atol=1e-5)


def test_epoch_order_keeps_a_problems_samples_together():
    from dail.reference import Sequence
    from dail.training import epoch_order

    seqs = [Sequence(f"p{p}#{k}", [1], {}, f"p{p}") for p in range(6) for k in range(3)]
    seqs = seqs[::2] + seqs[1::2]  # a problem's samples need not be adjacent in the file
    order = epoch_order(seqs, seed=7, group_by_problem=True)
    assert sorted(order) == list(range(len(seqs)))
    problems = [seqs[i].problem for i in order]
    assert all(len(set(problems[j:j + 3])) == 1 for j in range(0, len(problems), 3))
    assert problems != sorted(problems) and epoch_order(seqs, 8, True) != order  # shuffled, by the seed
    loose = epoch_order(seqs, seed=7, group_by_problem=False)
    assert sorted(loose) == list(range(len(seqs))) and loose != order


def test_alignment_position_t_predicts_target_t(tiny, synth, tmp_path):
    """The gathered hidden state at target position t equals the model's own output before token t."""
    from dail.reference import collate, lm_head_params, role_hidden
    from dail.training import build_sequences

    model, tok = tiny
    seqs = build_sequences(_cfg("unused", synth, tmp_path), tok)
    s = seqs[1]
    batch = collate([seqs[0], s], tok.pad_token_id, ("student", "teacher", "negative"))
    T = batch.targets.shape[1]
    for role in ("student", "teacher", "negative"):
        with torch.no_grad():
            h = role_hidden(model, batch.inputs[role], T)[1, : len(s.target)]
            W, _ = lm_head_params(model)
            logits = h @ W.T
            full = model(torch.tensor([s.contexts[role] + s.target])).logits[0]
        n = len(s.contexts[role])
        torch.testing.assert_close(logits, full[n - 1: n - 1 + len(s.target)], rtol=1e-4, atol=1e-4)
    assert s.target[-1] in end_of_turn_ids(tok)


def test_one_batch_of_4_equals_4_microbatches_of_1(tiny, synth, tmp_path):
    from dail.models import attach_lora
    from dail.reference import collate
    from dail.training import batch_loss, build_sequences

    model, tok = tiny
    torch.manual_seed(0)
    peft = attach_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at init would make the student equal the teacher
    cfg = _cfg("unused", synth, tmp_path, gamma=0.3)
    seqs = build_sequences(cfg, tok)[:4]
    assert len({len(s.target) for s in seqs}) > 1  # different lengths, so padding is exercised
    roles = ("student", "teacher", "negative")
    params = [p for p in peft.parameters() if p.requires_grad]

    big = batch_loss(peft, collate(seqs, tok.pad_token_id, roles), cfg)
    loss_big = big.loss / big.count
    grads_big = torch.autograd.grad(loss_big, params)

    micro = [collate([s], tok.pad_token_id, roles) for s in seqs]
    n_tokens = sum(int(b.mask.sum()) for b in micro)
    total, naive = 0.0, 0.0
    grads = [torch.zeros_like(p) for p in params]
    for b in micro:
        t = batch_loss(peft, b, cfg)
        total = total + t.loss.detach() / n_tokens
        naive = naive + float(t.loss.detach()) / int(t.count) / len(micro)  # the per-micro-batch mean: wrong
        for g, d in zip(grads, torch.autograd.grad(t.loss / n_tokens, params)):
            g += d
    torch.testing.assert_close(total, loss_big.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_big):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert abs(naive - float(loss_big)) > 1e-4  # the test can tell the two normalizations apart


def test_nll_and_sft_run(tiny_dir, synth, tmp_path):
    from peft import PeftConfig

    from dail.training import train

    adapter = train(_cfg(tiny_dir, synth, tmp_path / "nll", loss="nll", max_steps=2, report_to="tensorboard"))
    assert PeftConfig.from_pretrained(adapter).r == 4
    assert any((tmp_path / "nll" / "tensorboard").iterdir())
    rows = [json.loads(x) for x in (tmp_path / "nll" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)

    expert = tmp_path / "expert.jsonl"
    expert.write_text("".join(json.dumps({"id": f"e{i}", "problem": p, "solution": s}) + "\n"
                              for i, (p, s, _) in enumerate(PROBLEMS)))
    adapter = train(_cfg(tiny_dir, synth, tmp_path / "sft", loss="sft", expert=DataConfig(source=str(expert)),
                         max_steps=2))
    assert (adapter / "adapter_model.safetensors").exists()


def test_gamma_at_least_one_needs_a_cap(tiny_dir, synth, tmp_path):
    with pytest.raises(ConfigError, match="gamma.*unbounded"):
        _cfg(tiny_dir, synth, tmp_path, gamma=1.0)
    _cfg(tiny_dir, synth, tmp_path, gamma=1.5, neg_cap=2.0)  # allowed with a cap
    with pytest.raises(ConfigError, match="lm_head"):
        _cfg(tiny_dir, synth, tmp_path, target_modules=["q_proj", "lm_head"])


def test_resume_equals_uninterrupted(tiny_dir, synth, tmp_path, monkeypatch):
    import dail.training as training

    full = training.train(_cfg(tiny_dir, synth, tmp_path / "full", epochs=3, save_every=2))

    # The same run, killed during optimizer step 3 (after the checkpoint at step 2) ...
    real, calls = training.batch_loss, {"n": 0}

    def dies_in_step_3(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kw)

    part = tmp_path / "part"
    monkeypatch.setattr(training, "batch_loss", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        training.train(_cfg(tiny_dir, synth, part, epochs=3, save_every=2))
    monkeypatch.setattr(training, "batch_loss", real)
    assert torch.load(part / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    # ... then resumed.
    resumed = training.train(_cfg(tiny_dir, synth, part, epochs=3, save_every=2, resume=True))
    a, b = _adapter_weights(full), _adapter_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    rows = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    full_rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "kl_negative"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in full_rows], rel=1e-5)

    # Resuming with a longer run (max_steps raised) follows the new schedule from step 3 on.
    longer = training.train(_cfg(tiny_dir, synth, tmp_path / "part", epochs=3, max_steps=7, save_every=2,
                                 resume=True))
    assert len((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) == 7
    assert longer.exists()
    # Resuming under another data order is refused, naming the field.
    with pytest.raises(ConfigError, match="different 'group_by_problem'"):
        training.train(_cfg(tiny_dir, synth, part, epochs=3, max_steps=8, resume=True, group_by_problem=False))


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny_dir, synth, tmp_path, monkeypatch):
    import dail.training as training

    real = training.batch_loss
    calls = {"n": 0}

    def poisoned(model, batch, cfg, refs=None):
        calls["n"] += 1
        t = real(model, batch, cfg, refs)
        if calls["n"] > 4:  # micro-batches 5+ = optimizer step 3
            return t._replace(kl_negative=t.kl_negative * float("nan"), loss=t.loss * float("nan"))
        return t

    monkeypatch.setattr(training, "batch_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"step 3: loss is nan .*last good checkpoint is .*checkpoint"):
        training.train(_cfg(tiny_dir, synth, out, epochs=4, save_every=2))
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2
    weights = _adapter_weights(out / "checkpoint" / "adapter")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (out / "adapter").exists()


def test_ref_cache_equals_live(tiny_dir, synth, tmp_path):
    from dail.training import train

    live = train(_cfg(tiny_dir, synth, tmp_path / "live", max_steps=3))
    cached = train(_cfg(tiny_dir, synth, tmp_path / "cached", max_steps=3, ref_cache=True))
    assert (tmp_path / "cached" / "ref_cache" / "meta.json").exists()
    a, b = _adapter_weights(live), _adapter_weights(cached)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_two_processes_match_one(tiny_dir, synth, tmp_path):
    """Same global batch on 2 gloo processes (torchrun) == 1 process: loss curve and adapter."""
    import yaml

    from dail.training import train

    cfg = dict(model={"name": str(tiny_dir), "device": "cpu"}, data=str(synth), lr=0.05, batch_size=4,
               micro_batch_size=1, epochs=2, lora_r=4, lora_alpha=8, warmup_steps=1, report_to="none",
               save_every=0, gamma=0.2)
    one = train(_cfg(tiny_dir, synth, tmp_path / "one", micro_batch_size=1))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**cfg, "out": str(tmp_path / "two")}))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dail.cli", "train", "--config", str(tmp_path / "two.yaml")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "train_info.json").read_text())["processes"] == 2
    curves = [[json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("one", "two")]
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)
    a, b = _adapter_weights(one), _adapter_weights(tmp_path / "two" / "adapter")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_adapter(tiny_dir, synth, tmp_path):
    from dail.training import train

    plain = train(_cfg(tiny_dir, synth, tmp_path / "plain", max_steps=2))
    ckpt = train(_cfg(tiny_dir, synth, tmp_path / "gc", max_steps=2, gradient_checkpointing=True))
    a, b = _adapter_weights(plain), _adapter_weights(ckpt)
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_ref_cache_is_rebuilt_when_the_data_changes_in_place(tiny_dir, tiny_tok, tmp_path):
    """Regenerating the synthetic set at the same path must not reuse the old references."""
    from dail.training import train

    data = write_synthetic(tmp_path / "synthetic.jsonl", tiny_tok)
    train(_cfg(tiny_dir, data, tmp_path / "cached", max_steps=1, ref_cache=True))
    write_synthetic(data, tiny_tok, reverse=True)  # the same ids and problems, other trajectories
    train(_cfg(tiny_dir, data, tmp_path / "cached", max_steps=1, ref_cache=True, overwrite=True))
    train(_cfg(tiny_dir, data, tmp_path / "live", max_steps=1))
    cached, live = _metrics(tmp_path / "cached")[0], _metrics(tmp_path / "live")[0]
    for key in ("loss", "kl_teacher", "kl_negative"):
        assert cached[key] == pytest.approx(live[key], rel=1e-4), key


def test_ref_cache_key_follows_content_and_settings():
    from dail.reference import Sequence, ref_cache_key

    seqs = [Sequence("p0#0", [5, 6, 2], {"student": [1], "teacher": [1, 3], "negative": [1, 4]}, "p0")]
    roles, settings = ("teacher", "negative"), {"model": "m", "dtype": "torch.float32"}
    key = ref_cache_key(seqs, roles, settings)
    assert key == ref_cache_key([Sequence("p0#0", [5, 6, 2], dict(seqs[0].contexts), "p0")], roles, settings)
    changed = [
        [Sequence("p0#0", [5, 7, 2], seqs[0].contexts, "p0")],                                   # trajectory
        [Sequence("p0#0", [5, 6, 2], {**seqs[0].contexts, "negative": [1, 9]}, "p0")],         # a context
        [Sequence("p0#1", [5, 6, 2], seqs[0].contexts, "p0")],                                   # the id
    ]
    for other in changed:
        assert ref_cache_key(other, roles, settings) != key
    assert ref_cache_key(seqs, roles, {**settings, "dtype": "torch.bfloat16"}) != key
    assert ref_cache_key(seqs, ("teacher",), settings) != key
    # The student's context does not shape the references.
    assert ref_cache_key([Sequence("p0#0", [5, 6, 2], {**seqs[0].contexts, "student": [8]}, "p0")], roles,
                         settings) == key


def test_records_sharing_an_id_without_sample_index_are_trained_and_cached_apart(tiny_dir, tiny_tok, tmp_path):
    """Two samples of a problem with no sample_index: two examples, two cache entries."""
    from dail.training import build_sequences, train

    eot = tiny_tok.convert_tokens_to_ids("<|im_end|>")
    data = tmp_path / "synthetic.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i, (_, _, traj) in enumerate(PROBLEMS[:4]):
            problem, solution, _ = PROBLEMS[i // 2]
            ids = tiny_tok(traj, add_special_tokens=False)["input_ids"] + [eot]
            fh.write(json.dumps({"id": f"p{i // 2}", "problem": problem, "solution": solution,
                                 "trajectory_ids": ids}) + "\n")
    seqs = build_sequences(_cfg(tiny_dir, data, tmp_path), tiny_tok)
    assert len({s.id for s in seqs}) == 4 and [s.problem for s in seqs] == ["p0", "p0", "p1", "p1"]
    kw = dict(max_steps=2, batch_size=2, micro_batch_size=1)
    live = train(_cfg(tiny_dir, data, tmp_path / "live", **kw))
    cached = train(_cfg(tiny_dir, data, tmp_path / "cached", ref_cache=True, **kw))
    assert [r["loss"] for r in _metrics(tmp_path / "cached")] == pytest.approx(
        [r["loss"] for r in _metrics(tmp_path / "live")], rel=1e-4)
    a, b = _adapter_weights(live), _adapter_weights(cached)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_landmarks_come_from_the_record_or_its_kind(tiny_dir, tiny_tok, tmp_path, caplog):
    import logging

    from dail.data import DataError
    from dail.landmarks import extract_landmarks
    from dail.prompts import negative_messages, render
    from dail.training import build_sequences

    kinds = [None, "regex:(\\d+)", "math"]  # None: no landmarks_kind field (math is the default)
    data = tmp_path / "synthetic.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i, (problem, solution, traj) in enumerate(PROBLEMS[:4]):
            rec = {"id": f"p{i}", "problem": problem, "solution": solution, "sample_index": 0,
                   "trajectory_ids": tiny_tok(traj, add_special_tokens=False)["input_ids"]}
            if i == 0:
                rec.update(landmarks=["the record's own"], landmarks_kind="code")
            elif kinds[i - 1] is not None:
                rec["landmarks_kind"] = kinds[i - 1]
            fh.write(json.dumps(rec) + "\n")
    with caplog.at_level(logging.INFO, logger="dail.training"):
        seqs = build_sequences(_cfg(tiny_dir, data, tmp_path), tiny_tok)
    want = [["the record's own"]] + [extract_landmarks(PROBLEMS[i][1], kinds[i - 1] or "math") for i in (1, 2, 3)]
    assert want[2] != extract_landmarks(PROBLEMS[2][1], "math")  # the record's kind is the one used
    for s, marks, (problem, _, _) in zip(seqs, want, PROBLEMS):
        assert s.contexts["negative"] == render(tiny_tok, negative_messages(problem, marks))
    lines = [r.getMessage() for r in caplog.records if "landmarks" in r.getMessage()]
    assert len(lines) == 1
    assert "1 of 4 examples use their record's list; 3 are extracted (2 with 'math', 1 with 'regex:(\\d+)')" \
        in lines[0]
    # nll needs no negative context, so no landmarks either.
    assert "negative" not in build_sequences(_cfg(tiny_dir, data, tmp_path, loss="nll"), tiny_tok)[0].contexts
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().replace('"landmarks_kind": "math"', '"landmarks_kind": "chem"'))
    with pytest.raises(DataError, match=r"bad.jsonl: record 4: field 'landmarks_kind'"):
        build_sequences(_cfg(tiny_dir, bad, tmp_path), tiny_tok)


def test_contrastive_forward_trains(tiny_dir, synth, tmp_path):
    from dail.training import train

    out = tmp_path / "fwd"
    train(_cfg(tiny_dir, synth, out, loss="contrastive_forward", neg_cap=5.0, max_steps=2))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["kl_teacher"] > 0 and r["kl_negative"] > 0
        assert r["loss"] == pytest.approx(r["kl_teacher"] - 0.2 * r["kl_negative"], rel=1e-4, abs=1e-5)
    train(_cfg(tiny_dir, synth, tmp_path / "rev", max_steps=1))  # the same first step, reverse direction
    assert rows[0]["kl_teacher"] != pytest.approx(_metrics(tmp_path / "rev")[0]["kl_teacher"], rel=1e-3)


# ----------------------------------------------------------------------------- a hostile user

def test_training_into_a_finished_run_needs_resume_or_overwrite(tiny_dir, synth, tmp_path):
    from dail.config import ConfigError

    out = tmp_path / "run"
    train(_cfg(tiny_dir, synth, out, loss="nll", max_steps=1))
    before = _adapter_weights(out / "adapter")
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds a training run .*pass --resume to continue it or "
                                          r"--overwrite to replace it"):
        train(_cfg(tiny_dir, synth, out, loss="nll", max_steps=1, lr=1e-3))
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing was replaced
    assert all(torch.equal(before[k], v) for k, v in _adapter_weights(out / "adapter").items())
    train(_cfg(tiny_dir, synth, out, loss="nll", max_steps=1, lr=1e-3, overwrite=True))
    assert not all(torch.equal(before[k], v) for k, v in _adapter_weights(out / "adapter").items())


def test_a_second_training_on_one_folder_is_refused(tiny_dir, synth, tmp_path):
    from dail.layout import train_files
    from dail.lock import LockError, output_lock

    out = tmp_path / "run"
    with output_lock(train_files(out)["lock"], "held"):
        with pytest.raises(LockError, match=f"training is being written by pid {os.getpid()}"):
            train(_cfg(tiny_dir, synth, out, loss="nll", max_steps=1))
    assert not (out / "metrics.jsonl").exists()


class _Payload:
    """Unpickling this runs a command (what a crafted checkpoint can do)."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_resume_never_unpickles_objects(tiny_dir, synth, tmp_path, monkeypatch):
    from dail.config import ConfigError

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    train(_cfg(tiny_dir, synth, out, loss="nll", max_steps=1, save_every=1))
    ckpt = out / "checkpoint"
    assert json.loads((ckpt / "rng0.json").read_text())["torch"]  # RNG states are JSON
    state = torch.load(ckpt / "state.pt", weights_only=True)  # loads without pickle
    state["extra"] = _Payload()
    torch.save(state, ckpt / "state.pt")
    with pytest.raises(ConfigError, match="state.pt: holds objects other than tensors and plain data"):
        train(_cfg(tiny_dir, synth, out, loss="nll", max_steps=2, resume=True))
    assert not (tmp_path / "pwned").exists()


def test_precision_bf16_runs_under_autocast_near_fp32_and_refuses_where_unsupported(tiny_dir, synth, tmp_path,
                                                                                    monkeypatch):
    from dail import training
    from dail.config import ConfigError

    from accelerate.state import AcceleratorState

    def first_loss(precision: str, name: str) -> float:
        # accelerate keeps one mixed-precision setting per process; a run changes it only afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
        training.train(_cfg(tiny_dir, synth, tmp_path / name, precision=precision, max_steps=1))
        AcceleratorState._reset_state(reset_partial_state=True)
        return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    # On a CPU, auto is fp32: the same step, bit for bit.
    assert first_loss("auto", "auto") == first_loss("fp32", "fp32")
    if training.native_bf16(cpu=True):
        bf16 = first_loss("bf16", "bf16")
        fp32 = first_loss("fp32", "fp32-again")
        assert bf16 != fp32, (bf16, fp32)  # the step really ran in bf16 ...
        assert bf16 == pytest.approx(fp32, rel=0.05)  # ... and stays near fp32
    monkeypatch.setattr(training, "native_bf16", lambda cpu: False)
    with pytest.raises(ConfigError, match="precision.*no bf16 kernels"):
        training.train(_cfg(tiny_dir, synth, tmp_path / "refused", precision="bf16", max_steps=1))
    assert not (tmp_path / "refused" / "adapter").exists()


def test_direct_mode_trajectories_train_against_the_context_that_wrote_them(tiny_dir, tiny_tok, tmp_path):
    """A direct-mode trajectory was written by the model given the `direct` text (problem + expert
    solution, asked for a self-contained solution). With one context for writing and for the KL
    target (the paper's tau = 1 case), training's teacher context is that same text; a mixed-mode
    record keeps the teacher text. Until this was fixed, every record got the teacher text."""
    from dail.config import SynthConfig
    from dail.prompts import direct_messages, render, teacher_messages
    from dail.synthesis import synthesize
    from dail.training import build_sequences

    experts = tmp_path / "experts.jsonl"
    with open(experts, "w", encoding="utf-8") as fh:
        for i, (problem, solution, _) in enumerate(PROBLEMS[:2]):
            fh.write(json.dumps({"id": f"p{i}", "problem": problem, "solution": solution,
                                 "answer": solution.split()[-1]}) + "\n")
    model = ModelConfig(name=str(tiny_dir), device="cpu")
    for mode, messages in (("direct", direct_messages), ("mixed", teacher_messages)):
        out = synthesize(SynthConfig(model=model, data=DataConfig(source=str(experts)), mode=mode, max_new_tokens=4,
                                     samples_per_problem=1, out=str(tmp_path / mode / "synthetic.jsonl")))
        seqs = build_sequences(_cfg(tiny_dir, out, tmp_path / f"train-{mode}"), tiny_tok)
        assert len(seqs) == 2
        for s, (problem, solution, _) in zip(seqs, PROBLEMS):
            want = render(tiny_tok, messages(problem, solution, solution.split()[-1]))
            assert s.contexts["teacher"] == want, mode
        assert seqs[0].contexts["teacher"] != render(tiny_tok, (teacher_messages if mode == "direct" else
                                                                direct_messages)(PROBLEMS[0][0], PROBLEMS[0][1], "7"))
