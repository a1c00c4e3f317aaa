"""``dnc preprocess``: its arguments, the typed config built from them and the handler.

``pipeline.cli`` assembles the ``dnc`` parser from ``add_preprocess`` and the other
packages' ``add_*`` functions; Beam and TFT are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import List, Optional, Sequence

from preprocessing.config import (
    CLUSTERINGS,
    FILTER_MODES,
    KMEANS_STRATEGIES,
    SOURCES,
    ClusteringConfig,
    PreprocessConfig,
    SourceConfig,
    SyntheticConfig,
)
from preprocessing.errors import EXIT_USAGE

log = logging.getLogger("dnc")


def _optional_int(value: str) -> Optional[int]:
    return None if value.lower() in ("all", "none") else int(value)


def add_preprocess(sub: argparse._SubParsersAction) -> None:
    """Registers ``dnc preprocess`` (unrecognised flags go to Beam)."""
    p = sub.add_parser(
        "preprocess",
        help="raw logs -> clustered, split, TFT-transformed records (Apache Beam)",
        description="Unrecognised --flags are passed to Beam unchanged (e.g. --runner, "
        "--direct_num_workers 2 --direct_running_mode multi_processing).",
    )
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--input", help="raw data path (required for every source but synthetic)")
    p.add_argument("--output", required=True, help="output directory (replaced atomically)")
    p.add_argument("--clustering", default="kmeans", choices=CLUSTERINGS)
    p.add_argument("--num-clusters", type=int, default=ClusteringConfig.num_clusters)
    p.add_argument(
        "--kmeans-strategy",
        default=ClusteringConfig.kmeans_strategy,
        choices=KMEANS_STRATEGIES,
        help="kmeans: plain K-means; bisecting: split the largest cluster each time (more "
        "even cluster sizes)",
    )
    p.add_argument("--item2vec-dim", type=int, default=ClusteringConfig.embedding_dim)
    p.add_argument("--item2vec-epochs", type=int, default=ClusteringConfig.epochs)
    p.add_argument("--item2vec-window", type=int, default=ClusteringConfig.window)
    p.add_argument(
        "--item2vec-token-budget",
        type=int,
        default=ClusteringConfig.token_budget,
        help="cut item2vec epochs so that epochs x training tokens stays within this (at "
        "least one epoch; 0: no bound)",
    )
    p.add_argument("--cluster-seed", type=int, default=ClusteringConfig.seed)
    p.add_argument("--min-rating", type=float, default=None, help="ml1m: keep ratings >= this")
    p.add_argument("--min-item-interactions", type=int, default=1)
    p.add_argument("--min-user-interactions", type=int, default=1)
    p.add_argument("--filter-mode", default="until_stable", choices=FILTER_MODES)
    p.add_argument("--max-filter-rounds", type=int, default=PreprocessConfig.max_filter_rounds)
    p.add_argument("--dedup-consecutive", action="store_true")
    p.add_argument("--num-shards", type=int, default=1, help="TFRecord shards per split")
    p.add_argument(
        "--kuairand-tab", type=_optional_int, default=1, help="KuaiRand tab to keep ('all')"
    )
    p.add_argument("--kuairand-keep-unclicked", action="store_true")
    defaults = SyntheticConfig()
    p.add_argument("--synthetic-users", type=int, default=defaults.num_users)
    p.add_argument("--synthetic-items", type=int, default=defaults.num_items)
    p.add_argument("--synthetic-categories", type=int, default=defaults.num_categories)
    p.add_argument("--synthetic-mean-length", type=int, default=defaults.mean_length)
    p.add_argument("--seed", type=int, default=defaults.seed, help="synthetic data seed")
    p.set_defaults(handler=run_preprocess_command, beam_passthrough=True)


def preprocess_config(args: argparse.Namespace, beam_args: Sequence[str]) -> PreprocessConfig:
    """Builds the typed config from parsed ``preprocess`` arguments."""
    synthetic = SyntheticConfig(
        num_users=args.synthetic_users,
        num_items=args.synthetic_items,
        num_categories=args.synthetic_categories,
        mean_length=args.synthetic_mean_length,
        seed=args.seed,
    )
    source = SourceConfig(
        name=args.source,
        input=args.input,
        min_rating=args.min_rating,
        kuairand_tab=args.kuairand_tab,
        kuairand_require_click=not args.kuairand_keep_unclicked,
        synthetic=synthetic,
    )
    clustering = ClusteringConfig(
        method=args.clustering,
        num_clusters=args.num_clusters,
        embedding_dim=args.item2vec_dim,
        window=args.item2vec_window,
        epochs=args.item2vec_epochs,
        token_budget=args.item2vec_token_budget,
        seed=args.cluster_seed,
        kmeans_strategy=args.kmeans_strategy,
    )
    return PreprocessConfig(
        source=source,
        output=args.output,
        clustering=clustering,
        min_item_interactions=args.min_item_interactions,
        min_user_interactions=args.min_user_interactions,
        filter_mode=args.filter_mode,
        max_filter_rounds=args.max_filter_rounds,
        dedup_consecutive=args.dedup_consecutive,
        num_shards=args.num_shards,
        beam_args=tuple(beam_args),
    )


def run_preprocess_command(args: argparse.Namespace, extra: List[str]) -> int:
    """Runs ``dnc preprocess`` (``extra``: the Beam flags); returns the exit code."""
    try:
        config = preprocess_config(args, extra)
    except ValueError as e:
        print(f"dnc preprocess: invalid configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    from preprocessing.fileio import check_output_parent

    check_output_parent(config.output)  # fails fast, before importing Beam and TFT
    from preprocessing.run import format_summary, run_preprocess

    log.info("effective config: %s", json.dumps(dataclasses.asdict(config), sort_keys=True))
    result = run_preprocess(config)
    print(format_summary(result))
    return 0
