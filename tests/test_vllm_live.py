"""The vLLM engine itself, on the embedded model, against the HF engine.

Skipped where vLLM is not installed (`make setup-vllm` installs it); CI sets
DAIL_REQUIRE_VLLM=1, which turns the skip into a failure, so these run there. One engine is
alive at a time (each holds its own KV cache): `engines` closes the previous one.

Tolerances. fp32: vLLM's kernels and HF's agree to ~1e-5 in log-probability (3.6e-5 at worst,
measured), so the test asks for 2e-3. bf16 rounds every weight and activation to 8 bits of
mantissa, on either engine: against HF in fp32, vLLM in bf16 must be no further off than HF in
bf16 is (mean and worst token, with 50% slack; measured: vLLM 0.053 mean, 0.50 worst). The
figures are printed by `pytest -s`.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import replace

import pytest
import torch

if os.environ.get("DAIL_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM not installed (make setup-vllm)")

from dail.config import ModelConfig, build, EvalConfig, SynthConfig  # noqa: E402
from dail.models import load_model, load_tokenizer  # noqa: E402
from dail.sampler import HFSampler, Sampling, open_sampler  # noqa: E402

pytestmark = pytest.mark.slow

EMB = ModelConfig(name="embedded", device="cpu")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(EMB)


@pytest.fixture(scope="module")
def engines(tok):
    """engines(dtype, adapter='') -> a VLLMSampler; the previous one is closed first."""
    live = {}

    def get(dtype: str, adapter: str = ""):
        key = (dtype, adapter)
        if key not in live:
            for s in live.values():
                s.close()
            live.clear()
            live[key] = open_sampler(replace(EMB, engine="vllm", dtype=dtype), adapter, tokenizer=tok)
        return live[key]

    yield get
    for s in live.values():
        s.close()


@pytest.fixture(scope="module")
def hf(tok):
    return HFSampler(load_model(replace(EMB, dtype="float32")), tok)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A PEFT adapter with random, non-zero B matrices: it moves the model visibly."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(replace(EMB, dtype="float32")),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return str(folder)


def _chat(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


QUESTIONS = ["What is 17 + 25? Think step by step.", "A train travels 60 km in 1.5 hours. What is its speed?",
             "Tom has 3 apples and buys 4 more. How many apples does he have?", "Name three prime numbers."]


def _sequences(tok):
    return [_chat(tok, q) + tok.encode(" The answer is 42, because 6 times 7 is 42.") for q in QUESTIONS]


def _hf_logprobs(model, seqs):
    out = []
    with torch.no_grad():
        for s in seqs:
            lp = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].float(), -1)
            out.append([lp[t - 1, s[t]].item() for t in range(1, len(s))])
    return out


def _diffs(a, b):
    d = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    assert len(d) == sum(len(r) for r in a) and d
    return sum(d) / len(d), max(d)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_vllm_logprobs_of_fixed_sequences_equal_hf(tok, engines, hf, adapter, with_adapter):
    from peft import PeftModel

    seqs = _sequences(tok)
    model = hf.model
    if with_adapter:
        model = PeftModel.from_pretrained(load_model(replace(EMB, dtype="float32")), adapter)
    want = _hf_logprobs(model, seqs)
    if with_adapter:  # the adapter moves the model, so the comparison below is not of two base models
        assert _diffs(want, _hf_logprobs(hf.model, seqs))[0] > 0.05
    mean32, worst32 = _diffs(engines("float32", adapter if with_adapter else "").score(seqs), want)
    mean16, worst16 = _diffs(engines("bfloat16", adapter if with_adapter else "").score(seqs), want)
    ref16, refworst16 = _diffs(_hf_logprobs(copy.deepcopy(model).to(torch.bfloat16), seqs), want)
    print(f"adapter={with_adapter}: vLLM fp32 mean {mean32:.2e} max {worst32:.2e}; vLLM bf16 mean {mean16:.3f} "
          f"max {worst16:.3f}; HF bf16 mean {ref16:.3f} max {refworst16:.3f} (all against HF fp32)")
    assert worst32 < 2e-3
    assert mean16 < 1.5 * ref16 and worst16 < 1.5 * refworst16


def test_tau_0_is_student_sampling_and_tau_1_is_teacher_sampling(tok, engines, hf):
    from dail.decoding import sampling_probs

    v = engines("float32")
    prompts = [_chat(tok, q) for q in QUESTIONS]
    teacher = [_chat(tok, "The answer is 42. " + q) for q in QUESTIONS]
    seeds = [5, 6, 7, 8]
    s = Sampling(temperature=0.6, top_p=0.95, presence_penalty=1.5, max_new_tokens=48)
    plain = v.sample(prompts, seeds, s)
    student = v.mixed(prompts, teacher, seeds, s, 0.0)
    for a, b in zip(student, plain):  # tau 0 accepts every proposal: the student's own sample
        assert a.tokens == b.tokens and set(a.teacher_mask) == {0}
        assert a.q == pytest.approx(a.p_student)
    for d, t in zip(v.mixed(prompts, teacher, seeds, s, 1.0), teacher):
        # tau 1 vetoes every proposal (p_T < 1): the teacher writes every token, and q is its
        # sampling probability, recomputed here by HF over the teacher's context
        assert set(d.teacher_mask) == {1}
        with torch.no_grad():
            logits = hf.model(input_ids=torch.tensor([t + d.tokens])).logits[0, len(t) - 1:-1]
        counts = torch.zeros(len(d.tokens), logits.shape[-1])
        for i in range(1, len(d.tokens)):
            counts[i] = counts[i - 1]
            counts[i, d.tokens[i - 1]] += 1
        p = sampling_probs(logits, s.temperature, s.top_p, counts=counts, presence_penalty=s.presence_penalty)
        want = p[torch.arange(len(d.tokens)), torch.tensor(d.tokens)]
        assert d.q == pytest.approx(want.tolist(), abs=1e-3)


def _share(k, n):
    p = k / n
    return p, 1.96 * math.sqrt(max(p * (1 - p), 1e-9) / n)


def _synth_stats(path):
    recs = [json.loads(line) for line in open(path, encoding="utf-8")]
    teacher = sum(sum(r["teacher_mask"]) for r in recs)
    tokens = sum(len(r["teacher_mask"]) for r in recs)
    correct = sum(bool(r["correct"]) for r in recs)
    return recs, teacher, tokens, correct


def test_mixed_synthesis_on_64_trajectories_agrees_with_hf(tok, engines, hf, tmp_path):
    # the same 64 (problem, sample) seeds through `dail synth` on both engines: HF in fp32 (the
    # reference), vLLM in bf16 (so the two sample different token sequences, and the comparison
    # is one of distributions: teacher-token share and correct share within each other's 95% CIs)
    from dail.synthesis import synthesize

    def cfg(out, engine, dtype):
        return build(SynthConfig, None, {"out": str(out), "model.engine": engine, "model.dtype": dtype,
                                         "model.device": "cpu", "data.source": "gsm-symbolic",
                                         "data.split": "train", "data.limit": 16, "mode": "mixed",
                                         "tau": 0.6, "samples_per_problem": 4, "max_new_tokens": 96,
                                         "batch_size": 64, "keep": "all"})
    h_path = synthesize(cfg(tmp_path / "hf.jsonl", "hf", "float32"), hf, tok)
    v_path = synthesize(cfg(tmp_path / "vllm.jsonl", "vllm", "bfloat16"), engines("bfloat16"), tok)
    (hr, ht, hn, hc), (vr, vt, vn, vc) = _synth_stats(h_path), _synth_stats(v_path)
    assert len(hr) == len(vr) == 64
    assert {r["engine"] for r in hr} == {"hf"} and {r["engine"] for r in vr} == {"vllm"}
    for r in vr:  # the same record fields, every per-token list aligned
        assert set(r) == set(hr[0])
        assert len(r["trajectory_ids"]) == len(r["teacher_mask"]) == len(r["p_student"]) == len(r["q"])
    (pt_h, e_h), (pt_v, e_v) = _share(ht, hn), _share(vt, vn)
    (pc_h, c_h), (pc_v, c_v) = _share(hc, 64), _share(vc, 64)
    print(f"teacher share hf {pt_h:.3f}±{e_h:.3f} vllm {pt_v:.3f}±{e_v:.3f}; "
          f"correct hf {hc}/64 vllm {vc}/64")
    assert abs(pt_h - pt_v) <= max(e_h, e_v) * 2 + 0.02
    assert abs(pc_h - pc_v) <= math.hypot(c_h, c_v) + 1 / 64
    assert 0 < ht < hn and 0 < vt < vn


def test_dail_eval_on_vllm_writes_what_the_hf_engine_writes(tok, engines, hf, tmp_path):
    from dail.evaluation import evaluate

    def cfg(out, engine):
        return build(EvalConfig, None, {"out": str(out), "model.engine": engine, "model.dtype": "float32",
                                        "model.device": "cpu", "data.source": "gsm-symbolic", "data.split": "test",
                                        "data.limit": 3, "n": 4, "ks": [1, 4], "max_new_tokens": 96,
                                        "budgets": [48, 96], "temperature": 0.6, "top_p": 0.95,
                                        "presence_penalty": 1.5, "entropy": True, "batch_size": 12})
    h = evaluate(cfg(tmp_path / "hf", "hf"), hf, tok)
    v = evaluate(cfg(tmp_path / "vllm", "vllm"), engines("float32"), tok)
    assert set(h) == set(v) and h["pass_at_k"].keys() == v["pass_at_k"].keys()
    hs = [json.loads(line) for line in open(tmp_path / "hf" / "samples.jsonl")]
    vs = [json.loads(line) for line in open(tmp_path / "vllm" / "samples.jsonl")]
    assert [set(r) for r in hs] == [set(r) for r in vs]
    assert {r["engine"] for r in hs} == {"hf"} and {r["engine"] for r in vs} == {"vllm"}
    # fp32 on both engines, the same seeds: the same samples but for kernel rounding near ties
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(hs, vs))
    print(f"identical samples: {same} of {len(hs)}")
    assert same >= len(hs) * 3 // 4


def test_the_readme_recipe_for_another_engine_works_as_written(tmp_path):
    # the README's vLLM script, run as it stands (DIR replaced), then graded by `dail eval --samples`
    import re
    import subprocess
    import sys
    from pathlib import Path

    from dail.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"A script that samples them with vLLM.*?```python\n(.*?)```", readme, re.S).group(1)
    folder = tmp_path / "ex"
    common = ["--data.source", "gsm-symbolic", "--data.split", "test", "--data.limit", "2", "--out", str(folder),
              "--n", "2", "--ks", "1,2", "--max_new_tokens", "48", "--budgets", "48"]
    assert main(["eval", "--export-prompts", *common]) == 0
    script = tmp_path / "sample.py"
    script.write_text(block.replace("DIR/", f"{folder}/"), encoding="utf-8")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["eval", "--samples", str(tmp_path / "samples.jsonl"), *common]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n"] == 2 and set(summary["per_problem_correct"]) == {json.loads(x)["id"] for x in
                                                                         open(folder / "prompts.jsonl")}
