"""`dail run`: every stage from one config, into one run folder (layout: `dail.layout`).

    <out>/config.yaml              the RunConfig (loads back with --config)
    <out>/synth/synthetic.jsonl    stage 1 output (+ stats.json, student_fraction.png)
    <out>/train/adapter/           stage 2 output, PEFT format (+ metrics.jsonl)
    <out>/eval/base-test/          evaluation of the base model on held-out problems
    <out>/eval/trained-test/       ... and of base + adapter
    <out>/eval/{base,trained}-train/   with eval_train: the same on the training problems
    <out>/report.md                tables and plots comparing base and trained

Every method reads the same problems: synthesis and `sft` both get `train_data` itself (one
DataConfig), and `test_data` must split the same source by the same rule (RunConfig checks).
With no arguments it runs the embedded default (RunConfig's defaults). Each stage resumes
what an interrupted run already wrote.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from dail import dist
from dail.config import DataConfig, EvalConfig, RunConfig
from dail.evaluation import evaluate
from dail.data import DataError
from dail.layout import RunFolder, synth_files
from dail.records import read_records
from dail.report import write_report
from dail.sampler import open_sampler, release
from dail.stages import command_folder, stage_config
from dail.synthesis import synthesize
from dail.training import train_or_reuse

log = logging.getLogger(__name__)


def resolve(cfg: RunConfig) -> RunConfig:
    """Point every stage at the run folder, the shared model and the run's data."""
    run = RunFolder(Path(cfg.out))
    return dataclasses.replace(
        cfg,
        synth=stage_config(cfg, "synth", data=cfg.train_data, out=str(run.synth)),
        train=stage_config(cfg, "train", expert=cfg.train_data, data=str(run.synth), out=str(run.train)),
        eval=stage_config(cfg, "eval", data=cfg.test_data, adapter="", out=str(run.root / "eval")),
    )


def run(cfg: RunConfig) -> Path:
    folder = RunFolder(Path(cfg.out))
    with command_folder(cfg, "run") as tokenizer:
        _run(resolve(cfg), folder, tokenizer)
    return folder.root


def _run(cfg: RunConfig, folder: RunFolder, tokenizer: Any) -> None:
    sampler = open_sampler(cfg.model, tokenizer=tokenizer)  # the base model: synthesis and base evaluation
    if cfg.train.loss != "sft":
        log.info("stage 1/3: synthesis -> %s", cfg.synth.out)
        if not read_records(synthesize(cfg.synth, sampler, tokenizer)):
            rejected = synth_files(cfg.synth.out)["rejected"]
            raise DataError(f"{cfg.synth.out}: synthesis kept no trajectory for training (keep: {cfg.synth.keep}; "
                            f"{len(read_records(rejected))} wrong ones are in {rejected.name}). Raise "
                            "--synth.samples_per_problem or --train_data.limit, or pass --synth.keep all")

    evals = [("test", cfg.test_data)] + ([("train", cfg.train_data)] if cfg.eval_train else [])
    for split, data in evals:
        log.info("evaluating the base model on %s problems", split)
        evaluate(_eval_cfg(cfg, data, folder.eval(f"base-{split}"), adapter=""), sampler, tokenizer, label="base")

    release(sampler)  # before training (a vLLM engine holds its KV cache and binds its threads to the cores);
    del sampler       # evaluation of the trained model opens base + adapter fresh
    log.info("stage 2/3: training (%s) -> %s", cfg.train.loss, cfg.train.out)
    adapter = train_or_reuse(cfg.train)
    for split, data in evals:
        log.info("evaluating the trained model on %s problems", split)
        evaluate(_eval_cfg(cfg, data, folder.eval(f"trained-{split}"), adapter=str(adapter)), label="trained")

    if dist.world()[0] == 0:
        log.info("report: %s", write_report([folder.root], folder.root))


def _eval_cfg(cfg: RunConfig, data: DataConfig, out: Path, adapter: str) -> EvalConfig:
    return stage_config(cfg, "eval", data=data, adapter=adapter, out=str(out))
