"""`dail compare`: the paper's comparison, every method on the same problems, in one folder.

    <out>/config.yaml                        the CompareConfig (loads back with --config)
    <out>/data/{mixed,direct,star}/          shared synthetic sets (nll and dail share `mixed`)
    <out>/base/eval/<split>/                 the base model, evaluated once per split
    <out>/<method>/train/                    an ordinary training folder (adapter/, metrics.jsonl, ...)
    <out>/<method>/eval/<split>/             and its evaluations, so `dail eval` / `dail report` work on it alone
    <out>/<method>-s<seed>/                  the same for the other training seeds (seed_methods)
    <out>/comparison.json                    every figure of the report, machine-readable
    <out>/timings.json                       wall seconds of every stage (summed over resumed attempts)
    <out>/report.md, <out>/*.png             the table and the plots

Splits (all from the same source and split rule as `data`): `train` the training problems
themselves, `near` new instances of the training templates, `far` held-out templates, `val`
the validation side (hyperparameters are chosen there, never on test; `chosen` records how).

Every stage resumes: synthesis and evaluation skip what is written, a finished adapter is
not retrained, and an interrupted training continues from its checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from matplotlib.figure import Figure

from dail import dist
from dail.config import CompareConfig, ConfigError, DataConfig, EvalConfig, GRPOConfig, SelectConfig, SynthConfig, TrainConfig
from dail.data import load_problems
from dail.evaluation import evaluate, finished
from dail.layout import RunFolder, eval_files, finished_adapter, shared_synth, synth_files, train_files
from dail.records import read_records
from dail.sampler import open_sampler, release, with_dtype
from dail.select import select
from dail.stages import command_folder, command_lock, stage_config
from dail.stats import BOOTSTRAP_RESAMPLES, paired_difference, per_problem_pass, resample_indices, transitions
from dail.synthesis import synthesize
from dail.training import train_or_reuse

__all__ = ["METHODS", "compare", "split_data", "method_runs", "comparison", "write_compare_report"]

log = logging.getLogger(__name__)

# How each method is made: the synthetic set it trains on (None = the expert solutions or no
# training) and the training loss. One table, read by `compare` and the report.
METHODS: dict[str, dict[str, Any]] = {
    "base": {"synth": None, "loss": None, "label": "base"},
    "sft": {"synth": None, "loss": "sft", "label": "SFT (expert solutions)"},
    "nll": {"synth": "mixed", "loss": "nll", "label": "NLL (mixed trajectories)"},
    "dail": {"synth": "mixed", "loss": "contrastive", "label": "DAIL (mixed)"},
    "dail_direct": {"synth": "direct", "loss": "contrastive", "label": "DAIL (direct)"},
    "dail_forward": {"synth": "mixed", "loss": "contrastive_forward", "label": "DAIL (mixed, forward KL)"},
    "star": {"synth": "star", "loss": "nll", "label": "STaR (rationalization)"},
    "grpo": {"synth": None, "loss": "grpo", "label": "GRPO"},
    "nurl": {"synth": None, "loss": "grpo", "label": "NuRL (GRPO + self hints)"},
}


def split_data(cfg: CompareConfig, split: str) -> DataConfig:
    """The DataConfig of one evaluation split, cut from `cfg.data` by the same rule."""
    if split == "train":
        d = training_data(cfg)
        return dataclasses.replace(d, limit=cfg.train_eval_limit) if cfg.train_eval_limit else d
    d = copy.deepcopy(cfg.data)
    if split == "near":
        d.instance_seed = cfg.near_instance_seed
        d.instances, d.limit = cfg.near_instances or d.instances, cfg.near_limit or d.limit
    elif split == "far":
        d.split, d.limit, d.instances = "test", cfg.test_limit, 1
    elif split == "val":
        d.split, d.limit, d.instances = "val", cfg.val_limit, 1
    return d


def check_near(cfg: CompareConfig) -> None:
    """Near transfer is new instances of the training templates: refuse a near split that reaches
    other templates (a near_limit past what data covers), and warn about instances that repeat a
    training problem word for word (a template with few valid draws)."""
    if "near" not in cfg.splits or cfg.data.source != "gsm-symbolic":
        return
    train, near = load_problems(cfg.data), load_problems(split_data(cfg, "near"))
    templates = {ex.meta["template"] for ex in train}
    stray = sorted({ex.meta["template"] for ex in near} - templates)
    if stray:
        raise ConfigError(f"config field 'near_limit': the near split reaches {len(stray)} templates that are not among "
                          f"the training problems' (e.g. {stray[0]}); lower near_limit or raise data.limit")
    texts = {ex.problem for ex in train}
    repeated = sum(ex.problem in texts for ex in near)
    if repeated:
        log.warning("near split: %d of %d problems repeat a training problem word for word", repeated, len(near))


def training_data(cfg: CompareConfig) -> DataConfig:
    """The problems every method trains on: `cfg.data`, or with select_n the ones the base model failed."""
    return DataConfig(source=str(_selected(cfg))) if cfg.select_n else cfg.data


def _selected(cfg: CompareConfig) -> Path:
    return Path(cfg.out) / "select" / "experts.jsonl"


def _select(cfg: CompareConfig, sampler: Any, tok: Any) -> None:
    """The paper's pick: evaluate the base model select_n times per problem of `cfg.data` and keep
    the problems it solved at most select_max_correct times (`dail select`)."""
    out = _selected(cfg)
    folder = out.parent / "eval"
    e = stage_config(cfg, "eval", data=cfg.data, adapter="", out=str(folder))
    e = dataclasses.replace(e, n=cfg.select_n, ks=[1], seed=cfg.eval.seed + 1)  # a draw apart from the evaluations
    evaluate(e, sampler, tok, label="base (selection)")
    if dist.world()[0] == 0:
        select(SelectConfig(eval_dir=str(folder), out=str(out), max_correct=cfg.select_max_correct))
    dist.barrier()


def method_runs(cfg: CompareConfig) -> list[tuple[str, str, int]]:
    """(run name, method, training seed) for every run folder, in config order. The first seed's
    run is named after the method alone, so adding seeds later reuses it."""
    runs = []
    for m in cfg.methods:
        seeds = cfg.seeds if (m in cfg.seed_methods and m != "base") else cfg.seeds[:1]
        runs += [(m if s == cfg.seeds[0] else f"{m}-s{s}", m, s) for s in seeds]
    return runs


@contextmanager
def _timed(timings: dict, key: str, path: Path) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - t0, 1)
    path.write_text(json.dumps(timings, indent=2), encoding="utf-8")


def _synth_cfg(cfg: CompareConfig, mode: str) -> SynthConfig:
    # answer_only is a variant of the mixed-mode teacher; the direct and star sets have none. STaR
    # samples its attempts all at once (its rationalizations need every attempt's grade).
    base = cfg.synth if mode == "mixed" else dataclasses.replace(
        cfg.synth, teacher_context="solution", round_size=cfg.synth.round_size if mode == "direct" else 0)
    if mode == "star" and cfg.star_samples:
        base = dataclasses.replace(base, samples_per_problem=cfg.star_samples)
    return stage_config(cfg, "synth", base, data=training_data(cfg), mode=mode, out=str(shared_synth(cfg.out, mode)))


# The forward KL with gamma > 0 is unbounded below without a cap on the per-token negative KL
# (config.TrainConfig). Where train.neg_cap is unset, dail_forward caps it at 1 nat: above the
# 0.1-0.3 nats the negative KL reaches in DAIL's reverse-KL runs (docs/results/compare-gsm/), so
# it binds only where the objective would run away.
FORWARD_NEG_CAP = 1.0


def _train_cfg(cfg: CompareConfig, method: str, seed: int, folder: Path) -> TrainConfig:
    synth = METHODS[method]["synth"]
    base = cfg.train
    if METHODS[method]["loss"] == "contrastive_forward" and base.gamma > 0 and base.neg_cap <= 0:
        base = dataclasses.replace(base, loss="contrastive_forward", neg_cap=FORWARD_NEG_CAP)
    return stage_config(cfg, "train", base, expert=training_data(cfg), loss=METHODS[method]["loss"], seed=seed,
                        data=str(shared_synth(cfg.out, synth)) if synth else cfg.train.data,
                        out=str(RunFolder(folder).train))


def _eval_cfg(cfg: CompareConfig, split: str, folder: Path, adapter: str) -> EvalConfig:
    e = stage_config(cfg, "eval", data=split_data(cfg, split), adapter=adapter, out=str(RunFolder(folder).eval(split)))
    n = cfg.split_n.get(split, e.n)  # a split's own n (split_n), with the ks that fit it
    return e if n == e.n else dataclasses.replace(e, n=n, ks=[k for k in e.ks if k <= n] or [1])


def _grpo_cfg(cfg: CompareConfig, method: str, seed: int, folder: Path) -> GRPOConfig:
    """grpo, or nurl (GRPO with self hints), trained into `<folder>/train`; an interrupted run resumes."""
    return stage_config(cfg, "grpo", data=training_data(cfg), out=str(RunFolder(folder).train), seed=seed,
                        hints="self" if method == "nurl" else "none", resume=True)


def _train_grpo(cfg: CompareConfig, method: str, seed: int, folder: Path) -> Path:
    from dail import grpo  # the GRPO baselines need TRL; only import it when they are asked for

    return grpo.train_grpo(_grpo_cfg(cfg, method, seed, folder))


def compare(cfg: CompareConfig) -> Path:
    """Run every method of `cfg` (resuming what is done) and write the comparison report."""
    out = Path(cfg.out)
    if cfg.report_only:  # the evaluations are written already: no model, no tokenizer
        with command_lock(cfg, "compare"):
            return write_compare_report(cfg) if dist.world()[0] == 0 else out / "report.md"
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    check_near(cfg)
    with command_folder(cfg, "compare") as tok:
        evaluator = open_sampler(with_dtype(cfg.model, cfg.eval.dtype), tokenizer=tok)  # the base model, as evaluated
        if cfg.select_n:
            with _timed(timings, "select", timings_path):
                _select(cfg, evaluator, tok)
        if cfg.ceiling:
            with _timed(timings, "eval ceiling train", timings_path):
                e = dataclasses.replace(_eval_cfg(cfg, "train", out / "ceiling", ""), context="teacher")
                evaluate(e, evaluator, tok, label="teacher's ceiling")
        for split in cfg.splits:  # the base model, once per split
            with _timed(timings, f"eval base {split}", timings_path):
                evaluate(_eval_cfg(cfg, split, out / "base", ""), evaluator, tok, label="base")
        sampler = evaluator
        if cfg.eval.dtype:  # synthesis samples in model.dtype; one engine alive at a time (a vLLM one holds its KV cache)
            release(evaluator)
            sampler = open_sampler(cfg.model, tokenizer=tok)
        del evaluator
        for mode in dict.fromkeys(METHODS[m]["synth"] for m in cfg.methods if METHODS[m]["synth"]):
            with _timed(timings, f"synth {mode}", timings_path):
                synthesize(_synth_cfg(cfg, mode), sampler, tok)
        release(sampler)
        del sampler
        for name, method, seed in method_runs(cfg):
            if method == "base":
                continue
            folder = out / name
            trained_in = RunFolder(folder).train
            adapter = finished_adapter(trained_in)
            path = str(train_files(trained_in)["adapter"])  # where training writes it
            evals = {split: _eval_cfg(cfg, split, folder, path) for split in cfg.splits}
            if all(finished(e) for e in evals.values()):
                # Nothing left to sample: no model to open, and no adapter to train where it is
                # missing (adapters are weights, often not kept: a restored run holds samples only).
                log.info("compare: %s has every evaluation done", name)
                continue
            if adapter is None:
                log.info("compare: training %s (seed %d) -> %s", method, seed, folder / "train")
                with _timed(timings, f"train {name}", timings_path):
                    if METHODS[method]["loss"] == "grpo":
                        adapter = _train_grpo(cfg, method, seed, folder)
                    else:
                        adapter = train_or_reuse(_train_cfg(cfg, method, seed, folder))
            trained = open_sampler(with_dtype(cfg.model, cfg.eval.dtype), str(adapter), tokenizer=tok)
            for split in cfg.splits:
                with _timed(timings, f"eval {name} {split}", timings_path):
                    evaluate(evals[split], trained, tok, label=name)
            release(trained)
            del trained
    if dist.world()[0] == 0:
        write_compare_report(cfg)
    return out / "report.md"


# ----------------------------------------------------------------------------- statistics

def _counts(samples: Path, budget: int) -> dict[str, int]:
    """Correct samples per problem id at `budget` tokens."""
    counts: dict[str, int] = {}
    for r in read_records(samples):
        counts[r["id"]] = counts.get(r["id"], 0) + bool(r["correct_at_budget"][str(budget)])
    return counts


def comparison(cfg: CompareConfig) -> dict:
    """Every figure of the report: per run and split, pass@k with CI by budget, paired
    differences to base and to nll (same resampled problems for every run of a split), and the
    problems gained and lost against base."""
    out = Path(cfg.out)
    runs = [("base", "base", cfg.seeds[0])] + [r for r in method_runs(cfg) if r[1] != "base"]
    result: dict[str, Any] = {"runs": {name: {"method": m, "seed": s} for name, m, s in runs}, "splits": {}}
    for split in cfg.splits:
        found = {}
        for name, _, _ in runs:
            files = eval_files(RunFolder(out / name).eval(split))
            if files["summary"].exists():
                found[name] = (json.loads(files["summary"].read_text()), files["samples"])
        if "base" not in found:
            continue
        base_summary = found["base"][0]
        ids = list(base_summary["per_problem_correct"])
        n, ks, budgets = base_summary["n"], base_summary["ks"], base_summary["budgets"]
        idx = resample_indices(len(ids), seed=0)
        per: dict[str, dict] = {}
        for name, (summary, samples) in found.items():
            if list(summary["per_problem_correct"]) != ids or summary["n"] != n:
                raise ValueError(f"{samples.parent}: evaluated on other problems or another n than base; "
                                 "a comparison needs the same problems and samples for every method")
            per[name] = {"summary": summary, "counts": {b: _counts(samples, b) for b in budgets}}
        table: dict[str, Any] = {}
        for name, data in per.items():
            entry: dict[str, Any] = {"by_budget": data["summary"]["by_budget"], "vs": {}}
            for ref in ("base", "nll", "dail"):  # dail: the other DAIL variants against the reverse-KL, mixed one
                if ref not in per or ref == name:
                    continue
                entry["vs"][ref] = {str(b): {str(k): paired_difference(
                    per_problem_pass([data["counts"][b][i] for i in ids], n, k),
                    per_problem_pass([per[ref]["counts"][b][i] for i in ids], n, k), idx) for k in ks}
                    for b in budgets}
            top = max(budgets)
            entry["transitions_vs_base"] = transitions([per["base"]["counts"][top][i] for i in ids],
                                                       [data["counts"][top][i] for i in ids])
            entry["mean_tokens"] = data["summary"]["mean_tokens"]
            entry["dtype"] = data["summary"].get("dtype")  # the precision it was sampled in
            # diversity: distinct final answers per problem, the share of samples with a findable
            # answer, and (with eval.entropy) the mean entropy where the model wrote
            entry["diversity"] = {k: data["summary"].get(k)
                                  for k in ("distinct_answers", "answer_found_fraction", "mean_entropy")}
            table[name] = entry
        result["splits"][split] = {"n_problems": len(ids), "n": n, "ks": ks, "budgets": budgets, "runs": table}
    return result


# ----------------------------------------------------------------------------- report

_MARKERS = "osD^vP*X"
_SPLIT_TITLES = {"train": "training problems", "near": "near transfer (new instances of training templates)",
                 "far": "far transfer (held-out templates)", "val": "validation"}


def _num(x: Any, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _label(cfg_runs: dict, name: str) -> str:
    info = cfg_runs[name]
    label = METHODS[info["method"]]["label"]
    return label if name == info["method"] else f"{label}, seed {info['seed']}"


def _panels(n: int) -> tuple[Figure, Any]:
    """A figure with one panel per split, side by side."""
    fig = Figure(figsize=(5.2 * n, 4.4), dpi=120, layout="constrained")
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _run_names(comp: dict) -> list[str]:
    """Every run evaluated on at least one split, in config order. A method can be evaluated on
    some splits only (`dail compare --splits train` for one of them), so no single split lists them all."""
    return [name for name in comp["runs"] if any(name in s["runs"] for s in comp["splits"].values())]


def _method_lines(ax: Any, comp: dict, split: dict, xs: list[int], value: Any, band: Any = None) -> None:
    """One line per method over `xs` (log2 axis), `value(entry, x)` its height and `band(entry, x)`
    its CI (low, high), drawn as a shaded band. Methods often tie (at 0 on hard problems): a small
    sideways dodge and distinct markers keep every line visible. A run keeps its colour and marker
    in every panel, also where another run is missing from one."""
    names = _run_names(comp)
    for i, name in enumerate(names):
        if name not in split["runs"]:
            continue
        dodge = 2 ** (0.05 * (i - (len(names) - 1) / 2))
        line, = ax.plot([x * dodge for x in xs], [value(split["runs"][name], x) for x in xs],
                        marker=_MARKERS[i % len(_MARKERS)], ls="--" if name == "base" else "-",
                        color="black" if name == "base" else f"C{i - 1 if 'base' in names else i}",
                        label=_label(comp["runs"], name))
        if band is not None:
            lo, hi = zip(*(band(split["runs"][name], x) for x in xs))
            ax.fill_between([x * dodge for x in xs], lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])


def _legend(axes: Any) -> None:
    """One legend beside the last panel, with every run drawn in any panel."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[-1].legend(handles.values(), handles.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def _plot_passk(comp: dict, out: Path) -> str:
    splits = list(comp["splits"])
    fig, axes = _panels(len(splits))
    for ax, split in zip(axes, splits):
        s = comp["splits"][split]
        top = str(max(s["budgets"]))
        cell = lambda e, k: e["by_budget"][top]["pass_at_k"][str(k)]  # noqa: E731
        _method_lines(ax, comp, s, s["ks"], lambda e, k: cell(e, k)["mean"],
                      band=lambda e, k: (cell(e, k)["ci_low"], cell(e, k)["ci_high"]))
        ax.set_xlabel("k (samples)")
        ax.set_ylabel("pass@k")
        ax.set_title(f"{_SPLIT_TITLES[split]}\n{s['n_problems']} problems, n = {s['n']}, {top} tokens", fontsize=9)
        ax.grid(alpha=0.3)
    _legend(axes)
    fig.savefig(out / "compare_passk.png")
    return "compare_passk.png"


