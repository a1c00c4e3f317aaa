"""The ``dnc`` command line: the top-level parser assembled from every package's commands.

Each package owns its sub-commands (``preprocessing.cli``, ``trainer.cli``,
``serving.cli``, ``pipeline.cli_pipeline``: an ``add_*`` function per command that
registers its arguments and handler). This module only builds the parser from them, sets
up logging and the library noise filters, and maps the known errors to exit codes
(``preprocessing.errors``). Parsing happens in ``main`` only (nothing at import).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Optional, Sequence

from pipeline import cli_pipeline
from preprocessing import cli as preprocessing_cli
from preprocessing.errors import (
    EXIT_CANTCREAT,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    EmptyDataError,
    IncompleteOutputError,
)
from serving import cli as serving_cli
from trainer import cli as trainer_cli

log = logging.getLogger("dnc")


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
    preprocessing_cli.add_preprocess(sub)
    trainer_cli.add_train(sub)
    trainer_cli.add_evaluate(sub)
    serving_cli.add_export(sub)
    serving_cli.add_serve(sub)
    serving_cli.add_query(sub)
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
    from preprocessing.fileio import OutputError
    from preprocessing.sources import InputError

    if extra and not getattr(args, "beam_passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Errors the user can act on: one line and their exit code, no traceback.
    exit_codes = (
        ((InputError, EmptyDataError), EXIT_USAGE),
        ((OutputError,), EXIT_CANTCREAT),
        ((IncompleteOutputError,), EXIT_SOFTWARE),
    )
    try:
        return args.handler(args, extra)
    except tuple(kind for kinds, _ in exit_codes for kind in kinds) as e:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"dnc {args.command}: error: {e}", file=sys.stderr)
        return next(code for kinds, code in exit_codes if isinstance(e, kinds))
