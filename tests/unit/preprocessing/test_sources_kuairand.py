"""Tests of the KuaiRand source, with generated logs and the real item table."""

from __future__ import annotations

import pytest

from preprocessing.config import SourceConfig
from preprocessing.records import Interaction, ItemCategory, Skipped
from preprocessing.sources.common import InputError, check_input
from preprocessing.sources.kuairand import LOG_HEADER, parse_log_line, parse_video_line
from tests.unit.preprocessing.test_sources_common import SHARED_DATA, reasons, run_source

ITEM_TABLE = SHARED_DATA / "kuairand-pure-items" / "video_features_basic_pure.csv"
COLUMNS = {name: i for i, name in enumerate(LOG_HEADER)}


def log_row(user="u1", video="v1", time_ms="1649400000000", click="1", tab="1") -> bytes:
    values = dict.fromkeys(LOG_HEADER, "0")
    values.update(user_id=user, video_id=video, time_ms=time_ms, is_click=click, tab=tab)
    return ",".join(values[name] for name in LOG_HEADER).encode()


LOG_ROWS = [
    log_row("u1", "0", "1000"),
    log_row("u1", "1", "1001", click="0"),
    log_row("u2", "2", "1002", tab="2"),
    log_row("u3", "3", "10:02"),
    b"u4,5,20220408",
    log_row("", "0"),
    log_row("u5", "BAD").replace(b"BAD", b"\xff\xfe"),
    log_row("u6", "1", tab="x"),
]


@pytest.fixture
def kuairand_dir(tmp_path):
    """A KuaiRand directory: two logs (second with reordered columns), the real item table."""
    header = ",".join(LOG_HEADER).encode()
    (tmp_path / "log_standard_pure.csv").write_bytes(b"\n".join([header, *LOG_ROWS]) + b"\n")
    (tmp_path / "log_random_pure.csv").write_bytes(
        b"tab,user_id,video_id,time_ms,is_click\n1,u9,5,7,1\n"
    )
    (tmp_path / "user_features_pure.csv").write_bytes(b"user_id,x\n")  # ignored
    if ITEM_TABLE.exists():
        (tmp_path / "video_features_basic_pure.csv").symlink_to(ITEM_TABLE)
    return tmp_path


def test_parse_log_line_policies():
    assert parse_log_line("f", log_row(), COLUMNS) == [Interaction("u1", "v1", 1649400000000)]
    assert parse_log_line("f", log_row(tab="4"), COLUMNS) == [Skipped("f", "other_tab")]
    assert parse_log_line("f", log_row(tab="4"), COLUMNS, tab=None) == [
        Interaction("u1", "v1", 1649400000000)
    ]
    assert parse_log_line("f", log_row(click="0"), COLUMNS) == [Skipped("f", "not_clicked")]
    assert parse_log_line("f", log_row(click="0"), COLUMNS, require_click=False)[0].item_id == "v1"
    assert [r.reason for r in parse_log_line("f", b'u,"v', COLUMNS)] == ["bad_csv"]


def test_parse_video_line_tag_is_category():
    columns = {"video_id": 0, "tag": 1}
    assert parse_video_line("f", b'5,"20,43"', columns) == [ItemCategory("5", "20,43")]
    assert parse_video_line("f", b"5,", columns) == [Skipped("f", "no_category")]
    assert parse_video_line("f", b"5,nan", columns) == [Skipped("f", "no_category")]


def test_read_kuairand_with_real_item_table(kuairand_dir):
    if not ITEM_TABLE.exists():
        pytest.skip(f"real KuaiRand item table absent: {ITEM_TABLE}")
    out = run_source(SourceConfig(name="kuairand", input=str(kuairand_dir)))
    assert sorted(out["interactions"]) == [Interaction("u1", "0", 1000), Interaction("u9", "5", 7)]
    assert reasons(out["rejected"]) == {
        "non_integer_timestamp": 1,
        "wrong_field_count": 1,
        "empty_id": 1,
        "bad_encoding": 1,
        "bad_value": 1,
    }
    assert reasons(out["skipped"]) == {"not_clicked": 1, "other_tab": 1, "no_category": 96}
    assert len(out["item_categories"]) == 7583 - 96
    categories = dict(out["item_categories"])
    assert categories["0"] == "39" and categories["5"] == "20,43"
    assert len(set(categories.values())) == 110  # 111 tag values, one of them empty
    assert out["rows_read"] == len(LOG_ROWS) + 1 + 7583


def test_read_kuairand_glob_all_tabs_no_click_filter(kuairand_dir):
    config = SourceConfig(
        name="kuairand",
        input=str(kuairand_dir / "log_*.csv"),
        kuairand_tab=None,
        kuairand_require_click=False,
    )
    out = run_source(config)
    assert sorted(i.user_id for i in out["interactions"]) == ["u1", "u1", "u2", "u9"]
    assert out["item_categories"] == [] and out["skipped"] == []
    assert out["rows_read"] == len(LOG_ROWS) + 1


def test_bad_header_is_an_input_error(tmp_path):
    (tmp_path / "log_a.csv").write_bytes(b"user_id,video_id,time_ms,is_click\nu,v,1,1\n")
    with pytest.raises(InputError, match="tab"):
        check_input(SourceConfig(name="kuairand", input=str(tmp_path)))
