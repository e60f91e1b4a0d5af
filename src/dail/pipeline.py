"""`dail run`: every stage from one config, into one run folder.

    <out>/config.yaml              the resolved RunConfig
    <out>/synth/synthetic.jsonl    stage 1 output (+ stats.json, student_fraction.png)
    <out>/train/adapter/           stage 2 output, PEFT format (+ metrics.jsonl)
    <out>/eval/base-test/          evaluation of the base model on held-out problems
    <out>/eval/trained-test/       ... and of base + adapter
    <out>/eval/{base,trained}-train/   with eval_train: the same on the training problems
    <out>/report.md                tables and plots comparing base and trained

With no arguments it runs the embedded default (RunConfig's defaults). Each stage resumes
what an interrupted run already wrote.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from dail.config import RunConfig, save

log = logging.getLogger(__name__)


def resolve(cfg: RunConfig) -> RunConfig:
    """Point every stage at the run folder, the shared model and the run's data sources."""
    cfg = copy.deepcopy(cfg)
    out = Path(cfg.out)
    cfg.synth.model = cfg.train.model = cfg.eval.model = cfg.model
    cfg.synth.data = cfg.train_data
    cfg.synth.out = str(out / "synth" / "synthetic.jsonl")
    if cfg.train.loss == "sft":
        cfg.train.data = cfg.train_data.source
    else:
        cfg.train.data = cfg.synth.out
    cfg.train.out = str(out / "train")
    cfg.eval.data = cfg.test_data
    cfg.eval.adapter = ""
    cfg.eval.out = str(out / "eval")
    return cfg


def run(cfg: RunConfig) -> Path:
    from dail import dist
    from dail.evaluation import evaluate
    from dail.models import load_model, load_tokenizer
    from dail.report import write_report
    from dail.synthesis import synthesize
    from dail.training import train

    cfg = resolve(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, _ = dist.world()
    if rank == 0:
        save(cfg, out / "config.yaml")

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    if cfg.train.loss != "sft":
        log.info("stage 1/3: synthesis -> %s", cfg.synth.out)
        synthesize(cfg.synth, model, tokenizer)

    evals = [("test", cfg.test_data)] + ([("train", cfg.train_data)] if cfg.eval_train else [])
    for split, data in evals:
        log.info("evaluating the base model on %s problems", split)
        evaluate(_eval_cfg(cfg, data, f"base-{split}", adapter=""), model, tokenizer, label="base")

    adapter = Path(cfg.train.out) / "adapter"
    if (Path(cfg.train.out) / "train_info.json").exists() and (adapter / "adapter_config.json").exists():
        log.info("stage 2/3: %s already holds a finished adapter; not retraining", cfg.train.out)
    else:
        log.info("stage 2/3: training (%s) -> %s", cfg.train.loss, cfg.train.out)
        adapter = train(cfg.train)

    del model  # evaluation of the trained model loads base + adapter fresh
    for split, data in evals:
        log.info("evaluating the trained model on %s problems", split)
        evaluate(_eval_cfg(cfg, data, f"trained-{split}", adapter=str(adapter)), label="trained")

    if rank == 0:
        report = write_report([out], out)
        log.info("report: %s", report)
    return out


def _eval_cfg(cfg: RunConfig, data, name: str, adapter: str):
    e = copy.deepcopy(cfg.eval)
    e.data = data
    e.adapter = adapter
    e.out = str(Path(cfg.out) / "eval" / name)
    return e
