"""Sequence-file source (``--source sequences``), e.g. the S3-Rec Amazon/LastFM files.

Input: ``NAME.txt``, or a directory holding exactly one ``*.txt``. One user per
line: ``user_id item_1 item_2 ...``, items in chronological order, separated by
single spaces. There are no timestamps: an item's timestamp is its position in
the line (0, 1, 2, ...). Each line is one raw row; an accepted line yields one
``Interaction`` per item. A line with any bad token (empty token from a double
space, whitespace or control characters) is quarantined whole; a line with a
user id but no item is rejected as ``no_items``. A user appearing on two lines
is not detected here.

Item categories: the optional ``NAME_item2attributes.json`` next to the
``.txt`` (``{"item_id": [attr, ...]}``; for Amazon brand then sub-categories, for
LastFM tags). Each JSON entry is one raw row. Category rule: an item's category
is the attribute of its list with the highest corpus-wide frequency, i.e. the
number of items of the JSON file carrying it (an attribute repeated in one list
counts once); ties go to the smaller attribute id (numeric ids compare as
numbers and before non-numeric ones, which compare lexicographically). Broad
sub-categories, shared by many items, thus win over brands. An item with an
empty list is ``Skipped`` (``no_category``).

Rejection reasons: ``bad_encoding``, ``empty_id``, ``invalid_id``, ``no_items``
(lines); ``bad_json`` (whole file unparsable, or nested too deeply: one row),
``bad_value`` (an attribute list that is not a list of non-empty printable
strings/integers), ``duplicate_id`` (an item id repeated in the JSON object: the
first entry is used, each later one is quarantined) (JSON entries). Both files
are probed before the pipeline runs: an unreadable one raises ``InputError``.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from preprocessing.config import SourceConfig
from preprocessing.records import Interaction, ItemCategory, ParseResult, Skipped, shown
from preprocessing.sources.common import (
    InputError,
    RowError,
    SourceOutputs,
    is_dir,
    match_files,
    merge_outputs,
    nonempty_files,
    parse_rows,
    quarantining,
    read_first_line,
    read_lines,
    require_id,
    text_row_parser,
)

ATTRIBUTES_SUFFIX = "_item2attributes.json"


class SequenceFiles(NamedTuple):
    """The sequence file and its optional item2attributes JSON (or None)."""

    sequences: str
    attributes: Optional[str]


class ItemAttributes(NamedTuple):
    """The attributes of one item, before the category is chosen."""

    item_id: str
    attributes: Tuple[str, ...]


def locate(input_path: str) -> SequenceFiles:
    """Finds the ``.txt`` file of ``input_path`` and its optional attributes JSON.

    Raises:
        InputError: missing, no or several ``*.txt`` in the directory, or empty.
    """
    if is_dir(input_path):
        txt = match_files(FileSystems.join(input_path, "*.txt"))
    else:
        txt = match_files(input_path)
    if len(txt) > 1:
        names = [posixpath.basename(f.path) for f in txt]
        raise InputError(input_path, f"expected exactly one *.txt, found {names}")
    (path,) = nonempty_files(txt, input_path, "sequence file (*.txt)")
    stem = path[: -len(".txt")] if path.endswith(".txt") else path
    attributes = [f.path for f in match_files(stem + ATTRIBUTES_SUFFIX) if f.size > 0]
    for probed in [path, *attributes]:
        read_first_line(probed)  # InputError if unreadable
    return SequenceFiles(path, attributes[0] if attributes else None)


@text_row_parser("utf-8")
def parse_sequence_line(source: str, text: str) -> List[ParseResult]:
    """Parses one raw line (bytes) ``user item_1 item_2 ...`` into interactions.

    Returns:
        One ``Interaction`` per item (timestamp = position), or one ``Rejected``.
    """
    tokens = text.strip().split(" ")
    user_id = require_id(tokens[0], "user id")
    items = [require_id(token, f"item {position}") for position, token in enumerate(tokens[1:])]
    if not items:
        raise RowError("no_items", f"user {shown(user_id)} has no item")
    return [Interaction(user_id, item, position) for position, item in enumerate(items)]


class AttributeEntry(NamedTuple):
    """One entry of an item2attributes object, as read (before validation).

    Attributes:
        item_id: the JSON key.
        attributes: the JSON value (anything).
        duplicate: the key already appeared earlier in the object.
    """

    item_id: str
    attributes: Any
    duplicate: bool = False


class _Pairs(list):
    """A JSON object kept as its ``(key, value)`` pairs, so repeated keys are seen."""


def _parse_json(raw: bytes) -> Any:
    """``raw`` parsed as UTF-8 JSON with objects as ``_Pairs``.

    Raises:
        RowError: ``bad_encoding`` or ``bad_json`` (syntax, or nested too deeply).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RowError("bad_encoding", f"not utf-8: {error.reason}") from None
    try:
        return json.loads(text, object_pairs_hook=_Pairs)
    except RecursionError:
        raise RowError("bad_json", "nested too deeply") from None
    except ValueError as error:
        raise RowError("bad_json", str(error)) from None


