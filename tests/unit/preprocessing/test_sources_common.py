"""Tests of the shared source plumbing: validation helpers, input checks, dispatch.

``run_source`` is imported by the other ``test_sources_*`` modules.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import types
from collections import Counter
from typing import Dict, List

import apache_beam as beam
import pytest

from preprocessing.config import SourceConfig, SyntheticConfig
from preprocessing.records import Interaction, Rejected, Skipped
from preprocessing.sources import common
from preprocessing.sources.common import InputError, RowError, check_input, read_source

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "sources"
SHARED_DATA = pathlib.Path(__file__).resolve().parents[4] / "shared" / "data"

_RESULTS: Dict[str, Dict[str, list]] = {}
_KEYS = itertools.count()


def _store(key: str, name: str):
    def store(values: list) -> None:
        _RESULTS.setdefault(key, {})[name] = values

    return store


def run_source(config: SourceConfig) -> Dict[str, list]:
    """Runs ``read_source`` on the in-process DirectRunner; returns every output as a list.

    Also checks the row invariant: accepted + skipped + rejected rows = rows read
    (each row yields one result, except sequence lines, counted once per line).
    """
    key = f"run{next(_KEYS)}"
    with beam.Pipeline(runner="DirectRunner") as pipeline:
        outputs = read_source(pipeline, config)
        for name, pcoll in zip(outputs._fields, outputs, strict=True):
            _ = (
                pcoll
                | f"ToList/{name}" >> beam.combiners.ToList()
                | f"Store/{name}" >> beam.Map(_store(key, name))
            )
    results = _RESULTS.pop(key)
    (rows_read,) = results["rows_read"]
    results["rows_read"] = rows_read
    if config.name == "sequences":  # one accepted line = one interaction at position 0
        accepted = sum(1 for i in results["interactions"] if i.timestamp == 0)
    else:
        accepted = len(results["interactions"])
    accepted += len(results["item_categories"])
    assert accepted + len(results["skipped"]) + len(results["rejected"]) == rows_read
    return results


def reasons(rows: List) -> Counter:
    """Counter of the ``reason`` of Rejected/Skipped rows."""
    return Counter(row.reason for row in rows)


def test_require_id_strips_and_validates():
    assert common.require_id("  u1 ", "user") == "u1"
    with pytest.raises(RowError, match="empty_id"):
        common.require_id("   ", "user")
    with pytest.raises(RowError, match="invalid_id"):
        common.require_id("a b", "user")
    with pytest.raises(RowError, match="invalid_id"):
        common.require_id("a\x00", "user")


def test_require_int_and_float():
    assert common.require_int(" -12 ", "t") == -12
    for bad in ("1.5", "1e3", "", "1_000", "+1", str(2**63)):
        with pytest.raises(RowError) as caught:
            common.require_int(bad, "t", reason="non_integer_timestamp")
        assert caught.value.reason == "non_integer_timestamp"
    assert common.require_float("4.5", "r") == 4.5
    for bad in ("x", "nan", "inf"):
        with pytest.raises(RowError, match="bad_rating"):
            common.require_float(bad, "r", reason="bad_rating")


def test_text_row_parser_quarantines_encoding_blank_and_errors():
    @common.text_row_parser("utf-8")
    def parse(source, text):
        if text == "boom":
            raise RowError("bad_value", "boom")
        return [Interaction("u", text, 0)]

    assert parse("f", b"caf\xc3\xa9\r\n") == [Interaction("u", "caf\u00e9", 0)]
    assert parse("f", b"  ") == [Skipped("f", "blank_line")]
    (bad,) = parse("f", b"a\xff\xfe")
    assert (bad.reason, bad.raw) == ("bad_encoding", "a\\xff\\xfe")
    assert parse("f", b"boom") == [Rejected("f", "bad_value", "boom", "boom")]


@pytest.mark.parametrize("name", ["ml1m", "kuairand", "sequences", "csv"])
def test_missing_input_raises_input_error(tmp_path, name):
    missing = str(tmp_path / "absent")
    with pytest.raises(InputError) as caught:
        check_input(SourceConfig(name=name, input=missing))
    assert caught.value.path == missing
    with pytest.raises(InputError):
        read_source(beam.Pipeline(), SourceConfig(name=name, input=missing))


@pytest.mark.parametrize(
    "name,files",
    [
        ("ml1m", ["ratings.dat", "movies.dat"]),
        ("kuairand", ["log_a.csv", "log_b.csv"]),
        ("sequences", ["Beauty.txt"]),
        ("csv", ["a.csv", "b.parquet"]),
    ],
)
def test_empty_or_wrong_directory_raises_input_error(tmp_path, name, files):
    config = SourceConfig(name=name, input=str(tmp_path))
    with pytest.raises(InputError, match="no "):
        check_input(config)  # directory without the expected files
    (tmp_path / "unrelated.json").write_text("{}")
    for file in files:
        (tmp_path / file).write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        check_input(config)  # every expected file has size 0


def test_glob_matching_nothing_raises_input_error(tmp_path):
    for name in ("kuairand", "csv"):
        with pytest.raises(InputError, match="no "):
            check_input(SourceConfig(name=name, input=str(tmp_path / "*.csv")))


def test_sequences_directory_with_two_txt_is_ambiguous(tmp_path):
    (tmp_path / "a.txt").write_text("u1 1\n")
    (tmp_path / "b.txt").write_text("u1 1\n")
    with pytest.raises(InputError, match="exactly one"):
        check_input(SourceConfig(name="sequences", input=str(tmp_path)))


def test_unknown_source_name_is_a_value_error():
    fake = types.SimpleNamespace(name="bogus", input="x")
    with pytest.raises(ValueError, match="bogus"):
        check_input(fake)
    with pytest.raises(ValueError, match="bogus"):
        read_source(beam.Pipeline(), fake)


def test_synthetic_dispatch_imports_lazily():
    if not os.path.exists(os.path.join(os.path.dirname(common.__file__), "synthetic.py")):
        pytest.skip("preprocessing/sources/synthetic.py is not written yet")
    config = SourceConfig(name="synthetic", synthetic=SyntheticConfig(10, 5, 2, 3))
    check_input(config)  # no input to check
    outputs = read_source(beam.Pipeline(), config)  # graph only, not run
    assert isinstance(outputs, common.SourceOutputs)
