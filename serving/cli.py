"""``dnc export``, ``dnc serve`` and ``dnc query``: their arguments and handlers.

The serve and query flags are ``serving.server``'s and ``serving.client``'s own (as
tensorflow_model_server's); TensorFlow is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List

from preprocessing.errors import EXIT_USAGE
from serving.index_kinds import GLOBAL_LEAVES_FRACTION, INDEX_KINDS, LEAVES_FRACTION
from trainer.cli import add_merge_argument, parse_alpha

log = logging.getLogger("dnc")


def add_export(sub: argparse._SubParsersAction) -> None:
    """Registers ``dnc export``."""
    p = sub.add_parser("export", help="SavedModel with per-cluster indexes for TF Serving")
    p.add_argument("--model", required=True, help="dnc train --output")
    p.add_argument("--data", required=True, help="the preprocessing output it was trained on")
    p.add_argument("--output", required=True, help="BASE/NAME; writes BASE/NAME/<version>")
    p.add_argument("--index", default="scann", choices=INDEX_KINDS)
    p.add_argument("--max-num-results", type=int, default=200)
    p.add_argument("--num-results", type=int, default=50, help="M of serving_default")
    p.add_argument("--alpha", type=parse_alpha, default=None, help="default: chosen on validation")
    add_merge_argument(p)
    p.add_argument("--max-history", type=int, default=None)
    # None = ExportConfig's default (README lists it): one definition, and no TensorFlow
    # import to build the parser.
    p.add_argument(
        "--max-exclude",
        type=int,
        default=None,
        help="most exclude ids per request of the retrieve_filtered signature",
    )
    p.add_argument(
        "--scann-min-size",
        type=int,
        default=None,
        help="smaller clusters are searched exactly",
    )
    p.add_argument(
        "--leaves-fraction",
        type=float,
        default=None,
        help=f"share of ScaNN tree leaves searched in each cluster's index "
        f"(default {LEAVES_FRACTION})",
    )
    p.add_argument(
        "--global-leaves-fraction",
        type=float,
        default=None,
        help="the same in the one index over all items (prompt weight 0, plain variants; "
        f"default {GLOBAL_LEAVES_FRACTION})",
    )
    p.add_argument(
        "--no-global-index",
        dest="global_index",
        action="store_const",
        const=False,
        default=None,
        help="at prompt weight 0, search the per-cluster indexes instead of one index over "
        "all items (saves the second copy of the index)",
    )
    p.set_defaults(handler=run_export)


def add_serve(sub: argparse._SubParsersAction) -> None:
    """Registers ``dnc serve`` (flags as tensorflow_model_server's)."""
    from serving.server import add_serve_arguments

    p = sub.add_parser("serve", help="TensorFlow Serving API (gRPC + REST) over SavedModels")
    add_serve_arguments(p)
    p.set_defaults(handler=lambda args, extra: _run_serve(args))


def add_query(sub: argparse._SubParsersAction) -> None:
    """Registers ``dnc query``."""
    from serving.client import add_query_arguments

    p = sub.add_parser("query", help="query a server with the tensorflow-serving-api stub")
    add_query_arguments(p)
    p.set_defaults(handler=lambda args, extra: _run_query(args))


def run_export(args: argparse.Namespace, extra: List[str]) -> int:
    """Runs ``dnc export``."""
    from preprocessing import fileio

    fileio.check_output_dir(args.output)  # OutputError before any work
    from serving.export import export_model

    options = (
        "max_exclude",
        "scann_min_size",
        "leaves_fraction",
        "global_leaves_fraction",
        "global_index",
    )
    index_options = {k: getattr(args, k) for k in options if getattr(args, k) is not None}
    try:
        with fileio.output_errors(args.output):
            version_dir = export_model(
                args.model,
                args.data,
                args.output,
                index=args.index,
                max_num_results=args.max_num_results,
                default_num_results=args.num_results,
                alpha=args.alpha,
                merge=args.merge,
                prompt_weight=args.prompt_weight,
                max_history=args.max_history,
                **index_options,
            )
    except ValueError as e:
        print(f"dnc export: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"exported {args.index} model -> {version_dir}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from serving.server import run_serve

    return run_serve(args)


def _run_query(args: argparse.Namespace) -> int:
    from serving.client import run_query

    return run_query(args)