def load_attribute_entries(path: str) -> Iterator[Tuple[str, Any]]:
    """Yields ``(path, AttributeEntry)`` per JSON entry (repeated keys included), or
    ``(path, raw bytes)`` once if the file is not a UTF-8 JSON object."""
    with FileSystems.open(path) as handle:
        raw = handle.read()
    try:
        data = _parse_json(raw)
    except RowError:
        data = None
    if not isinstance(data, _Pairs):
        yield path, raw
        return
    seen = set()
    for item_id, attributes in data:
        yield path, AttributeEntry(item_id, attributes, item_id in seen)
        seen.add(item_id)


def _attribute(value: Any, item_id: str) -> str:
    text = str(value).strip() if isinstance(value, (int, str)) else ""
    if isinstance(value, bool) or not text or not text.isprintable():
        raise RowError("bad_value", f"item {shown(item_id)}: attribute {shown(value)} is not an id")
    return text


@quarantining
def parse_attribute_entry(source: str, entry: Any) -> List[Any]:
    """Validates one entry of an item2attributes file.

    Args:
        source: the JSON file.
        entry: an ``AttributeEntry`` (or a plain ``(item_id, attributes)``
            pair), or the file's raw bytes if unparsable.

    Returns:
        One ``ItemAttributes`` (distinct attributes, in order), ``Skipped``
        (``no_category``) or ``Rejected``.
    """
    if isinstance(entry, bytes):
        _parse_json(entry)  # raises the precise RowError
        raise RowError("bad_json", "the top level is not an object")
    item_id = require_id(entry[0], "item id")
    values = entry[1]
    if len(entry) > 2 and entry[2]:
        raise RowError("duplicate_id", f"item {shown(item_id)} repeats an earlier key")
    if isinstance(values, _Pairs) or not isinstance(values, list):
        detail = f"item {shown(item_id)}: attributes {shown(values)} are not a list"
        raise RowError("bad_value", detail)
    attributes = tuple(dict.fromkeys(_attribute(v, item_id) for v in values))
    if not attributes:
        return [Skipped(source, "no_category")]
    return [ItemAttributes(item_id, attributes)]


def attribute_frequencies(items: Iterable[ItemAttributes]) -> Dict[str, int]:
    """Number of items carrying each attribute."""
    counts: Dict[str, int] = {}
    for item in items:
        for attribute in set(item.attributes):
            counts[attribute] = counts.get(attribute, 0) + 1
    return counts


def _attribute_order(attribute: str) -> Tuple[int, int, str]:
    if attribute.isdigit():
        return (0, int(attribute), attribute)
    return (1, 0, attribute)


def choose_category(item: ItemAttributes, frequencies: Mapping[str, int]) -> ItemCategory:
    """The item's most frequent attribute; ties go to the smaller id (see module doc)."""
    best = min(item.attributes, key=lambda a: (-frequencies.get(a, 0), _attribute_order(a)))
    return ItemCategory(item.item_id, best)


def read_sequences(pipeline: beam.Pipeline, config: SourceConfig) -> SourceOutputs:
    """Adds the reading of a sequence file (and item attributes) to ``pipeline``.

    Raises:
        InputError: the input is missing or empty.
    """
    files = locate(config.input)
    lines = read_lines(pipeline, [files.sequences], "sequences/Lines")
    parts = [parse_rows(lines, parse_sequence_line, "sequences")]
    if files.attributes:
        entries = (
            pipeline
            | "sequences/AttributeFile" >> beam.Create([files.attributes])
            | "sequences/AttributeEntries" >> beam.FlatMap(load_attribute_entries)
        )
        attrs = parse_rows(entries, parse_attribute_entry, "sequences/attributes")
        frequencies = (
            attrs.item_categories
            | "sequences/DistinctAttributes" >> beam.FlatMap(lambda item: set(item.attributes))
            | "sequences/CountAttributes" >> beam.combiners.Count.PerElement()
        )
        categories = attrs.item_categories | "sequences/ChooseCategory" >> beam.Map(
            choose_category, beam.pvalue.AsDict(frequencies)
        )
        parts.append(attrs._replace(item_categories=categories))
    return merge_outputs(pipeline, parts, "sequences")
