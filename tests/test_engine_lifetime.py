"""Every stage releases the engines it opens: one alive at a time, none while a model trains.

A vLLM engine holds its KV cache (GiBs) and binds its threads to the cores while it lives, so a
`dail run` or `dail compare` that only dropped its reference would train beside a live engine's cache
and threads. These tests swap the HF engine for one that counts the engines alive.
"""

from __future__ import annotations

import pytest

import dail.compare as C
import dail.pipeline as P
import dail.sampler as SM
from dail.cli import main

from test_pipeline import _experts


class _Tracked(SM.HFSampler):
    alive: list = []
    opened = 0

    def close(self) -> None:
        _Tracked.alive.remove(self)


@pytest.fixture()
def tracked(monkeypatch):
    _Tracked.alive, _Tracked.opened = [], 0
    open_hf = SM._ENGINES["hf"]

    def opening(*args):
        assert not _Tracked.alive, "an engine was opened while another was alive"
        s = open_hf(*args)
        t = _Tracked(s.model, s.tokenizer, s.label)
        _Tracked.alive.append(t)
        _Tracked.opened += 1
        return t

    def train_with_no_engine(train):
        def wrapped(*a, **k):
            assert not _Tracked.alive, "a model trained while an engine was alive"
            return train(*a, **k)
        return wrapped

    monkeypatch.setitem(SM._ENGINES, "hf", opening)
    monkeypatch.setattr(C, "train_or_reuse", train_with_no_engine(C.train_or_reuse))
    monkeypatch.setattr(P, "train_or_reuse", train_with_no_engine(P.train_or_reuse))
    return _Tracked


def test_dail_run_releases_its_engines(tiny_dir, tmp_path, tracked):
    rc = main(["run", "--out", str(tmp_path / "run"), "--model.name", str(tiny_dir), "--model.device", "cpu",
               "--train_data.source", _experts(tmp_path / "train.jsonl", 0, 2),
               "--test_data.source", _experts(tmp_path / "test.jsonl", 10, 2),
               "--synth.max_new_tokens", "6", "--synth.samples_per_problem", "1",
               "--train.epochs", "1", "--train.batch_size", "2", "--train.micro_batch_size", "1",
               "--train.report_to", "none",
               "--eval.n", "1", "--eval.ks", "[1]", "--eval.max_new_tokens", "6", "--eval.budgets", "[6]"])
    assert rc == 0
    assert tracked.opened == 2 and not tracked.alive  # the base model, then base + adapter


def test_dail_compare_releases_its_engines(tiny_dir, tmp_path, tracked):
    # eval.dtype set: the base model is opened twice (evaluation, then synthesis in model.dtype)
    assert main(["compare", "--out", str(tmp_path / "cmp"), "--model.name", str(tiny_dir), "--model.device", "cpu",
                 "--data.limit", "2", "--test_limit", "2", "--methods", "base,nll", "--splits", "far",
                 "--synth.max_new_tokens", "6", "--synth.samples_per_problem", "1",
                 "--train.epochs", "1", "--train.batch_size", "2", "--train.micro_batch_size", "1",
                 "--train.report_to", "none", "--train.max_length", "4096", "--eval.dtype", "float32",
                 "--eval.n", "1", "--eval.ks", "1", "--eval.max_new_tokens", "6", "--eval.budgets", "6"]) == 0
    assert tracked.opened == 3 and not tracked.alive
