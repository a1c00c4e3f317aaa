"""KuaiRand source (``--source kuairand``).

Input: a directory, or a glob, holding the interaction logs ``log_*.csv`` and,
optionally, the item table ``video_features_basic*.csv``; other matched files
(user features, statistics) are ignored. In a directory, only files directly
inside it are used. Every ``log_*.csv`` is read, the random-exposure logs too.

Headers: every file must start with a header line; columns are mapped by name
(any order, extra columns ignored). A log header lacking ``user_id``,
``video_id``, ``time_ms``, ``is_click`` or ``tab``, or an item header lacking
``video_id`` or ``tag``, raises ``InputError`` before the pipeline runs.

Rules:
    * timestamp = ``time_ms``;
    * rows with ``tab != SourceConfig.kuairand_tab`` are ``Skipped`` (``other_tab``),
      unless it is None; then, if ``kuairand_require_click``, rows with
      ``is_click != 1`` are ``Skipped`` (``not_clicked``);
    * the category of a video is its ``tag`` value verbatim (e.g. ``39`` or the
      multi-tag ``20,43``, 111 values in KuaiRand-Pure); an empty or ``nan``
      tag is ``Skipped`` (``no_category``).

Rejection reasons: ``bad_encoding``, ``bad_csv`` (unparsable quoting),
``wrong_field_count``, ``empty_id``, ``invalid_id``, ``non_integer_timestamp``,
``bad_value`` (``is_click``/``tab`` not an integer), ``invalid_category`` (a
tag with control characters). Blank lines are ``Skipped``. A field longer than
the ``csv`` module's limit (128 KiB) is ``bad_csv``.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import posixpath
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from preprocessing.config import SourceConfig
from preprocessing.records import Interaction, ItemCategory, ParseResult, Skipped
from preprocessing.sources.common import (
    InputError,
    RowError,
    SourceOutputs,
    header_names,
    is_dir,
    is_glob,
    match_files,
    merge_outputs,
    nonempty_files,
    parse_rows,
    read_first_line,
    read_lines,
    require_category,
    require_field_count,
    require_id,
    require_int,
    text_row_parser,
)

LOG_GLOB, ITEM_GLOB = "log_*.csv", "video_features_basic*.csv"
LOG_HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,"
    "is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,"
    "is_profile_enter,is_rand,tab"
).split(",")
ITEM_HEADER = (
    "video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,"
    "server_width,server_height,music_id,music_type,tag"
).split(",")
LOG_REQUIRED = ("user_id", "video_id", "time_ms", "is_click", "tab")
ITEM_REQUIRED = ("video_id", "tag")

Columns = Mapping[str, int]  # column name -> position


class KuaiRandFiles(NamedTuple):
    """Matched files with their column maps: ``{path: {name: position}}``."""

    logs: Dict[str, Dict[str, int]]
    items: Dict[str, Dict[str, int]]


def read_columns(path: str, required: Sequence[str]) -> Dict[str, int]:
    """Maps the header names of ``path`` to positions.

    Raises:
        InputError: a required column is missing or a name is repeated.
    """
    names = header_names(read_first_line(path))
    missing = [name for name in required if name not in names]
    if missing:
        raise InputError(path, f"header {names} lacks the columns {missing}")
    if len(set(names)) != len(names):
        raise InputError(path, f"header {names} repeats a column")
    return {name: position for position, name in enumerate(names)}


def locate(input_path: str) -> KuaiRandFiles:
    """Finds the logs and item tables of ``input_path`` and reads their headers.

    Raises:
        InputError: nothing matches, no ``log_*.csv``, all logs empty, or a bad header.
    """
    if is_glob(input_path):
        matched = match_files(input_path)
    elif is_dir(input_path):
        matched = match_files(FileSystems.join(input_path, "*.csv"))
    else:
        raise InputError(input_path, "kuairand input directory not found")

    def named(pattern: str) -> list:
        return [f for f in matched if fnmatch.fnmatch(posixpath.basename(f.path), pattern)]

    logs = nonempty_files(named(LOG_GLOB), input_path, f"KuaiRand log ({LOG_GLOB})")
    items = [f.path for f in named(ITEM_GLOB) if f.size > 0]
    return KuaiRandFiles(
        {path: read_columns(path, LOG_REQUIRED) for path in logs},
        {path: read_columns(path, ITEM_REQUIRED) for path in items},
    )


def _csv_fields(text: str, columns: Columns) -> List[str]:
    try:
        fields = next(csv.reader([text], strict=True))
    except csv.Error as error:
        raise RowError("bad_csv", str(error)) from None
    require_field_count(fields, (len(columns),), "header has")
    return fields


@text_row_parser("utf-8")
def parse_log_line(
    source: str,
    text: str,
    columns: Columns,
    tab: Optional[int] = 1,
    require_click: bool = True,
) -> List[ParseResult]:
    """Parses one raw log line (bytes) into an ``Interaction``.

    Args:
        source: the file the line came from.
        text: the raw line (bytes; the decorator decodes it as UTF-8).
        columns: the file's header, ``{name: position}``.
        tab: keep rows of this ``tab`` (None keeps all).
        require_click: keep only rows with ``is_click == 1``.

    Returns:
        One ``Interaction``, ``Skipped`` (``other_tab``, ``not_clicked``) or ``Rejected``.
    """
    fields = _csv_fields(text, columns)
    user_id = require_id(fields[columns["user_id"]], "user_id")
    item_id = require_id(fields[columns["video_id"]], "video_id")
    timestamp = require_int(fields[columns["time_ms"]], "time_ms", "non_integer_timestamp")
    row_tab = require_int(fields[columns["tab"]], "tab")
    clicked = require_int(fields[columns["is_click"]], "is_click")
    if tab is not None and row_tab != tab:
        return [Skipped(source, "other_tab")]
    if require_click and clicked != 1:
        return [Skipped(source, "not_clicked")]
    return [Interaction(user_id, item_id, timestamp)]


@text_row_parser("utf-8")
def parse_video_line(source: str, text: str, columns: Columns) -> List[ParseResult]:
    """Parses one raw ``video_features_basic`` line (bytes) into an ``ItemCategory``.

    Returns:
        One ``ItemCategory`` (category = ``tag``), ``Skipped`` or ``Rejected``.
    """
    fields = _csv_fields(text, columns)
    item_id = require_id(fields[columns["video_id"]], "video_id")
    tag = require_category(fields[columns["tag"]], "tag")
    if not tag or tag.lower() == "nan":
        return [Skipped(source, "no_category")]
    return [ItemCategory(item_id, tag)]


def _by_file(parse, headers: Mapping[str, Columns], source: str, line: bytes, **kwargs):
    return parse(source, line, headers[source], **kwargs)


def read_kuairand(pipeline: beam.Pipeline, config: SourceConfig) -> SourceOutputs:
    """Adds the reading of KuaiRand logs (and item table) to ``pipeline``.

    Raises:
        InputError: the input is missing, empty or has a bad header.
    """
    files = locate(config.input)
    logs = read_lines(pipeline, sorted(files.logs), "kuairand/Logs", skip_header_lines=1)
    parse_logs = functools.partial(
        _by_file,
        parse_log_line,
        files.logs,
        tab=config.kuairand_tab,
        require_click=config.kuairand_require_click,
    )
    parts = [parse_rows(logs, parse_logs, "kuairand")]
    if files.items:
        items = read_lines(pipeline, sorted(files.items), "kuairand/Items", skip_header_lines=1)
        parse_items = functools.partial(_by_file, parse_video_line, files.items)
        parts.append(parse_rows(items, parse_items, "kuairand/items"))
    return merge_outputs(pipeline, parts, "kuairand")
