"""The ``dnc`` command line. Parsing happens in ``main`` only (nothing at import)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from typing import List, Optional, Sequence

from pipeline import cli_pipeline, cli_serving, cli_trainer
from preprocessing.config import (
    CLUSTERINGS,
    FILTER_MODES,
    SOURCES,
    ClusteringConfig,
    PreprocessConfig,
    SourceConfig,
    SyntheticConfig,
)

log = logging.getLogger("dnc")

EXIT_USAGE = 2  # usage, input and empty-data errors
EXIT_CANTCREAT = 73  # an output path cannot be written (sysexits.h EX_CANTCREAT)


def _optional_int(value: str) -> Optional[int]:
    return None if value.lower() in ("all", "none") else int(value)


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--item2vec-dim", type=int, default=ClusteringConfig.embedding_dim)
    p.add_argument("--item2vec-epochs", type=int, default=ClusteringConfig.epochs)
    p.add_argument("--item2vec-window", type=int, default=ClusteringConfig.window)
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
    p.set_defaults(handler=run_preprocess, beam_passthrough=True)


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
        seed=args.cluster_seed,
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


def run_preprocess(args: argparse.Namespace, extra: List[str]) -> int:
    """Runs ``dnc preprocess``."""
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


def build_parser() -> argparse.ArgumentParser:
    """The ``dnc`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="dnc", description="Divide-and-conquer embedding-based retrieval (TFRS)."
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show TensorFlow's C++ and Python warnings, CUDA/TensorRT probes and "
        "third-party deprecation warnings (hidden by default)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_preprocess(sub)
    cli_trainer.add_train(sub)
    cli_trainer.add_evaluate(sub)
    cli_serving.add_export(sub)
    cli_serving.add_serve(sub)
    cli_serving.add_query(sub)
    cli_pipeline.add_pipeline(sub)
    return parser


PROJECT_LOGGERS = ("dnc", "preprocessing", "trainer", "serving", "pipeline")
# Beam logs a failing DoFn's traceback here and then re-raises the exception to the
# caller, which reports it (in one line for a known error): silenced unless DEBUG.
_RERAISING_LOGGERS = ("apache_beam.runners.common",)
# Benign and repeated once per TFT lookup table; it says nothing actionable to a user.
_MUTED_MESSAGES = ("Tables initialized inside a tf.function",)


class _MuteKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(m in record.getMessage() for m in _MUTED_MESSAGES)


def _configure_logging(level_name: str) -> None:
    """Project loggers at ``level_name``; libraries (Beam, TF) at WARNING unless DEBUG."""
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        raise SystemExit(f"dnc: unknown --log-level {level_name!r}")
    library_level = level if level <= logging.DEBUG else max(level, logging.WARNING)
    logging.basicConfig(
        level=library_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_MuteKnownNoise())
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in _RERAISING_LOGGERS:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.CRITICAL)


def _quiet_libraries(verbose: bool) -> None:
    """Hides library start-up noise unless ``verbose``; must run before TensorFlow loads.

    TensorFlow's C++ log (TensorRT and CUDA probes, the cuDNN/cuFFT/cuBLAS "unable to
    register factory" lines that TF 2.16 prints at error level on every start, tf.data's
    end-of-sequence notes) is filtered with ``TF_CPP_MIN_LOG_LEVEL=3``: a real failure
    still reaches the user as the Python exception its status becomes. Its Python warnings
    (e.g. "Gradients do not exist") with the ``tensorflow`` logger at ERROR; third-party
    FutureWarnings and DeprecationWarnings with ``warnings`` filters. Beam's SDK workers
    inherit the environment. Progress bars and the project's loggers are untouched.
    """
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dnc`` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _quiet_libraries(args.verbose or args.log_level.upper() == "DEBUG")
    _configure_logging(args.log_level)
    from preprocessing.errors import EmptyDataError
    from preprocessing.fileio import OutputError
    from preprocessing.sources import InputError

    if extra and not getattr(args, "beam_passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args, extra)
    except (InputError, EmptyDataError) as e:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"dnc {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OutputError as e:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"dnc {args.command}: error: {e}", file=sys.stderr)
        return EXIT_CANTCREAT
