"""Benchmark: training throughput of all-position vs per-prefix training, one run.

For ``sasrec`` and ``dnc`` (each in its regime under ``--preset``, knob flags such as
``--loss`` on top), builds three trainers
(``trainer.train.make_dataset`` / ``build_model``): per-prefix, all-position with fixed
``[B, L]`` windows, and all-position with length-bucketed, trimmed batches. Warms them
up, then times interleaved rounds of ``--steps`` training steps each, twice: the train
step alone on batches pulled beforehand ("model"), and pulling each batch from the
tf.data pipeline plus the step ("end to end", what training sees). Samples/second
counts targets predicted per second: per-prefix, ``batch_size`` per step; all-position,
the non-pad targets of the batches actually consumed. Writes ``OUT``.

    .venv/bin/python bench/allpos.py --data runs/bench-synthetic \
        --out bench/results/allpos.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)

import dnc_env  # noqa: E402,F401

PYTORCH_REFERENCE = 1000.0  # samples/s of the PyTorch SASRec quoted in issue 7
# Knobs each timed mode sets itself (--batch-size, --sequences, --length-buckets).
MODE_KNOBS = ("training", "batch_size", "length_buckets")


def main() -> None:
    from trainer import knobs
    from trainer.config import PRESETS

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Knob flags left unset take each variant's regime under --preset "
        "(trainer.config.make_train_config); the modes set training, batch_size and "
        "length_buckets.",
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="sasrec,dnc")
    parser.add_argument("--preset", default="default", choices=PRESETS)
    parser.add_argument("--batch-size", type=int, default=128, help="per-prefix samples/step")
    parser.add_argument("--sequences", type=int, default=128, help="all-position windows/step")
    parser.add_argument(
        "--length-buckets", type=int, default=5, help="buckets of the bucketed all-position mode"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    knobs.add_arguments(
        parser.add_argument_group("training knobs"),
        exclude=MODE_KNOBS,
        show_regime=False,
    )
    args = parser.parse_args()

    import tensorflow as tf

    from trainer import data
    from trainer.train import build_model, make_dataset

    items = data.load_items(args.data)
    values = knobs.values_from_args(args)
    for name in MODE_KNOBS:
        values.pop(name, None)
    runs, timings, targets_seen, end_to_end = {}, {}, {}, {}
    for variant in args.variants.split(","):
        modes = (
            ("prefix", "prefix", args.batch_size, 0),
            ("all-positions-fixed", "all-positions", args.sequences, 0),
            ("all-positions", "all-positions", args.sequences, args.length_buckets),
        )
        for mode, training, batch, buckets in modes:
            mode_values = {"training": training, "length_buckets": buckets, "batch_size": batch}
            config = knobs.build_config(
                args.data, "", variant, args.preset, {**values, **mode_values}
            )
            tf.keras.utils.set_random_seed(config.seed)
            model = build_model(config, items)
            model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
            iterator = iter(make_dataset(config, items))

            @tf.function(reduce_retracing=True)
            def step(batch, model=model):
                return model.train_step(batch)

            for _ in range(3):  # trace + warm up
                step(next(iterator))
            key = f"{variant}/{mode}"
            runs[key] = (step, iterator, training, batch)
            timings[key], targets_seen[key], end_to_end[key] = [], [], []
            print(f"ready {key}", flush=True)
    for r in range(args.rounds):
        for key, (step, iterator, training, batch_size) in runs.items():
            batches = [next(iterator) for _ in range(args.steps)]  # input not timed
            count = _targets(batches, training, batch_size)
            start = time.perf_counter()
            for b in batches:
                logs = step(b)
            float(logs["loss"])
            rate = count / (time.perf_counter() - start)
            start, batches = time.perf_counter(), []
            for _ in range(args.steps):  # input timed: what fit() sees
                batches.append(next(iterator))
                logs = step(batches[-1])
            float(logs["loss"])
            full_rate = _targets(batches, training, batch_size) / (time.perf_counter() - start)
            timings[key].append(rate)
            end_to_end[key].append(full_rate)
            targets_seen[key].append(count / args.steps)
            print(f"round {r} {key}: {rate:,.0f} / {full_rate:,.0f} samples/s", flush=True)
    rates = {k: round(statistics.median(v), 1) for k, v in timings.items()}
    full_rates = {k: round(statistics.median(v), 1) for k, v in end_to_end.items()}
    variants = args.variants.split(",")
    report: Dict[str, Any] = {
        "benchmark": "allpos-throughput",
        "data": args.data,
        "samples_per_second": rates,
        "samples_per_second_end_to_end": full_rates,
        "rounds": {k: [round(x, 1) for x in v] for k, v in timings.items()},
        "rounds_end_to_end": {k: [round(x, 1) for x in v] for k, v in end_to_end.items()},
        "targets_per_step": {k: round(statistics.mean(v), 1) for k, v in targets_seen.items()},
        "ratio_all_positions_over_prefix": {
            v: round(rates[f"{v}/all-positions"] / rates[f"{v}/prefix"], 2) for v in variants
        },
        "ratio_all_positions_over_prefix_end_to_end": {
            v: round(full_rates[f"{v}/all-positions"] / full_rates[f"{v}/prefix"], 2)
            for v in variants
        },
        "ratio_all_positions_over_pytorch_reference_end_to_end": {
            v: round(full_rates[f"{v}/all-positions"] / PYTORCH_REFERENCE, 2) for v in variants
        },
        "note": (
            "samples_per_second: train step only (batches pulled before each round); "
            "_end_to_end: batches pulled from tf.data inside the timing"
        ),
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    print(
        json.dumps(
            {k: v for k, v in report.items() if k.startswith(("samples", "ratio"))}, indent=2
        )
    )


def _targets(batches, training: str, batch_size: int) -> int:
    """Targets predicted by ``batches``: the batch size, or the non-pad positions."""
    if training == "prefix":
        return len(batches) * batch_size
    from trainer import data

    return int(sum(float(b[data.MASK].numpy().sum()) for b in batches))


if __name__ == "__main__":
    main()
