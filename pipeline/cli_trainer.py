"""``dnc train`` and ``dnc evaluate`` sub-commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from typing import List, Optional

from trainer.config import (
    INTENT_ENCODERS,
    LOSSES,
    SOFTMAX_SCOPES,
    TRAININGS,
    VARIANTS,
    ModelConfig,
    TrainConfig,
)

log = logging.getLogger("dnc")


def _int_list(value: str) -> tuple:
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from e
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _alpha(value: str) -> float:
    alpha = math.inf if value.lower() in ("inf", "infinity") else float(value)
    if math.isnan(alpha) or alpha < 0:
        raise argparse.ArgumentTypeError(f"alpha must be >= 0 or inf, got {value!r}")
    return alpha


def add_train(sub: argparse._SubParsersAction) -> None:
    """Registers ``dnc train``."""
    p = sub.add_parser("train", help="train one variant on a preprocessing output")
    m, t = ModelConfig(), TrainConfig(data="", output="")
    p.add_argument("--data", required=True, help="dnc preprocess --output")
    p.add_argument("--output", required=True, help="model directory")
    p.add_argument("--variant", default=t.variant, choices=tuple(VARIANTS))
    p.add_argument("--loss", default=t.loss, choices=LOSSES)
    p.add_argument(
        "--softmax-scope",
        default=t.softmax_scope,
        choices=SOFTMAX_SCOPES,
        help="full softmax over: auto (target's cluster for dnc-*, else all), cluster, all",
    )
    p.add_argument(
        "--training",
        default=t.training,
        choices=TRAININGS,
        help="prefix: one sample per history prefix; all-positions: whole sequences",
    )
    p.add_argument(
        "--length-buckets",
        type=int,
        default=t.length_buckets,
        help="all-positions: batch windows in this many length buckets, trimmed (0: fixed)",
    )
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--learning-rate", type=float, default=t.learning_rate)
    p.add_argument("--num-negatives", type=int, default=t.num_negatives)
    p.add_argument("--mixed-ratio", type=float, default=t.mixed_ratio)
    p.add_argument("--intent-weight", type=float, default=t.intent_weight)
    p.add_argument("--intent-encoder", default=t.intent_encoder, choices=INTENT_ENCODERS)
    p.add_argument(
        "--intent-recency",
        type=float,
        default=t.intent_recency,
        help="initial recency slope of the pooled intent encoders (0: plain mean)",
    )
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--eval-m", type=_int_list, default=t.eval_m)
    p.add_argument("--eval-users", type=int, default=t.eval_users)
    p.add_argument("--patience", type=int, default=t.patience)
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--max-len", type=int, default=m.max_len)
    p.add_argument("--dim", type=int, default=m.embedding_dim)
    p.add_argument("--blocks", type=int, default=m.num_blocks)
    p.add_argument("--heads", type=int, default=m.num_heads)
    p.add_argument("--dropout", type=float, default=m.dropout)
    p.add_argument("--separate-item-embeddings", action="store_true")
    p.add_argument(
        "--strategy",
        default="default",
        choices=("default", "mirrored"),
        help="tf.distribute strategy (mirrored: all visible devices)",
    )
    p.set_defaults(handler=run_train)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Registers ``dnc evaluate``."""
    p = sub.add_parser("evaluate", help="Recall@M of a trained model, paper protocol")
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--m", type=_int_list, default=(20, 50), help="list sizes, e.g. 20,50")
    p.add_argument("--alpha", type=_alpha, default=None, help="default: chosen on validation")
    p.add_argument("--split", default="test", choices=("test", "validation"))
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(handler=run_evaluate)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """Typed config from ``dnc train`` arguments."""
    model = ModelConfig(
        embedding_dim=args.dim,
        max_len=args.max_len,
        num_blocks=args.blocks,
        num_heads=args.heads,
        dropout=args.dropout,
        share_item_embeddings=not args.separate_item_embeddings,
    )
    return TrainConfig(
        data=args.data,
        output=args.output,
        variant=args.variant,
        model=model,
        loss=args.loss,
        softmax_scope=args.softmax_scope,
        training=args.training,
        length_buckets=args.length_buckets,
        num_negatives=args.num_negatives,
        mixed_ratio=args.mixed_ratio,
        intent_weight=args.intent_weight,
        intent_encoder=args.intent_encoder,
        intent_recency=args.intent_recency,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        steps_per_epoch=args.steps_per_epoch,
        eval_m=args.eval_m,
        eval_users=args.eval_users,
        patience=args.patience,
        seed=args.seed,
    )


def run_train(args: argparse.Namespace, extra: List[str]) -> int:
    """Runs ``dnc train``."""
    try:
        config = train_config(args)
    except ValueError as e:
        print(f"dnc train: invalid configuration: {e}", file=sys.stderr)
        return 2
    log.info("effective config: %s", json.dumps(dataclasses.asdict(config), sort_keys=True))
    from preprocessing import fileio

    fileio.check_output_dir(config.output)  # OutputError before any work
    import tensorflow as tf

    from trainer.train import train

    strategy: Optional[tf.distribute.Strategy] = None
    if args.strategy == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
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

    report = evaluate_model(
        args.model, args.data, m_values=args.m, alpha=args.alpha, split=args.split
    )
    print(
        f"{report['variant']} on {report['split']} ({report['users']} users, "
        f"alpha={report['alpha']}):"
    )
    print(report["table"])
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0
