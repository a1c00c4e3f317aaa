"""Benchmark: every variant trained and evaluated by the same code (paper Tables 2-4).

For each variant: ``trainer.train.train`` in the variant's regime under ``--preset``
(``trainer.config.make_train_config``, as ``dnc train``: a knob flag given applies to
every variant), then ``trainer.evaluate_model.evaluate_model`` on the test split
(merge and alpha chosen on validation). Also measures training throughput of
``sasrec``, ``dnc`` and ``dnc-mmoe`` in one run, interleaved rounds, median
samples/second (``batch_size`` samples a step: sequence windows under all-position
training). Writes ``OUT.json`` and ``OUT.md`` (a Markdown table shaped like the
paper's).

    .venv/bin/python bench/quality.py --data runs/demo --m 50,100 \
        --out bench/results/quality-synthetic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from typing import Any, Dict, List

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)

import dnc_env  # noqa: E402,F401
from bench.machine import load_average  # noqa: E402

ALL_VARIANTS = ("mf", "sasrec", "sasrec-mixed", "dnc-naive", "dnc-concat", "dnc", "dnc-mmoe")
THROUGHPUT_VARIANTS = ("sasrec", "dnc", "dnc-mmoe")


def _config(args, variant: str, output: str, **overrides):
    """The TrainConfig of ``variant``: its regime under ``--preset``, the given knob flags,
    ``eval_m`` from ``--m``, then ``overrides`` (knob name -> value)."""
    from trainer import knobs

    values = {**knobs.values_from_args(args), "eval_m": (max(args.m),), **overrides}
    return knobs.build_config(
        args.data, output, variant, getattr(args, "preset", "default"), values
    )


def run_metadata() -> Dict[str, Any]:
    """Machine, library versions and date of a benchmark report."""
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": load_average(),
        },
        "versions": {n: metadata.version(n) for n in ("tensorflow", "tensorflow-recommenders")},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_outputs(out: str, report: Dict[str, Any], markdown_text: str) -> None:
    """Writes ``OUT.json`` (the report) and ``OUT.md``."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True, default=str)
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown_text)
    print(f"wrote {out}.json and {out}.md", flush=True)


def run_variant(args, variant: str, work: str, name: str = "", **overrides) -> Dict[str, Any]:
    """Trains and evaluates one variant (``overrides``: TrainConfig fields)."""
    from trainer.evaluate_model import evaluate_model
    from trainer.train import train

    output = os.path.join(work, name or variant)
    config = _config(args, variant, output, **overrides)
    start = time.monotonic()
    result = train(config, verbose=2)
    train_seconds = time.monotonic() - start
    report = evaluate_model(output, args.data, m_values=args.m, progress=False)
    report.pop("table")
    rates = [epoch["samples_per_second"] for epoch in result.history]
    return {
        **report,
        "epochs_run": len(result.history),
        "train_seconds": round(train_seconds, 1),
        "train_samples_per_second": round(statistics.median(rates), 1),
        "samples_per_epoch": result.samples_per_epoch,
        "training": config.training,
        "train_config": {
            k: v for k, v in dataclasses.asdict(config).items() if k not in ("data", "output")
        },
        "history": result.history,
    }


