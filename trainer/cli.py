"""``dnc train`` and ``dnc evaluate``: their arguments and handlers.

``parse_alpha`` and ``add_merge_argument`` are also the ``--alpha`` and ``--merge`` of
``dnc export`` (``serving.cli``). TensorFlow is imported only when a command runs (or a
``--merge`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import List, Optional

from preprocessing.errors import EXIT_USAGE
from trainer.alpha import check_alpha
from trainer.config import PRESETS, VARIANTS, TrainConfig

log = logging.getLogger("dnc")


def _int_list(value: str) -> tuple:
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from e
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def parse_alpha(value: str) -> float:
    """``--alpha``: a number >= 0, or ``inf``/``infinity`` (argparse type)."""
    try:
        return check_alpha(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _merge(value: str) -> str:
    from trainer.score_merge import check_merge  # imports TensorFlow: only when given

    try:
        return check_merge(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _prompt_weight(value: str) -> float:
    try:
        weight = float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}") from e
    if not 0.0 <= weight <= 1.0:
        raise argparse.ArgumentTypeError(f"prompt weight must be in [0, 1], got {value}")
    return weight


def add_merge_argument(parser: argparse.ArgumentParser) -> None:
    """``--merge`` (``trainer.score_merge.MERGES``) and the score merge's ``--prompt-weight``."""
    parser.add_argument(
        "--merge",
        type=_merge,
        default=None,
        metavar="{quota,score}",
        help="per-cluster merge (trainer.score_merge); default: selected on validation",
    )
    parser.add_argument(
        "--prompt-weight",
        type=_prompt_weight,
        default=None,
        help="score merge: blend of prompted (1) and unprompted (0) cluster queries; "
        "default: selected on validation with the merge and alpha",
    )


def add_train(sub: argparse._SubParsersAction) -> None:
    """Registers ``dnc train``: one flag per knob (``trainer.knobs``), unset by default."""
    from trainer import knobs

    p = sub.add_parser(
        "train",
        help="train one variant on a preprocessing output",
        description="Every training flag left unset takes the --variant's regime under "
        "--preset (trainer.config.regime): 'default' is each variant's best measured "
        "regime, 'paper' the paper's setting. Optional sizes take 'none' for None.",
    )
    p.add_argument("--data", required=True, help="dnc preprocess --output")
    p.add_argument("--output", required=True, help="model directory")
    p.add_argument("--variant", default="dnc", choices=tuple(VARIANTS))
    p.add_argument(
        "--preset",
        default="default",
        choices=PRESETS,
        help="regime of the unset flags: default (best measured) or paper",
    )
    group = p.add_argument_group(
        "training knobs",
        "TrainConfig and ModelConfig fields (trainer.knobs); unset, each takes the value "
        "of the --variant's regime under --preset, shown as [regime: ...]",
    )
    knobs.add_arguments(group)
    p.add_argument(
        "--strategy",
        default="default",
        choices=("default", "mirrored", "multiworker"),
        help="tf.distribute strategy (mirrored: all visible devices; multiworker: "
        "MultiWorkerMirroredStrategy from TF_CONFIG, see python -m trainer.multiworker)",
    )
    p.set_defaults(handler=run_train)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Registers ``dnc evaluate``."""
    p = sub.add_parser("evaluate", help="Recall@M of a trained model, paper protocol")
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--m", type=_int_list, default=(20, 50), help="list sizes, e.g. 20,50")
    p.add_argument("--alpha", type=parse_alpha, default=None, help="default: chosen on validation")
    add_merge_argument(p)
    p.add_argument(
        "--diversity-lambda",
        type=float,
        default=0.0,
        help="mind/comirec-sa: ComiRec's diversity weight when merging the interests' lists "
        "(0: by score)",
    )
    p.add_argument("--split", default="test", choices=("test", "validation"))
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--hits",
        default=None,
        help="also write each user's hit at every M here (.npz), for paired comparisons "
        "(bench/paired.py)",
    )
    p.set_defaults(handler=run_evaluate)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """Typed config from ``dnc train`` arguments (``make_train_config`` + the given flags)."""
    from trainer import knobs

    return knobs.build_config(
        args.data, args.output, args.variant, args.preset, knobs.values_from_args(args)
    )


def run_train(args: argparse.Namespace, extra: List[str]) -> int:
    """Runs ``dnc train``."""
    try:
        config = train_config(args)
    except ValueError as e:
        print(f"dnc train: invalid configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.strategy == "multiworker":
        from trainer.multiworker import TF_CONFIG, parse_tf_config

        try:
            task = parse_tf_config(os.environ.get(TF_CONFIG))
        except ValueError as e:
            print(f"dnc train: invalid configuration: {e}", file=sys.stderr)
            return EXIT_USAGE
        log.info("multi-worker task %s %d of %d workers", task.task_type, task.task_id,
                 task.num_workers)  # fmt: skip
    log.info("effective config: %s", json.dumps(dataclasses.asdict(config), sort_keys=True))
    from preprocessing import fileio

    fileio.check_output_dir(config.output)  # OutputError before any work
    import tensorflow as tf

    from trainer.train import train

    strategy: Optional[tf.distribute.Strategy] = None
    if args.strategy == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif args.strategy == "multiworker":
        # Created first, before any other TensorFlow op; each worker serves gRPC at its
        # TF_CONFIG address.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with fileio.output_errors(config.output):
        result = train(config, strategy=strategy)
    last = result.history[-1] if result.history else {}
    print(f"trained {config.variant}: {len(result.history)} epochs -> {result.model_dir}")
    for key in sorted(k for k in last if k.startswith("val_") or k == "samples_per_second"):
        print(f"  {key:32s} {last[key]:.4f}")
    return 0


def run_evaluate(args: argparse.Namespace, extra: List[str]) -> int:
    """Runs ``dnc evaluate``."""
    from trainer.evaluate_model import evaluate_model, write_json

    try:
        report = evaluate_model(
            args.model, args.data, m_values=args.m, alpha=args.alpha, split=args.split,
            merge=args.merge, diversity_lambda=args.diversity_lambda,
            prompt_weight=args.prompt_weight, hits_path=args.hits,
        )  # fmt: skip
    except ValueError as e:
        print(f"dnc evaluate: invalid configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"{report['variant']} on {report['split']} ({report['users']} users, "
        f"merge={report['merge']}, alpha={report['alpha']}, "
        f"prompt weight={report['prompt_weight']}):"
    )
    print(report["table"])
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.hits:
        print(f"wrote {args.hits}")
    return 0
