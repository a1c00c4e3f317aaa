"""The contract every source implements, and the plumbing the sources share.

A source turns raw files into four PCollections (see ``SourceOutputs``). Every
raw row read is either accepted (an ``Interaction``/``ItemCategory``), skipped
by policy (``Skipped``, counted) or quarantined (``Rejected``, with a reason):
nothing is dropped silently. The invariant holds per raw row: accepted rows +
skipped rows + rejected rows = ``rows_read``. A raw row is one line of a text
file (header lines excluded), one Parquet record or one entry of a JSON item
table. Only ``sequences`` turns one accepted row (a user's line) into several
``Interaction`` rows; every other source emits exactly one result per row.
``row_outcome`` enforces the shapes (one ``Rejected``, one ``Skipped``, or
accepted records only) and ``SourceOutputs.accepted_rows`` counts accepted rows,
so the invariant is checked on every run (``stats.json``). Parsers never raise on
row content: hostile rows (random bytes, NUL, bad encodings, huge fields, wrong
separators, ...) are quarantined; only a wholly unreadable file raises
``InputError``, before the pipeline runs.

Each source module provides pure parse functions ``(source, raw) -> list of
ParseResult`` and a Beam function ``read_<name>(pipeline, config)``. The shared
pieces live here: locating input files (``InputError`` before the pipeline
runs), field validation helpers raising ``RowError``, the ``quarantining`` and
``text_row_parser`` decorators that turn a ``RowError`` into a ``Rejected`` row,
``read_lines`` (raw bytes, so bad encoding is quarantined, never fatal),
``parse_rows`` (routes parse results to tagged outputs, counts rows with Beam
metrics) and ``merge_outputs``.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import re
import zlib
from typing import Any, Callable, Iterable, List, NamedTuple, Sequence

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.textio import ReadAllFromText

from preprocessing.config import SourceConfig
from preprocessing.records import (
    Interaction,
    ParseResult,
    Rejected,
    Skipped,
    raw_text,
    shown,
    valid_id,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT64_DIGITS = 19  # digits of INT64_MAX; longer numbers are out of range
_INTEGER = re.compile(r"-?[0-9]+")
# ASCII decimal notation only: float() also takes "1_000", "٣" (Arabic-Indic three) and "ｉｎｆ".
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_GLOB_CHARS = frozenset("*?[")

# Output tags of ``parse_rows``; interactions are the main output.
ITEMS, REJECTED, SKIPPED, ACCEPTED = "items", "rejected", "skipped", "accepted"


class InputError(Exception):
    """Input is missing or empty; the CLI prints the message and exits with code 2.

    Attributes:
        path: the offending path or pattern.
    """

    def __init__(self, path: str, problem: str):
        super().__init__(f"{problem}: {path}")
        self.path = path


class SourceOutputs(NamedTuple):
    """What a source yields.

    Attributes:
        interactions: accepted ``Interaction`` rows.
        item_categories: ``ItemCategory`` rows from an item side table (may be empty).
        rejected: ``Rejected`` rows (quarantine).
        skipped: ``Skipped`` rows (left out by policy, e.g. ``is_click == 0``).
        rows_read: a single-element PCollection: the number of raw rows read,
            interaction rows and item-table rows together.
        accepted_rows: a single-element PCollection: the number of raw rows
            accepted (a sequence line counts once, however many items it has).
    """

    interactions: beam.PCollection
    item_categories: beam.PCollection
    rejected: beam.PCollection
    skipped: beam.PCollection
    rows_read: beam.PCollection
    accepted_rows: beam.PCollection


# Single-element count fields of ``SourceOutputs`` (summed, not flattened, on merge).
COUNT_FIELDS = ("rows_read", "accepted_rows")


# --------------------------------------------------------------------------- files


class FileInfo(NamedTuple):
    """A matched input file."""

    path: str
    size: int


def is_glob(path: str) -> bool:
    """Whether ``path`` contains glob characters."""
    return any(c in _GLOB_CHARS for c in path)


def is_dir(path: str) -> bool:
    """Whether ``path`` names a directory (local) or a non-empty prefix (remote)."""
    if FileSystems.get_scheme(path) is None:
        return os.path.isdir(path)
    return bool(match_files(FileSystems.join(path, "*")))


def match_files(pattern: str) -> List[FileInfo]:
    """Files matching ``pattern`` (a path or glob), sorted by path; [] if none.

    Local directories matched by a glob are left out.
    """
    try:
        metadata = FileSystems.match([pattern])[0].metadata_list
    except BeamIOError:  # some file systems raise instead of matching nothing
        return []
    local = FileSystems.get_scheme(pattern) is None
    files = [
        FileInfo(m.path, m.size_in_bytes) for m in metadata if not (local and os.path.isdir(m.path))
    ]
    return sorted(files)


def nonempty_files(files: Sequence[FileInfo], pattern: str, what: str) -> List[str]:
    """Paths of the files of non-zero size.

    Raises:
        InputError: ``files`` is empty, or every file has size 0.
    """
    if not files:
        raise InputError(pattern, f"no {what} found")
    paths = [f.path for f in files if f.size > 0]
    if not paths:
        raise InputError(pattern, f"every {what} is empty (size 0)")
    return paths


def read_first_line(path: str) -> bytes:
    """The first line of a (possibly compressed) text file, without the line break.

    Raises:
        InputError: the file cannot be opened or decompressed.
    """
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as handle:
            line = handle.readline()
    except (OSError, EOFError, zlib.error, BeamIOError) as error:
        raise InputError(path, f"unreadable file ({type(error).__name__}: {error})") from None
    return line.rstrip(b"\r\n")


def check_gzip_complete(path: str, chunk_bytes: int = 1 << 20) -> None:
    """Decompresses a ``.gz`` file to its end: Beam's reader stops silently at a
    truncated stream, which would lose the rest of the file without a trace.

    Raises:
        InputError: the file is not gzip, is corrupt, or is truncated.
    """
    members, in_member = 0, False
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            stream = zlib.decompressobj(wbits=31)
            while data := handle.read(chunk_bytes):
                while data:
                    stream.decompress(data, chunk_bytes)  # bounded output: no zip bomb
                    in_member, data = True, stream.unconsumed_tail
                    if stream.eof:  # a member ended; another may follow
                        data, members, in_member = stream.unused_data, members + 1, False
                        stream = zlib.decompressobj(wbits=31)
    except (OSError, zlib.error, BeamIOError) as error:
        raise InputError(path, f"unreadable file ({type(error).__name__}: {error})") from None
    if in_member or not members:
        raise InputError(path, "unreadable file (truncated gzip: no end-of-stream marker)")


def header_names(line: bytes) -> List[str]:
    """Column names of a comma-separated header line (UTF-8 BOM and spaces stripped)."""
    text = line.decode("utf-8", errors="replace").lstrip("\ufeff")
    return [name.strip() for name in text.split(",")]


def check_input(config: SourceConfig) -> None:
    """Checks that ``config``'s input exists and is not empty, before any pipeline runs.

    Raises:
        InputError: the input is missing, empty, lacks the expected files, or a
            file header lacks required columns.
        ValueError: the source name is unknown.
    """
    if config.name == "synthetic":
        return
    _source_module(config.name).locate(config.input)


# ---------------------------------------------------------------- row validation


class RowError(Exception):
    """A row is malformed; ``quarantining`` turns it into a ``Rejected`` row.

    Attributes:
        reason: short machine-readable reason.
        detail: human-readable explanation.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def require_id(value: str, field: str) -> str:
    """Returns ``value`` stripped of surrounding whitespace, if it is a valid id.

    Raises:
        RowError: ``empty_id`` or ``invalid_id`` (inner whitespace, control chars).
    """
    value = value.strip()
    if not value:
        raise RowError("empty_id", f"{field} is empty")
    if not valid_id(value):
        raise RowError("invalid_id", f"{field} {shown(value)} has whitespace or control characters")
    return value