def _plot_delta(comp: dict, out: Path) -> str:
    splits = list(comp["splits"])
    fig, axes = _panels(len(splits))
    for ax, split in zip(axes, splits):
        s = comp["splits"][split]
        top, k_lo, k_hi = str(max(s["budgets"])), str(min(s["ks"])), str(max(s["ks"]))
        names = [n for n in s["runs"] if n != "base"]
        x = np.arange(len(names))
        for j, (k, color) in enumerate(((k_lo, "tab:blue"), (k_hi, "tab:orange"))):
            d = [s["runs"][n]["vs"]["base"][top][k] for n in names]
            mean = np.array([e["mean"] for e in d])
            err = np.array([[e["mean"] - e["ci_low"] for e in d], [e["ci_high"] - e["mean"] for e in d]])
            ax.bar(x + (j - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=3, color=color, label=f"pass@{k}")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [n for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("difference to base (paired 95% CI)")
        ax.set_title(_SPLIT_TITLES[split], fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(out / "compare_delta_base.png")
    return "compare_delta_base.png"


def _plot_gap(comp: dict, out: Path) -> str | None:
    held = "far" if "far" in comp["splits"] else ("near" if "near" in comp["splits"] else None)
    if "train" not in comp["splits"] or held is None:
        return None
    tr, te = comp["splits"]["train"], comp["splits"][held]
    k, top = str(min(max(tr["ks"]), max(te["ks"]))), str(max(tr["budgets"]))  # a k both splits reach
    names = [n for n in tr["runs"] if n in te["runs"]]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6.0, 1.1 * len(names) + 2), 4.4), dpi=120, layout="constrained")
    ax = fig.subplots()
    for j, (s, label) in enumerate(((tr, "training problems"), (te, _SPLIT_TITLES[held]))):
        vals = [s["runs"][n]["by_budget"][top]["pass_at_k"][k] for n in names]
        mean = np.array([v["mean"] for v in vals])
        err = np.array([[v["mean"] - v["ci_low"] for v in vals], [v["ci_high"] - v["mean"] for v in vals]])
        ax.bar(x + (j - 0.5) * 0.38, mean, 0.38, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"pass@{k} (95% CI)")
    ax.set_title("train versus held-out, per method", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out / "compare_gap.png")
    return "compare_gap.png"


