"""Data errors found while the pipeline runs (input errors found before it: ``InputError``).

``EmptyDataError`` is raised inside the Beam graph by a guard step placed before
the clustering, so a run whose filters leave nothing fails with one clear line
instead of deep inside the clustering or TFT. Runners re-raise a worker's
exception either as itself (in-process DirectRunner, possibly with Beam's
``[while running ...]`` suffix) or as text inside another exception
(multi-processing, remote runners); ``find_empty_data_error`` recovers it from both.

``EXIT_USAGE`` and ``EXIT_CANTCREAT`` are the exit codes of every ``dnc`` command for
these errors and for an output path that cannot be written (``fileio.OutputError``);
``EXIT_SOFTWARE`` for an ``IncompleteOutputError`` (records lost by the runner).
"""

from __future__ import annotations

import re
from typing import Optional

# Exit codes of every ``dnc`` command (one definition: the packages' CLIs import them here).
EXIT_USAGE = 2  # usage, input and empty-data errors
EXIT_CANTCREAT = 73  # an output path cannot be written (sysexits.h EX_CANTCREAT)
EXIT_SOFTWARE = 70  # the runner lost data (sysexits.h EX_SOFTWARE)

_IN_TEXT = re.compile(r"EmptyDataError: (?P<message>[^\n]*?)(?: \[while running [^\]]*\])*$", re.M)
_BEAM_SUFFIX = re.compile(r"( \[while running [^\]]*\])+$")


class EmptyDataError(ValueError):
    """No usable data is left (after validation, the min-count filters or the split).

    The CLI prints the message and exits with ``EXIT_USAGE`` (2), like an ``InputError``.
    """


class IncompleteOutputError(RuntimeError):
    """The runner finished but wrote fewer records than the pipeline produced.

    Raised after the run, before publishing: the output directory is not replaced.
    Seen on Beam 2.59's portable runner at 20M interactions, in two runs of two (990
    and 2,980 users missing from all three splits while the statistics counted them;
    docs/scale.md); the CLI prints the message and exits with ``EXIT_SOFTWARE``.
    """


def find_empty_data_error(error: BaseException) -> Optional[EmptyDataError]:
    """The ``EmptyDataError`` that caused ``error`` (Beam's suffixes removed), or None."""
    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EmptyDataError):
            return EmptyDataError(_BEAM_SUFFIX.sub("", str(current)))
        match = _IN_TEXT.search(str(current))
        if match:
            return EmptyDataError(match.group("message"))
        current = current.__cause__ or current.__context__
    return None
