"""Benchmark: the default regimes of ``sasrec`` and ``dnc`` (what ``dnc train`` does with no flags).

Two parts, both on the same data in one run (issue 11, "Speed"):

1. Throughput: targets per second of each variant's default regime, measured in
   interleaved rounds of ``--steps`` steps (input pipeline included, as ``fit`` sees
   it), median over ``--rounds``; the ratio dnc / sasrec.
2. Convergence: a full default training of each variant (``trainer.train.train``,
   early stopping included), wall-clock minutes and the best validation recall.

    .venv/bin/dnc preprocess --source synthetic --synthetic-users 6040 \\
        --synthetic-items 3706 --synthetic-mean-length 165 --output runs/synthetic-ml1m
    .venv/bin/python bench/defaults.py --data runs/synthetic-ml1m --convergence-variants dnc \\
        --out bench/results/defaults-ml1m-issue11-lr-decay
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# isort: off
import dnc_env  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import quality  # noqa: E402
from bench.machine import load_average  # noqa: E402
# isort: on


def _targets(batch: Dict[str, Any], training: str) -> int:
    from trainer import data

    if training == "prefix":
        return int(batch[data.TARGET].shape[0])
    return int(batch[data.MASK].numpy().sum())


def _named_configs(args: argparse.Namespace, variants: List[str]) -> Dict[str, Any]:
    """name -> TrainConfig: each variant's default regime, plus ``--extra`` settings."""
    from trainer.config import make_train_config

    configs = {v: make_train_config(args.data, "", v) for v in variants}
    for name, spec in json.loads(args.extra or "{}").items():
        spec = dict(spec)
        variant, model = spec.pop("variant"), spec.pop("model", None)
        configs[name] = make_train_config(args.data, "", variant, model_overrides=model, **spec)
    return configs


def throughput(args: argparse.Namespace, variants: List[str]) -> Dict[str, Any]:
    """Median end-to-end targets/s of each default regime (and extra setting), interleaved."""
    import tensorflow as tf

    from trainer import data
    from trainer.train import build_model, make_dataset

    items = data.load_items(args.data)
    runs = {}
    for variant, config in _named_configs(args, variants).items():
        tf.keras.utils.set_random_seed(config.seed)
        model = build_model(config, items)
        model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
        iterator = iter(make_dataset(config, items).repeat())

        @tf.function(reduce_retracing=True)
        def step(batch, model=model):
            return model.train_step(batch)

        for _ in range(3):  # trace and warm up
            step(next(iterator))
        runs[variant] = (step, iterator, config.training)
    rounds: Dict[str, List[float]] = {v: [] for v in runs}
    for r in range(args.rounds):
        for variant, (step, iterator, training) in runs.items():
            count, start = 0, time.perf_counter()
            for _ in range(args.steps):
                batch = next(iterator)
                logs = step(batch)
                count += _targets(batch, training)
            float(logs["loss"])  # wait for the last step
            rounds[variant].append(count / (time.perf_counter() - start))
            print(f"round {r} {variant}: {rounds[variant][-1]:,.0f} targets/s", flush=True)
    rates = {v: round(statistics.median(t), 1) for v, t in rounds.items()}
    out: Dict[str, Any] = {
        "targets_per_second": rates,
        "rounds": {v: [round(x, 1) for x in t] for v, t in rounds.items()},
        "steps_per_round": args.steps,
        "configs": {
            name: dataclasses.asdict(c) for name, c in _named_configs(args, variants).items()
        },
    }
    if "dnc" in rates and "sasrec" in rates:
        out["ratio_dnc_over_sasrec"] = round(rates["dnc"] / rates["sasrec"], 3)
    return out


def convergence(args: argparse.Namespace, variant: str, work: str) -> Dict[str, Any]:
    """A full default training: minutes, epochs, best validation recall."""
    from trainer.config import make_train_config
    from trainer.train import MONITOR, train

    config = make_train_config(args.data, os.path.join(work, variant), variant)
    start = time.monotonic()
    result = train(config, verbose=2)
    minutes = (time.monotonic() - start) / 60
    # Early stopping's own monitor (the mean recall over --eval-m), so that "best epoch"
    # is the epoch whose weights the run keeps.
    curve = [round(e[MONITOR], 4) for e in result.history]
    rates = sorted(e["samples_per_second"] for e in result.history)
    return {
        "config": dataclasses.asdict(config),
        "minutes": round(minutes, 2),
        "epochs_run": len(curve),
        "best_epoch": curve.index(max(curve)) + 1,
        MONITOR: max(curve),
        "curve": curve,
        "best_epoch_recall": {
            k: round(v, 4)
            for k, v in result.history[curve.index(max(curve))].items()
            if k.startswith("val_recall@")
        },
        "median_targets_per_second": round(rates[len(rates) // 2], 1),
    }


def markdown(report: Dict[str, Any]) -> str:
    tp = report["throughput"]
    lines = [f"### {report['title']}", "", "| variant | targets/s (interleaved) | "]
    lines[-1] += "minutes to converge | epochs (best) | best val recall (mean of R@M) |"
    lines.append("|---|---:|---:|---:|---:|")
    for variant, rate in tp["targets_per_second"].items():
        conv = report["convergence"].get(variant)
        cells = ["-", "-", "-"]
        if conv:
            key = "val_recall" if "val_recall" in conv else "val_recall@20"
            cells = [f"{conv['minutes']:.1f}", f"{conv['epochs_run']} ({conv['best_epoch']})"]
            cells.append(f"{conv[key]:.4f}")
        lines.append(f"| `{variant}` | {rate:,.0f} | " + " | ".join(cells) + " |")
    if "ratio_dnc_over_sasrec" in tp:
        lines += ["", f"dnc / sasrec throughput: {tp['ratio_dnc_over_sasrec']:.3f}"]
    machine = report.get("machine", {})
    if "load_average_start" in machine:
        lines += [
            "",
            f"Load average at the start {machine['load_average_start']}, "
            f"at the end {machine.get('load_average_end', '-')}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dnc preprocess --output")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--variants", default="sasrec,dnc")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-convergence", action="store_true", help="throughput only")
    parser.add_argument(
        "--convergence-variants",
        default=None,
        help="variants trained to convergence (default: all of --variants)",
    )
    parser.add_argument(
        "--extra",
        default=None,
        help='more settings timed beside the defaults: JSON {name: {"variant": V, field: value}}',
    )
    parser.add_argument("--title", default=None)
    parser.add_argument(
        "--workdir", default=None, help="keep the trained models here (default: a temp dir)"
    )
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    with open(os.path.join(args.data, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    report: Dict[str, Any] = {
        "benchmark": "defaults",
        "title": args.title or f"default regimes on {os.path.basename(args.data)}",
        "data": {"dir": args.data, **{k: stats.get(k) for k in ("users", "items", "interactions")}},
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "throughput": throughput(args, variants),
        "convergence": {},
        **quality.run_metadata(),
    }
    report["machine"]["load_average_end"] = load_average()
    quality.write_outputs(args.out, report, markdown(report))
    if not args.no_convergence:
        work = args.workdir or tempfile.mkdtemp(prefix="dnc-defaults-")
        print(f"trained models under {work}", flush=True)
        trained = (args.convergence_variants or args.variants).split(",")
        for variant in [v for v in trained if v]:
            report["convergence"][variant] = convergence(args, variant, work)
            report["machine"]["load_average_end"] = load_average()
            quality.write_outputs(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