def require_int(value: str, field: str, reason: str = "bad_value") -> int:
    """Parses a base-10 int64 (``-?[0-9]+``, surrounding whitespace allowed).

    Raises:
        RowError: with ``reason`` if ``value`` is not such an integer.
    """
    text = value.strip()
    if not _INTEGER.fullmatch(text):
        raise RowError(reason, f"{field} {shown(value)} is not an integer")
    # int() refuses strings of more than 4300 digits (a ValueError): check the
    # length first, so that a huge number is an out-of-range row, not a crash.
    if len(text.lstrip("-").lstrip("0")) > _INT64_DIGITS:
        raise RowError(reason, f"{field} {shown(value)} is out of the int64 range")
    number = int(text)
    if not INT64_MIN <= number <= INT64_MAX:
        raise RowError(reason, f"{field} {shown(value)} is out of the int64 range")
    return number


def require_float(value: str, field: str, reason: str = "bad_value") -> float:
    """Parses a finite float written in ASCII decimal notation (``4``, ``-0.5``, ``1e3``).

    Raises:
        RowError: with ``reason`` if ``value`` is not a finite number.
    """
    text = value.strip()
    if not _FLOAT.fullmatch(text):
        raise RowError(reason, f"{field} {shown(value)} is not a number")
    number = float(text)
    if not math.isfinite(number):
        raise RowError(reason, f"{field} {shown(value)} is not finite")
    return number


