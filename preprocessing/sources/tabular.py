"""Generic tabular source (``--source csv``): CSV and Parquet files.

Input: a file, a directory (its ``*.csv``, ``*.csv.gz`` and ``*.parquet``
files) or a glob. Files ending in ``.parquet`` are read as Parquet, others as
CSV. Files of size 0 are ignored.

CSV: ``user_id,item_id,timestamp[,category]``, standard CSV quoting. The header
row is optional, detected per file: a first line equal to the column names
(``user_id,item_id,timestamp`` or ``user_id,item_id,timestamp,category``) is a
header and not a row. An empty ``category`` means none.

Parquet: columns ``user_id``, ``item_id``, ``timestamp`` and optionally
``category`` (other columns ignored; a file lacking a required column raises
``InputError``). Values are turned into text (integers and integral floats as
integers, null/NaN as empty) and validated exactly like CSV fields.

``SourceConfig.min_rating`` does not apply: these files carry no rating.

Rejection reasons: ``bad_encoding``, ``bad_csv``, ``wrong_field_count``,
``empty_id``, ``invalid_id``, ``non_integer_timestamp``, ``invalid_category``
(control characters). Blank lines are ``Skipped``. A file that cannot be opened,
decompressed (a ``.gz`` file is decompressed to its end: Beam's reader would stop
silently at a truncated stream) or (Parquet) whose footer cannot be read raises
``InputError`` before the pipeline runs.
"""

from __future__ import annotations

import csv
import math
from typing import Any, Dict, List, Mapping, NamedTuple, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadAllFromParquet

from preprocessing.config import SourceConfig
from preprocessing.records import Interaction, ParseResult
from preprocessing.sources.common import (
    InputError,
    RowError,
    SourceOutputs,
    check_gzip_complete,
    header_names,
    is_dir,
    is_glob,
    match_files,
    merge_outputs,
    nonempty_files,
    parse_rows,
    quarantining,
    read_first_line,
    read_lines,
    require_category,
    require_field_count,
    require_id,
    require_int,
    text_row_parser,
)

COLUMNS = ("user_id", "item_id", "timestamp", "category")
REQUIRED = COLUMNS[:3]
DIRECTORY_GLOBS = ("*.csv", "*.csv.gz", "*.parquet")


class TabularFiles(NamedTuple):
    """Matched files: CSV paths with their header flag, Parquet paths with their columns."""

    csv: Dict[str, bool]
    parquet: Dict[str, Tuple[str, ...]]


def has_header(path: str) -> bool:
    """Whether the first line of a CSV file is the header (the column names)."""
    names = tuple(header_names(read_first_line(path)))
    return names in (REQUIRED, COLUMNS)


def parquet_columns(path: str) -> Tuple[str, ...]:
    """The columns to read from a Parquet file.

    Raises:
        InputError: the file is not readable Parquet, or a required column is missing.
    """
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            names = pq.read_schema(handle).names
    except (OSError, pa.ArrowException) as error:
        raise InputError(path, f"not a readable Parquet file ({error})") from None
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise InputError(path, f"Parquet columns {names} lack {missing}")
    return tuple(name for name in COLUMNS if name in names)


def locate(input_path: str) -> TabularFiles:
    """Finds the CSV and Parquet files of ``input_path``; detects CSV headers.

    Raises:
        InputError: nothing matches, every file is empty, or a Parquet file lacks columns.
    """
    if is_dir(input_path):
        matched = [f for g in DIRECTORY_GLOBS for f in match_files(FileSystems.join(input_path, g))]
    else:
        matched = match_files(input_path)
    what = "CSV/Parquet file" + (" matching the glob" if is_glob(input_path) else "")
    paths = sorted(set(nonempty_files(matched, input_path, what)))
    for path in paths:
        if path.endswith(".gz"):
            check_gzip_complete(path)
    return TabularFiles(
        {p: has_header(p) for p in paths if not p.endswith(".parquet")},
        {p: parquet_columns(p) for p in paths if p.endswith(".parquet")},
    )


def interaction_from_fields(fields: Sequence[str]) -> Interaction:
    """Validates ``user_id, item_id, timestamp[, category]`` text fields.

    Raises:
        RowError: a field is invalid.
    """
    require_field_count(fields, (3, 4), "user_id,item_id,timestamp[,category]")
    user_id = require_id(fields[0], "user_id")
    item_id = require_id(fields[1], "item_id")
    timestamp = require_int(fields[2], "timestamp", reason="non_integer_timestamp")
    category = require_category(fields[3], "category") if len(fields) == 4 else ""
    return Interaction(user_id, item_id, timestamp, category or None)


@text_row_parser("utf-8")
def parse_csv_line(source: str, text: str) -> List[ParseResult]:
    """Parses one raw CSV line (bytes) into an ``Interaction``.

    Returns:
        One ``Interaction`` or ``Rejected`` (blank lines: ``Skipped``).
    """
    try:
        fields = next(csv.reader([text], strict=True))
    except csv.Error as error:
        raise RowError("bad_csv", str(error)) from None
    return [interaction_from_fields(fields)]


def _value_text(value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RowError("bad_encoding", f"{column} is not utf-8: {error.reason}") from None
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
    return str(value)


@quarantining
def parse_parquet_record(source: str, record: Mapping[str, Any]) -> List[ParseResult]:
    """Validates one Parquet record (a dict of column values) like a CSV row.

    Returns:
        One ``Interaction`` or ``Rejected``.
    """
    columns = [c for c in COLUMNS if c in record]
    return [interaction_from_fields([_value_text(record[c], c) for c in columns])]


def read_tabular(pipeline: beam.Pipeline, config: SourceConfig) -> SourceOutputs:
    """Adds the reading of CSV/Parquet interaction files to ``pipeline``.

    Raises:
        InputError: the input is missing or empty, or a Parquet file lacks columns.
    """
    files = locate(config.input)
    parts = []
    for header in (False, True):
        paths = sorted(p for p, flag in files.csv.items() if flag == header)
        if paths:
            label = "csv/Headed" if header else "csv/Plain"
            lines = read_lines(pipeline, paths, label, skip_header_lines=int(header))
            parts.append(parse_rows(lines, parse_csv_line, label))
    for columns in sorted(set(files.parquet.values())):
        paths = sorted(p for p, cols in files.parquet.items() if cols == columns)
        label = f"csv/Parquet[{','.join(columns)}]"
        records = (
            pipeline
            | f"{label}/Files" >> beam.Create(paths)
            | f"{label}/Read" >> ReadAllFromParquet(columns=list(columns), with_filename=True)
        )
        parts.append(parse_rows(records, parse_parquet_record, label))
    return merge_outputs(pipeline, parts, "csv")
