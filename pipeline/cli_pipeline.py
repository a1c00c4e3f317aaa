"""``dnc pipeline run`` and ``dnc pipeline compile`` sub-commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, List

from preprocessing.errors import EXIT_USAGE

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

log = logging.getLogger("dnc")


def add_pipeline(sub: argparse._SubParsersAction) -> None:
    """Registers ``dnc pipeline {run,compile}``."""
    p = sub.add_parser("pipeline", help="the TFX-style pipeline (ML Metadata, caching, push)")
    psub = p.add_subparsers(dest="pipeline_command", required=True)
    run = psub.add_parser(
        "run",
        help="run the pipeline locally (no --config: the embedded demo, then serve + query)",
    )
    run.add_argument("--config", help="pipeline config file (.yaml/.yml/.toml)")
    run.add_argument("--component", action="append", default=[], help="run only this node")
    run.add_argument("--root", help="override the config's pipeline root")
    run.add_argument("--no-serve", action="store_true", help="do not serve and query at the end")
    run.set_defaults(handler=run_command)
    comp = psub.add_parser("compile", help="compile to a Kubeflow Pipelines v2 spec")
    comp.add_argument("--kfp", required=True, help="output YAML file")
    comp.add_argument("--config", help="pipeline config file")
    comp.set_defaults(handler=compile_command)


def _config(args: argparse.Namespace):
    import dataclasses

    from pipeline.config import load_config

    config = load_config(args.config)
    if getattr(args, "root", None):
        config = dataclasses.replace(config, root=args.root)
    return config


def run_command(args: argparse.Namespace, extra: List[str]) -> int:
    """Runs ``dnc pipeline run``."""
    try:
        config = _config(args)
    except (ValueError, OSError) as e:
        print(f"dnc pipeline run: invalid configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    from preprocessing import fileio

    writable = check_writable(config)  # OutputError before any work
    with fileio.output_errors(*writable):
        if args.component:
            from pipeline.runner import run_pipeline

            result = run_pipeline(config, only=tuple(args.component))
            for node, r in result.results.items():
                print(f"{node}: {'cache hit' if r.cached else 'ran'} (execution {r.execution_id})")
            return 0
        if args.no_serve:
            from pipeline.runner import run_pipeline

            result = run_pipeline(config)
        else:
            from pipeline.demo import run_demo

            result = run_demo(config, sys.stdout)
    print(f"report: {result.report}")
    return 0


def check_writable(config: PipelineConfig) -> List[str]:
    """Checks the directories a run writes (root, serving path, SQLite store's folder).

    Returns:
        Their absolute paths, the root first.

    Raises:
        OutputError: one of them cannot be created or written.
    """
    from preprocessing import fileio

    paths = [config.root, config.serving_dir]
    if not config.metadata.grpc_host:
        paths.append(os.path.dirname(os.path.abspath(config.sqlite_path)))
    return [fileio.check_output_dir(path) for path in dict.fromkeys(paths)]


def compile_command(args: argparse.Namespace, extra: List[str]) -> int:
    """Runs ``dnc pipeline compile --kfp FILE``."""
    from pipeline.kfp_compile import compile_kfp

    try:
        config = _config(args)
    except (ValueError, OSError) as e:
        print(f"dnc pipeline compile: invalid configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    order = compile_kfp(config, args.kfp)
    print(f"compiled {len(order)} steps to {args.kfp}: {' -> '.join(order)}")
    return 0