def require_category(value: str, field: str) -> str:
    """Returns ``value`` stripped; ``""`` means no category.

    Inner spaces are allowed (``Skin Care``); control characters are not, since
    categories are written to CSV, JSON and text files downstream.

    Raises:
        RowError: ``invalid_category`` if ``value`` has non-printable characters.
    """
    value = value.strip()
    if not value.isprintable():
        raise RowError("invalid_category", f"{field} {shown(value)} has control characters")
    return value


def require_field_count(fields: Sequence[str], expected: Iterable[int], what: str) -> None:
    """Raises ``RowError('wrong_field_count')`` unless ``len(fields)`` is in ``expected``."""
    expected = tuple(expected)
    if len(fields) not in expected:
        allowed = " or ".join(str(n) for n in expected)
        raise RowError("wrong_field_count", f"{what}: {len(fields)} fields, expected {allowed}")


def quarantining(parse: Callable[..., List[ParseResult]]) -> Callable[..., List[ParseResult]]:
    """Decorates ``parse(source, raw, ...)`` so a ``RowError`` becomes one ``Rejected`` row."""

    @functools.wraps(parse)
    def wrapper(source: str, raw: Any, *args: Any, **kwargs: Any) -> List[ParseResult]:
        try:
            return parse(source, raw, *args, **kwargs)
        except RowError as error:
            text = raw if isinstance(raw, (bytes, str)) else repr(raw)
            return [Rejected(source, error.reason, error.detail, raw_text(text))]

    return wrapper


def text_row_parser(encoding: str = "utf-8") -> Callable[[Callable[..., List[ParseResult]]], Any]:
    """Decorator for parsers of one text line: ``parse(source, text, ...)``.

    The decorated function takes the raw ``bytes`` line instead: it is decoded
    with ``encoding`` (failure: ``Rejected`` reason ``bad_encoding``), a leading
    byte order mark (U+FEFF, written by some editors at the start of a file) is
    removed, a blank line is ``Skipped`` with reason ``blank_line``, and a
    ``RowError`` raised by ``parse`` becomes a ``Rejected`` row carrying the raw line.
    """

    def decorate(parse: Callable[..., List[ParseResult]]) -> Callable[..., List[ParseResult]]:
        @quarantining
        @functools.wraps(parse)
        def wrapper(source: str, line: bytes, *args: Any, **kwargs: Any) -> List[ParseResult]:
            try:
                text = line.decode(encoding)
            except UnicodeDecodeError as error:
                raise RowError("bad_encoding", f"not {encoding}: {error.reason}") from None
            text = text.rstrip("\r\n").removeprefix("\ufeff")
            if not text.strip():
                return [Skipped(source, "blank_line")]
            return parse(source, text, *args, **kwargs)

        return wrapper

    return decorate


# ------------------------------------------------------------------ Beam plumbing


def read_lines(
    pipeline: beam.Pipeline, paths: Sequence[str], label: str, skip_header_lines: int = 0
) -> beam.PCollection:
    """Reads text files as ``(path, raw bytes line)`` pairs, line breaks stripped.

    Lines stay bytes so that the parsers detect bad encoding themselves.
    """
    return (
        pipeline
        | f"{label}/Files" >> beam.Create(list(paths))
        | f"{label}/Read"
        >> ReadAllFromText(
            coder=BytesCoder(), with_filename=True, skip_header_lines=skip_header_lines
        )
    )


def row_outcome(results: Sequence[ParseResult]) -> str:
    """The outcome of one raw row from its parse results: ``accepted``, ``rejected`` or ``skipped``.

    Raises:
        ValueError: the results break the contract (none, or a ``Rejected`` or
            ``Skipped`` mixed with anything else): a bug in a parser.
    """
    kinds = [
        REJECTED if isinstance(r, Rejected) else SKIPPED if isinstance(r, Skipped) else ACCEPTED
        for r in results
    ]
    if kinds and (set(kinds) == {ACCEPTED} or kinds in ([REJECTED], [SKIPPED])):
        return kinds[0]
    raise ValueError(f"parser results break the one-outcome-per-row contract: {shown(results)}")


