"""Tests of the generic CSV/Parquet source (``--source csv``)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preprocessing.config import SourceConfig
from preprocessing.records import Interaction, Skipped
from preprocessing.sources.common import InputError, check_input
from preprocessing.sources.tabular import has_header, locate, parse_csv_line, parse_parquet_record
from tests.unit.preprocessing.test_sources_common import FIXTURES, reasons, run_source

CSV_DIR = FIXTURES / "csv"
COLUMNS_WITH_CATEGORY = ("user_id", "item_id", "timestamp", "category")
FIXTURE_ROWS = [
    Interaction("u1", "i1", 100),
    Interaction("u1", "i2", 101, "catA"),
    Interaction("u2", "i1", 5),
    Interaction("u3", "i,3", 7, "cat,B"),
]


def test_parse_csv_line():
    assert parse_csv_line("f", b"u,i,3, c \r\n") == [Interaction("u", "i", 3, "c")]
    assert parse_csv_line("f", b"\n") == [Skipped("f", "blank_line")]
    for line, reason in [
        (b"u,i", "wrong_field_count"),
        (b"u,i,1,c,extra", "wrong_field_count"),
        (b"u,i,1.5", "non_integer_timestamp"),
        (b",i,1", "empty_id"),
        (b"u\x01,i,1", "invalid_id"),
        (b"u,\xff\xfe,1", "bad_encoding"),
        (b'u,"i,1', "bad_csv"),
    ]:
        (rejected,) = parse_csv_line("f", line)
        assert rejected.reason == reason, line


def test_parse_parquet_record_converts_values_like_csv():
    record = {"user_id": 7, "item_id": "i", "timestamp": 3.0, "category": None}
    assert parse_parquet_record("p", record) == [Interaction("7", "i", 3)]
    bad_time = {"user_id": "u", "item_id": "i", "timestamp": 1.5}
    assert parse_parquet_record("p", bad_time)[0].reason == "non_integer_timestamp"
    assert parse_parquet_record("p", {**bad_time, "timestamp": None})[0].reason == (
        "non_integer_timestamp"
    )
    assert parse_parquet_record("p", {**bad_time, "user_id": None})[0].reason == "empty_id"


def test_header_detection():
    assert has_header(str(CSV_DIR / "headed.csv"))
    assert not has_header(str(CSV_DIR / "plain.csv"))


def test_read_csv_directory_with_optional_headers():
    out = run_source(SourceConfig(name="csv", input=str(CSV_DIR)))
    assert sorted(out["interactions"]) == sorted(FIXTURE_ROWS)
    assert reasons(out["rejected"]) == {"wrong_field_count": 1}
    assert out["rows_read"] == 5  # the header is not a row


@pytest.fixture
def mixed_dir(tmp_path):
    """A directory with a malformed CSV and a Parquet file."""
    (tmp_path / "bad.csv").write_bytes(
        b"user_id,item_id,timestamp\nu1,i1,1\nu1,i2,x\n,i3,3\nu2,\xff\xfe,4\n\n"
    )
    table = pa.table(
        {
            "user_id": pa.array([1, 2, None], pa.int64()),
            "item_id": ["a", "b", "c"],
            "timestamp": pa.array([10.0, 2.5, 30.0]),
            "category": ["x", None, "z"],
            "extra": [0, 0, 0],
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    return tmp_path


def test_read_csv_and_parquet(mixed_dir):
    assert set(locate(str(mixed_dir)).parquet.values()) == {COLUMNS_WITH_CATEGORY}
    out = run_source(SourceConfig(name="csv", input=str(mixed_dir)))
    assert sorted(out["interactions"]) == [
        Interaction("1", "a", 10, "x"),
        Interaction("u1", "i1", 1),
    ]
    assert reasons(out["rejected"]) == {
        "non_integer_timestamp": 2,  # "x" in CSV, 2.5 in Parquet
        "empty_id": 2,  # empty CSV field, null Parquet value
        "bad_encoding": 1,
    }
    assert reasons(out["skipped"]) == {"blank_line": 1}
    assert out["rows_read"] == 5 + 3


def test_parquet_glob_without_category(tmp_path):
    table = pa.table({"user_id": ["u"], "item_id": ["i"], "timestamp": pa.array([5], pa.int32())})
    pq.write_table(table, tmp_path / "a.parquet")
    out = run_source(SourceConfig(name="csv", input=str(tmp_path / "*.parquet")))
    assert out["interactions"] == [Interaction("u", "i", 5)]
    assert out["rows_read"] == 1


def test_parquet_without_required_column_is_an_input_error(tmp_path):
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["i"]}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match="timestamp"):
        check_input(SourceConfig(name="csv", input=str(tmp_path)))
