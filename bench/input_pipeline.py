"""Benchmark: what the all-position input pipeline costs a training step.

For each ``--data`` set and ``--variants`` default regime, one model takes interleaved rounds
of ``--steps`` training steps from three sources of the same batches' kind:

* ``per-epoch cut``: the pipeline before docs/divide-and-conquer.md section 23, each epoch
  cutting every user's sequence into windows (``flat_map``) and shuffling them one by one
  in a buffer of 20,000 (``trainer.data.batched_examples``), negatives checked against
  the window's inputs by the sampler's broadcast comparison (today's sampler otherwise);
* ``cut once``: ``trainer.sequence_data.sequence_dataset`` (windows cut once per run,
  batches gathered by shuffled index), what ``dnc train`` uses;
* ``cached``: ``--steps`` batches of ``cut once`` held in memory, the floor with no input
  work at all.

Each source keeps one live iterator, as ``fit`` does, and a round runs ``--steps`` calls
of the model's ``train_step`` on it (as ``bench/defaults.py`` times the default regimes).
It also times each pipeline alone (seconds a batch). The rates are medians over
``--rounds``; compare the ratios, which come from the same process and rounds.

    .venv/bin/python bench/input_pipeline.py --data runs/synthetic-ml1m --data runs/beauty \\
        --out bench/results/input-pipeline
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
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

SOURCES = ("per-epoch cut", "cut once", "cached")


def _pipelines(config, items, split) -> Dict[str, Any]:
    """source name -> endless dataset of ``config``'s all-position batches."""
    from trainer import data, sequence_data
    from trainer.train import input_sampler, make_dataset

    negatives = None
    sampler = input_sampler(config, items)
    if sampler is not None:  # no max_windows: the old broadcast accidental-hit check
        negatives = functools.partial(
            sequence_data._add_sequence_negatives,
            sampler=sampler,
            num_negatives=config.num_negatives,
        )
    per_epoch_cut = data.batched_examples(
        config.data,
        lambda r: sequence_data._expand_user_sequences(r, config.model.max_len),
        negatives,
        negatives is not None,
        config.batch_size,
        min(config.shuffle_buffer, 20_000),
        config.seed,
        True,
        split=split,
    )
    return {"per-epoch cut": per_epoch_cut, "cut once": make_dataset(config, items, split)}


def _alone(dataset, steps: int) -> float:
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return (time.perf_counter() - start) / steps


def measure(data_dir: str, variant: str, steps: int, rounds: int) -> Dict[str, Any]:
    """Seconds a step from each source (interleaved rounds) and a batch alone."""
    import tensorflow as tf

    from trainer import data
    from trainer.config import make_train_config
    from trainer.train import build_model

    config = make_train_config(data_dir, "", variant)
    if config.training != "all-positions" or config.length_buckets:
        raise ValueError(f"{variant}'s default regime is not fixed-size all-position batches")
    tf.keras.utils.set_random_seed(config.seed)
    items, split = data.load_items(data_dir), data.load_train_split(data_dir)
    sources = _pipelines(config, items, split)
    alone = {name: round(_alone(ds, 2 * steps), 5) for name, ds in sources.items()}
    sources["cached"] = sources["cut once"].take(steps).cache().repeat()
    for _ in sources["cached"].take(steps):
        pass
    model = build_model(config, items)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))

    @tf.function(reduce_retracing=True)
    def step(batch):
        return model.train_step(batch)

    # One live iterator per source, as fit keeps one: its prefetching goes on between rounds.
    iterators = {name: iter(dataset) for name, dataset in sources.items()}
    for iterator in iterators.values():
        for _ in range(3):  # trace, fill the buffers
            step(next(iterator))
    per_step: Dict[str, List[float]] = {name: [] for name in SOURCES}
    for r in range(rounds):
        for name in SOURCES:
            start = time.perf_counter()
            for _ in range(steps):
                logs = step(next(iterators[name]))
            float(logs["loss"])  # wait for the last step
            per_step[name].append((time.perf_counter() - start) / steps)
        print(f"{os.path.basename(data_dir)} {variant} round {r}", flush=True)
    median = {name: statistics.median(t) for name, t in per_step.items()}
    return {
        "data": data_dir,
        "variant": variant,
        "seconds_per_step": {k: round(v, 4) for k, v in median.items()},
        "rounds": {k: [round(x, 4) for x in t] for k, t in per_step.items()},
        "seconds_per_batch_alone": alone,
        "speedup_cut_once_over_per_epoch_cut": round(
            median["per-epoch cut"] / median["cut once"], 3
        ),
        "input_share_per_epoch_cut": round(1 - median["cached"] / median["per-epoch cut"], 3),
        "input_share_cut_once": round(1 - median["cached"] / median["cut once"], 3),
    }


def markdown(report: Dict[str, Any]) -> str:
    lines = [
        "### Input pipeline cost of a training step (all-position batches)",
        "",
        "| data | variant | s/step per-epoch cut | s/step cut once | s/step cached | "
        "cut once speed-up | input share before / now | s/batch alone before / now |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for row in report["rows"]:
        s, a = row["seconds_per_step"], row["seconds_per_batch_alone"]
        lines.append(
            f"| {os.path.basename(row['data'])} | `{row['variant']}` | {s['per-epoch cut']:.4f} "
            f"| {s['cut once']:.4f} | {s['cached']:.4f} "
            f"| {row['speedup_cut_once_over_per_epoch_cut']:.2f}x "
            f"| {row['input_share_per_epoch_cut']:.0%} / {row['input_share_cut_once']:.0%} "
            f"| {a['per-epoch cut']:.4f} / {a['cut once']:.4f} |"
        )
    machine = report["machine"]
    lines += [
        "",
        f"Medians of {report['settings']['rounds']} interleaved rounds of "
        f"{report['settings']['steps']} steps. Load average at the start "
        f"{machine['load_average_start']}, at the end {machine.get('load_average_end')}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="dnc preprocess --output")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--variants", default="dnc,sasrec")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    report: Dict[str, Any] = {
        "benchmark": "input_pipeline",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": [],
        **quality.run_metadata(),
    }
    for data_dir in args.data:
        with open(os.path.join(data_dir, "stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
        for variant in [v for v in args.variants.split(",") if v]:
            row = measure(data_dir, variant, args.steps, args.rounds)
            row["stats"] = {k: stats.get(k) for k in ("users", "items", "interactions")}
            report["rows"].append(row)
            report["machine"]["load_average_end"] = load_average()
            quality.write_outputs(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
