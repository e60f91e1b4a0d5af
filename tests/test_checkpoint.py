"""The method-independent pieces of a training loop: lr schedule and the step logger.
(Checkpoint save / resume is tested end to end in test_training.py.)"""

from __future__ import annotations

import json
import math

import pytest

from dail.checkpoint import Logger, find_checkpoint, lr_lambda


def test_lr_schedule_warms_up_then_decays():
    f = lr_lambda(warmup_steps=2, scheduler="cosine", total_steps=10)
    assert [f(0), f(1)] == pytest.approx([1 / 3, 2 / 3])
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10) == pytest.approx(0.0) and f(50) == pytest.approx(0.0)
    const = lr_lambda(warmup_steps=0, scheduler="constant", total_steps=10)
    assert [const(0), const(9)] == [1.0, 1.0]
    lin = lr_lambda(warmup_steps=2, scheduler="linear", total_steps=10)
    assert [lin(2), lin(6), lin(10), lin(11)] == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_logger_needs_no_training_config_and_keeps_lines_up_to_the_resume_step(tmp_path):
    log = Logger(tmp_path, resume_step=0, enabled=True, report_to="none", config={"anything": 1})
    for step in (1, 2, 3):
        log.log({"step": step, "reward": float(step)})
    log.close()
    # Resumed from a checkpoint at step 2: step 3 is logged again by the resumed run.
    log = Logger(tmp_path, resume_step=2, enabled=True)
    log.log({"step": 3, "reward": 30.0})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "reward": 1.0}, {"step": 2, "reward": 2.0}, {"step": 3, "reward": 30.0}]
    Logger(tmp_path / "other", 0, enabled=False).log({"step": 1})  # other processes write nothing
    assert not (tmp_path / "other").exists()
    assert find_checkpoint(tmp_path) is None