def measure_throughput(args, variants, steps: int, rounds: int) -> Dict[str, Any]:
    """Samples/second of ``variants`` measured in interleaved rounds of ``steps`` steps."""
    import tensorflow as tf

    from trainer import data
    from trainer.train import build_model, make_dataset

    items = data.load_items(args.data)
    models, iterators, batch_sizes = {}, {}, {}
    for variant in variants:
        config = _config(args, variant, "")
        batch_sizes[variant] = config.batch_size
        tf.keras.utils.set_random_seed(config.seed)
        dataset = make_dataset(config, items)
        model = build_model(config, items)
        model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
        step = model.make_train_function()
        iterators[variant] = iter(dataset)
        for _ in range(3):  # trace + warm up
            step(iterators[variant])
        models[variant] = step
    timings: Dict[str, List[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            step, it = models[variant], iterators[variant]
            start = time.perf_counter()
            for _ in range(steps):
                logs = step(it)
            float(logs["loss"])  # wait for the last step
            rate = steps * batch_sizes[variant] / (time.perf_counter() - start)
            timings[variant].append(rate)
    rates = {v: round(statistics.median(t), 1) for v, t in timings.items()}
    return {
        "samples_per_second": rates,
        "rounds": {v: [round(x, 1) for x in t] for v, t in timings.items()},
        "steps_per_round": steps,
        "batch_size": batch_sizes,
        "ratio_dnc_over_sasrec": round(rates["dnc"] / rates["sasrec"], 3),
        "ratio_mmoe_over_sasrec": round(rates["dnc-mmoe"] / rates["sasrec"], 3),
    }


def markdown(results: Dict[str, Dict[str, Any]], m_values, throughput, title: str) -> str:
    """The paper-shaped table."""
    head = ["variant", "loss", "training"]
    head += [f"R@{m}" for m in m_values]
    head += [f"within-cluster R@{m}" for m in m_values]
    head += [f"merge R@{m} (plain)" for m in m_values]
    head += ["intent top-1", "alpha", "epochs", "train samples/s"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, r in results.items():
        row = [variant, r["loss"], r.get("training", "prefix")]
        row += [f"{r[f'recall@{m}']:.4f}" for m in m_values]
        row += [f"{r[f'within_cluster_recall@{m}']:.4f}" for m in m_values]
        row += [
            f"{r[f'merged_recall@{m}']:.4f}" if f"merged_recall@{m}" in r else "-" for m in m_values
        ]
        top1 = r.get("intent_top1")
        row += [
            "-" if top1 is None else f"{top1:.3f}",
            str(r["alpha"]),
            str(r["epochs_run"]),
            f"{r['train_samples_per_second']:,.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    if throughput:
        rates = throughput["samples_per_second"]
        lines += [
            "",
            "Training throughput, one run, interleaved rounds (median samples/s): "
            + ", ".join(f"{v} {rates[v]:,.0f}" for v in rates)
            + f"; dnc/sasrec = {throughput['ratio_dnc_over_sasrec']:.3f}, "
            f"dnc-mmoe/sasrec = {throughput['ratio_mmoe_over_sasrec']:.3f}.",
        ]
    return "\n".join(lines) + "\n"


# The knobs bench/tune.py takes from add_model_arguments (its flags --dim, --blocks, ...).
MODEL_ARGUMENTS = (
    "batch_size",
    "learning_rate",
    "max_len",
    "embedding_dim",
    "num_blocks",
    "dropout",
    "eval_users",
    "seed",
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The architecture and training knobs of ``MODEL_ARGUMENTS`` (for bench/tune.py).

    Their defaults are concrete where every variant's default regime shares the value:
    tune.py records them and checks them against ``--include``d reports. A knob whose
    regime differs between variants (``embedding_dim``: 100 for dnc) defaults to None,
    each variant's own regime.
    """
    from trainer import knobs

    defaults = {}
    for name in MODEL_ARGUMENTS:
        values = knobs.regime_values(name, "default")
        if len(values) == 1:
            defaults[name] = next(iter(values))
    knobs.add_arguments(parser, names=MODEL_ARGUMENTS, defaults=defaults, show_regime=False)


def main() -> None:
    from trainer import knobs
    from trainer.config import PRESETS

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Every knob flag left unset takes each variant's regime under --preset "
        "(trainer.config.make_train_config), as in dnc train.",
    )
    parser.add_argument("--data", required=True, help="dnc preprocess --output")
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    parser.add_argument("--m", default="20,50", help="list sizes; the largest drives training")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--title", default=None)
    parser.add_argument("--preset", default="default", choices=PRESETS)
    knobs.add_arguments(parser.add_argument_group("training knobs"), exclude=("eval_m",))
    parser.add_argument("--throughput-steps", type=int, default=30)
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument(
        "--throughput-only", action="store_true", help="skip quality; measure samples/s only"
    )
    args = parser.parse_args()
    args.m = tuple(int(m) for m in args.m.split(","))
    variants = [v for v in args.variants.split(",") if v]
    if args.throughput_only:
        throughput = measure_throughput(
            args, THROUGHPUT_VARIANTS, args.throughput_steps, args.throughput_rounds
        )
        report = {"benchmark": "throughput", "data": args.data, "throughput": throughput}
        report["settings"] = {k: v for k, v in vars(args).items() if k not in ("data", "out")}
        report.update(run_metadata())
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        print(json.dumps(throughput, indent=2))
        return

    results: Dict[str, Dict[str, Any]] = {}
    work = tempfile.mkdtemp(prefix="dnc-quality-")
    for variant in variants:
        print(f"=== {variant}", flush=True)
        results[variant] = run_variant(args, variant, work)
        print(json.dumps({k: v for k, v in results[variant].items() if k != "history"}), flush=True)
    throughput = None
    if all(v in variants for v in THROUGHPUT_VARIANTS) and args.throughput_rounds > 0:
        throughput = measure_throughput(
            args, THROUGHPUT_VARIANTS, args.throughput_steps, args.throughput_rounds
        )
        print(json.dumps(throughput), flush=True)
    with open(os.path.join(args.data, "stats.json")) as f:
        stats = json.load(f)
    report = {
        "benchmark": "quality",
        "data": {
            "dir": args.data,
            **{k: stats[k] for k in ("source", "users", "items", "clusters")},
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "results": results,
        "throughput": throughput,
        **run_metadata(),
    }
    title = args.title or f"{stats['source']} ({stats['users']} users, {stats['items']} items)"
    write_outputs(args.out, report, markdown(results, args.m, throughput, title))


if __name__ == "__main__":
    main()