class _RouteDoFn(beam.DoFn):
    """Parses ``(source, raw)`` rows; routes results to tagged outputs; counts rows."""

    def __init__(self, parse: Callable[[str, Any], List[ParseResult]], namespace: str):
        self._parse = parse
        self._namespace = namespace

    def setup(self) -> None:
        counter = functools.partial(beam.metrics.Metrics.counter, self._namespace)
        self._rows = counter("rows_read")
        self._outcomes = {name: counter(f"rows_{name}") for name in (ACCEPTED, REJECTED, SKIPPED)}

    def process(self, element: tuple):
        source, raw = element
        results = self._parse(source, raw)
        self._rows.inc()
        outcome = row_outcome(results)
        self._outcomes[outcome].inc()
        if outcome == ACCEPTED:
            yield beam.pvalue.TaggedOutput(ACCEPTED, 1)
        for result in results:
            if isinstance(result, Interaction):
                yield result
            elif isinstance(result, Rejected):
                yield beam.pvalue.TaggedOutput(REJECTED, result)
            elif isinstance(result, Skipped):
                yield beam.pvalue.TaggedOutput(SKIPPED, result)
            else:
                yield beam.pvalue.TaggedOutput(ITEMS, result)


def parse_rows(
    rows: beam.PCollection, parse: Callable[[str, Any], List[ParseResult]], label: str
) -> SourceOutputs:
    """Applies ``parse`` to ``(source, raw)`` rows and splits the results by type.

    Args:
        rows: ``(source, raw)`` pairs, one per raw row.
        parse: pure function returning the results of one row: ``Interaction``
            rows go to ``interactions``, ``Rejected``/``Skipped`` to their
            outputs, anything else (``ItemCategory``) to ``item_categories``.
        label: unique label prefix; also the namespace of the row counters.

    Returns:
        The outputs of these rows; ``rows_read`` counts ``rows`` (independently
        of the parser) and ``accepted_rows`` the rows accepted.
    """
    parsed = rows | f"{label}/Parse" >> beam.ParDo(_RouteDoFn(parse, label)).with_outputs(
        ITEMS, REJECTED, SKIPPED, ACCEPTED, main="interactions"
    )
    count = rows | f"{label}/CountRows" >> beam.combiners.Count.Globally()
    accepted = parsed[ACCEPTED] | f"{label}/CountAccepted" >> beam.combiners.Count.Globally()
    return SourceOutputs(
        parsed.interactions, parsed[ITEMS], parsed[REJECTED], parsed[SKIPPED], count, accepted
    )


def merge_outputs(
    pipeline: beam.Pipeline, parts: Sequence[SourceOutputs], label: str
) -> SourceOutputs:
    """Flattens the outputs of several inputs into one ``SourceOutputs`` (counts summed)."""

    def merge(name: str) -> beam.PCollection:
        pcolls = tuple(getattr(part, name) for part in parts)
        if not pcolls:
            empty = pipeline | f"{label}/Empty{name}" >> beam.Create([])
            if name not in COUNT_FIELDS:
                return empty
            return empty | f"{label}/Zero{name}" >> beam.CombineGlobally(sum)
        merged = pcolls | f"{label}/Flatten{name}" >> beam.Flatten(pipeline=pipeline)
        if name in COUNT_FIELDS:
            merged = merged | f"{label}/Sum{name}" >> beam.CombineGlobally(sum)
        return merged

    return SourceOutputs(*(merge(name) for name in SourceOutputs._fields))


# ------------------------------------------------------------------------ dispatch

# name -> (module, Beam read function); each module also has ``locate(input)``.
_MODULES = {
    "ml1m": ("preprocessing.sources.ml1m", "read_ml1m"),
    "kuairand": ("preprocessing.sources.kuairand", "read_kuairand"),
    "sequences": ("preprocessing.sources.sequences", "read_sequences"),
    "csv": ("preprocessing.sources.tabular", "read_tabular"),
}


def _source_module(name: str) -> Any:
    if name not in _MODULES:
        raise ValueError(f"unknown source {name!r}; expected one of {sorted(_MODULES)}")
    return importlib.import_module(_MODULES[name][0])


def read_source(pipeline: beam.Pipeline, config: SourceConfig) -> SourceOutputs:
    """Adds the reading of ``config``'s source to ``pipeline``.

    Raises:
        InputError: the input path is missing or empty.
        ValueError: the source name is unknown.
    """
    if config.name == "synthetic":
        from preprocessing.sources.synthetic import read_synthetic

        return read_synthetic(pipeline, config.synthetic)
    module = _source_module(config.name)
    check_input(config)
    return getattr(module, _MODULES[config.name][1])(pipeline, config)
