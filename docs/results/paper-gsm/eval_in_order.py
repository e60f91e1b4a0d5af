"""Evaluate chosen (method, split) pairs of the paper-gsm run in a chosen order.

`dail compare` evaluates the base model on every split first and then each method on every
split. A session here cannot finish all of that, and only base needs no training, so the run
took the trained methods first. This script evaluates exactly what compare would (its own
`_eval_cfg`, engine and folders), so a later `dail compare` with the same flags finds these
evaluations done and resumes past them. Methods must already be trained.

    python docs/results/paper-gsm/eval_in_order.py nll:far nll:train dail:far -- \
        --model.engine vllm --eval.batch_size 256
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from dail import compare as C
import logging
from dail.config import CompareConfig, build
from dail.layout import RunFolder, finished_adapter
from dail.sampler import open_sampler, release, with_dtype
from dail.stages import command_folder

CONFIG = "configs/paper-gsm.yaml"


def main(argv: list[str]) -> None:
    pairs, flags = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    overrides = dict(zip((f.removeprefix("--") for f in flags[::2]), flags[1::2]))
    order = [tuple(p.split(":")) for p in pairs]
    cfg = build(CompareConfig, CONFIG, {**overrides, "methods": ",".join(dict.fromkeys(m for m, _ in order))})
    out = Path(cfg.out)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    with command_folder(cfg, "compare") as tok:
        opened = None  # (method, adapter, sampler): one engine alive at a time, kept across a method's splits
        for method, split in order:
            folder = out / method
            adapter = "" if method == "base" else finished_adapter(RunFolder(folder).train)
            if adapter is None:
                raise SystemExit(f"{folder}/train: no finished adapter; train {method} first (dail compare)")
            if opened is None or opened[0] != method:
                if opened is not None:
                    release(opened[2])
                opened = None  # drop the old engine before the next one loads
                opened = (method, str(adapter), open_sampler(with_dtype(cfg.model, cfg.eval.dtype), str(adapter), tokenizer=tok))
            with C._timed(timings, f"eval {method} {split}", timings_path):
                C.evaluate(C._eval_cfg(cfg, split, folder, opened[1]), opened[2], tok, label=method)
        if opened is not None:
            release(opened[2])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    main(sys.argv[1:])