def _plot_budget(comp: dict, out: Path) -> str | None:
    splits = [s for s in comp["splits"] if len(comp["splits"][s]["budgets"]) > 1]
    if not splits:
        return None
    fig, axes = _panels(len(splits))
    for ax, split in zip(axes, splits):
        s = comp["splits"][split]
        k = str(max(s["ks"]))
        _method_lines(ax, comp, s, s["budgets"], lambda e, b: e["by_budget"][str(b)]["pass_at_k"][k]["mean"])
        ax.set_xlabel("token budget")
        ax.set_ylabel(f"pass@{k}")
        ax.set_title(_SPLIT_TITLES[split], fontsize=9)
        ax.grid(alpha=0.3)
    _legend(axes)
    fig.savefig(out / "compare_budget.png")
    return "compare_budget.png"


def _fmt(e: dict) -> str:
    return f"{e['mean']:.3f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]"


def _fmt_delta(e: dict) -> str:
    return f"{e['mean']:+.3f} [{e['ci_low']:+.2f}, {e['ci_high']:+.2f}]"


def write_compare_report(cfg: CompareConfig) -> Path:
    """report.md (table first, sizes stated), comparison.json and the four plots."""
    out = Path(cfg.out)
    comp = comparison(cfg)
    (out / "comparison.json").write_text(json.dumps(comp, indent=2), encoding="utf-8")
    splits = list(comp["splits"])
    md = [f"# Comparison: {', '.join(cfg.methods)}", ""]
    if not splits:
        md += ["No evaluation finished yet."]
        (out / "report.md").write_text("\n".join(md), encoding="utf-8")
        return out / "report.md"
    first = comp["splits"][splits[0]]
    top = str(max(first["budgets"]))
    # each split's own k range: split_n gives splits different n, so pass@k is read at the ks each has
    k_lo = {sp: str(min(comp["splits"][sp]["ks"])) for sp in splits}
    k_hi = {sp: str(max(comp["splits"][sp]["ks"])) for sp in splits}
    md += [f"Model `{cfg.model.name}`; data `{cfg.data.source}` (split seed {cfg.data.seed}). "
           + "; ".join(f"{sp}: {comp['splits'][sp]['n_problems']} problems, n = {comp['splits'][sp]['n']}"
                       for sp in splits)
           + f" samples per problem; temperature {cfg.eval.temperature}, "
             f"{top} new tokens. 95% CIs: bootstrap over problems "
             f"({BOOTSTRAP_RESAMPLES} resamples); differences are paired (the same resampled "
             "problems for every method).", ""]
    dtypes = {name: e["dtype"] for sp in splits for name, e in comp["splits"][sp]["runs"].items()}
    if len(set(dtypes.values())) > 1:
        md += ["Sampled in different precisions: " + "; ".join(
            f"{d}: {', '.join(n for n in dtypes if dtypes[n] == d)}" for d in dict.fromkeys(dtypes.values())) + ".", ""]
    header = "| method | " + " | ".join(f"{sp} pass@{k_lo[sp]} | {sp} pass@{k_hi[sp]}" for sp in splits) + " |"
    md += ["## pass@k", "", header, "|---|" + "---|---|" * len(splits)]
    for name in _run_names(comp):
        cells = []
        for sp in splits:
            e = comp["splits"][sp]["runs"].get(name)
            cells += [_fmt(e["by_budget"][top]["pass_at_k"][k]) if e else "–" for k in (k_lo[sp], k_hi[sp])]
        md.append(f"| {_label(comp['runs'], name)} | " + " | ".join(cells) + " |")
    md += ["", "## Difference to base, NLL and DAIL (paired, at the smallest and the largest k of each split)", "",
           "DAIL's variants (direct, forward KL) are set against DAIL with mixed trajectories and the reverse KL.", "",
           "| method | split | k | vs base, smallest k | vs base, largest k | vs nll, largest k | vs dail, largest k "
           "| unsolved→solved | solved→unsolved |", "|---|---|---|---|---|---|---|---|---|"]
    for name in _run_names(comp):
        if name == "base":
            continue
        for sp in splits:
            e = comp["splits"][sp]["runs"].get(name)
            if not e:
                continue
            vb, vn, vd = (e["vs"].get(ref, {}).get(top, {}) for ref in ("base", "nll", "dail"))
            t = e["transitions_vs_base"]
            lo, hi = k_lo[sp], k_hi[sp]
            md.append(f"| {name} | {sp} | {lo} / {hi} | {_fmt_delta(vb[lo]) if vb else '–'} | "
                      f"{_fmt_delta(vb[hi]) if vb else '–'} | {_fmt_delta(vn[hi]) if vn else '–'} | "
                      f"{_fmt_delta(vd[hi]) if vd and name != 'nll' else '–'} | "
                      f"{t['unsolved_to_solved']} | {t['solved_to_unsolved']} |")
    seeded = [m for m in cfg.seed_methods if m in cfg.methods]
    if len(cfg.seeds) > 1 and seeded:
        md += ["", "## Training-seed variation", "", "pass@k at each split's largest k.", "",
               "| method | split | k | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " | spread |",
               "|---|---|---|" + "---|" * (len(cfg.seeds) + 1)]
        names = {(m, s): name for name, m, s in method_runs(cfg)}
        for m in seeded:
            for sp in splits:
                vals = [comp["splits"][sp]["runs"].get(names[(m, s)]) for s in cfg.seeds]
                if not all(vals):
                    continue
                v = [x["by_budget"][top]["pass_at_k"][k_hi[sp]]["mean"] for x in vals]
                md.append(f"| {m} | {sp} | {k_hi[sp]} | " + " | ".join(f"{x:.3f}" for x in v)
                          + f" | {max(v) - min(v):.3f} |")
    md += ["", "## Diversity", "", "Distinct final answers among a problem's n samples (mean over problems), the "
           "share of samples with a findable answer, and the mean entropy (nats per token) of the model where it "
           "wrote (eval.entropy).", "", "| method | split | distinct answers | answer found | entropy |",
           "|---|---|---|---|---|"]
    for name in _run_names(comp):
        for sp in splits:
            d = (comp["splits"][sp]["runs"].get(name) or {}).get("diversity")
            if d:
                md.append(f"| {name} | {sp} | {_num(d['distinct_answers'], 2)} | {_num(d['answer_found_fraction'], 3)} "
                          f"| {_num(d['mean_entropy'], 3)} |")
    if cfg.chosen:
        md += ["", "## What was chosen, and how", ""] + [f"- `{k}`: {v}" for k, v in cfg.chosen.items()]
    md += ["", "## Plots", ""]
    for png in filter(None, (_plot_passk(comp, out), _plot_delta(comp, out), _plot_gap(comp, out),
                             _plot_budget(comp, out))):
        md += [f"![{png[:-4]}]({png})", ""]
    synth_stats = []
    for mode in ("mixed", "direct", "star"):
        stats = synth_files(shared_synth(out, mode))["stats"]
        if stats.exists():
            st = json.loads(stats.read_text())
            synth_stats.append(f"| {mode} | {st.get('trajectories', '–')} | {st.get('kept', '–')} | "
                               f"{st.get('correct', '–')}/{st.get('graded', '–')} | "
                               f"{st.get('student_token_fraction', '–')} |")
    if synth_stats:
        md += ["## Synthetic sets", "", "| mode | trajectories | kept for training | correct / graded | "
               "student-token share |", "|---|---|---|---|---|", *synth_stats, ""]
        for mode in ("mixed", "direct"):
            stats = synth_files(shared_synth(out, mode))["stats"]
            rounds = json.loads(stats.read_text()).get("rounds") if stats.exists() else None
            if rounds:
                md += [f"{mode}: sampling in rounds of {rounds['round_size']} stopped at each problem's first "
                       f"correct trajectory; it decoded {rounds['trajectories_decoded']} of "
                       f"{rounds['without_rounds']} trajectories ({rounds['saved_fraction']:.0%} saved).", ""]
    timings = out / "timings.json"
    if timings.exists():
        t = json.loads(timings.read_text())
        md += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|",
               *[f"| {k} | {v:.0f} |" for k, v in t.items()], f"| total | {sum(t.values()):.0f} |", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    return out / "report.md"
