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

import copy
import logging
from pathlib import Path

from dail import dist
from dail.config import DataConfig, EvalConfig, RunConfig, save
from dail.evaluation import evaluate
from dail.data import DataError
from dail.layout import RunFolder, synth_files
from dail.records import read_records
from dail.models import load_model, load_tokenizer
from dail.report import write_report
from dail.synthesis import synthesize
from dail.training import train_or_reuse

log = logging.getLogger(__name__)


def resolve(cfg: RunConfig) -> RunConfig:
    """Point every stage at the run folder, the shared model and the run's data."""
    cfg = copy.deepcopy(cfg)
    run = RunFolder(Path(cfg.out))
    cfg.synth.model = cfg.train.model = cfg.eval.model = cfg.model
    cfg.synth.prompts = cfg.train.prompts = cfg.eval.prompts = cfg.prompts
    cfg.synth.data = cfg.train.expert = cfg.train_data
    cfg.synth.out = cfg.train.data = str(run.synth)
    cfg.train.out = str(run.train)
    cfg.eval.data, cfg.eval.adapter, cfg.eval.out = cfg.test_data, "", str(run.root / "eval")
    return cfg


def run(cfg: RunConfig) -> Path:
    rank, _ = dist.world()
    folder = RunFolder(Path(cfg.out))
    folder.root.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save(cfg, folder.config)
    cfg = resolve(cfg)

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    if cfg.train.loss != "sft":
        log.info("stage 1/3: synthesis -> %s", cfg.synth.out)
        if not read_records(synthesize(cfg.synth, model, tokenizer)):
            rejected = synth_files(cfg.synth.out)["rejected"]
            raise DataError(f"{cfg.synth.out}: synthesis kept no trajectory for training (keep: {cfg.synth.keep}; "
                            f"{len(read_records(rejected))} wrong ones are in {rejected.name}). Raise "
                            "--synth.samples_per_problem or --train_data.limit, or pass --synth.keep all")

    evals = [("test", cfg.test_data)] + ([("train", cfg.train_data)] if cfg.eval_train else [])
    for split, data in evals:
        log.info("evaluating the base model on %s problems", split)
        evaluate(_eval_cfg(cfg, data, folder.eval(f"base-{split}"), adapter=""), model, tokenizer, label="base")

    log.info("stage 2/3: training (%s) -> %s", cfg.train.loss, cfg.train.out)
    adapter = train_or_reuse(cfg.train)

    del model  # evaluation of the trained model loads base + adapter fresh
    for split, data in evals:
        log.info("evaluating the trained model on %s problems", split)
        evaluate(_eval_cfg(cfg, data, folder.eval(f"trained-{split}"), adapter=str(adapter)), label="trained")

    if rank == 0:
        log.info("report: %s", write_report([folder.root], folder.root))
    return folder.root


def _eval_cfg(cfg: RunConfig, data: DataConfig, out: Path, adapter: str) -> EvalConfig:
    e = copy.deepcopy(cfg.eval)
    e.data, e.adapter, e.out = data, adapter, str(out)
    return e
