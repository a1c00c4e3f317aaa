"""Tests of the sequence-file source and its category rule."""

from __future__ import annotations

import json

import pytest

from preprocessing.config import SourceConfig
from preprocessing.records import Interaction, ItemCategory, Skipped
from preprocessing.sources.sequences import (
    ItemAttributes,
    attribute_frequencies,
    choose_category,
    locate,
    parse_attribute_entry,
    parse_sequence_line,
)
from tests.unit.preprocessing.test_sources_common import FIXTURES, SHARED_DATA, reasons, run_source

TINY = FIXTURES / "sequences"


def test_parse_sequence_line_positions_and_whole_line_quarantine():
    assert parse_sequence_line("s", b"u1 10 20\n") == [
        Interaction("u1", "10", 0),
        Interaction("u1", "20", 1),
    ]
    assert [r.reason for r in parse_sequence_line("s", b"u1 10  20")] == ["empty_id"]
    assert [r.reason for r in parse_sequence_line("s", b"u1 10\t20")] == ["invalid_id"]
    assert [r.reason for r in parse_sequence_line("s", b"u1")] == ["no_items"]


def test_parse_attribute_entry():
    assert parse_attribute_entry("j", ("7", [3, 1, 3])) == [ItemAttributes("7", ("3", "1"))]
    assert parse_attribute_entry("j", ("7", [])) == [Skipped("j", "no_category")]
    assert [r.reason for r in parse_attribute_entry("j", ("7", [True]))] == ["bad_value"]
    assert [r.reason for r in parse_attribute_entry("j", ("7", 3))] == ["bad_value"]
    assert [r.reason for r in parse_attribute_entry("j", b"{not json")] == ["bad_json"]
    assert [r.reason for r in parse_attribute_entry("j", b"[1]")] == ["bad_json"]
    assert [r.reason for r in parse_attribute_entry("j", b"\xff{}")] == ["bad_encoding"]


def test_choose_category_most_frequent_then_smallest_id():
    items = [
        ItemAttributes("a", ("100", "10", "9")),
        ItemAttributes("b", ("101", "10", "9")),
        ItemAttributes("c", ("102", "x", "y")),
        ItemAttributes("d", ("x", "y")),
    ]
    freq = attribute_frequencies(items)
    assert freq == {"100": 1, "101": 1, "102": 1, "10": 2, "9": 2, "x": 2, "y": 2}
    categories = [choose_category(item, freq).category for item in items]
    assert categories == ["9", "9", "x", "x"]  # numeric 9 < 10; then lexicographic


def test_read_sequences_fixture():
    out = run_source(SourceConfig(name="sequences", input=str(TINY)))
    assert sorted(out["interactions"]) == sorted(
        [Interaction("u1", item, t) for t, item in enumerate(["10", "20", "30"])]
        + [Interaction("u2", item, t) for t, item in enumerate(["20", "40"])]
        + [Interaction("u6", item, t) for t, item in enumerate(["30", "10", "40", "20"])]
    )
    assert sorted(out["item_categories"]) == [
        ItemCategory("10", "1"),  # 1 and 2 both carried by 3 items: smaller id wins
        ItemCategory("20", "1"),
        ItemCategory("30", "2"),
        ItemCategory("40", "3"),
        ItemCategory("70", "1"),
    ]
    assert reasons(out["rejected"]) == {
        "empty_id": 2,  # double space in a line, empty item key
        "no_items": 1,
        "bad_encoding": 1,
        "bad_value": 1,
    }
    assert reasons(out["skipped"]) == {"no_category": 1}
    assert out["rows_read"] == 6 + 8


def test_read_sequences_without_attributes(tmp_path):
    path = tmp_path / "Plain.txt"
    path.write_bytes(b"a 1 2\nb 3\n")
    assert locate(str(path)).attributes is None
    out = run_source(SourceConfig(name="sequences", input=str(path)))
    assert len(out["interactions"]) == 3 and out["item_categories"] == []
    assert out["rows_read"] == 2


def test_real_amazon_category_rule_prefers_subcategories_over_brands():
    path = SHARED_DATA / "amazon-beauty" / "Beauty_item2attributes.json"
    if not path.exists():
        pytest.skip(f"real data absent: {path}")
    items = [
        ItemAttributes(key, tuple(dict.fromkeys(str(v) for v in values)))
        for key, values in json.loads(path.read_text()).items()
        if values
    ]
    freq = attribute_frequencies(items)
    categories = [choose_category(item, freq).category for item in items]
    # brands: attributes only ever listed first; sub-categories also appear later
    later = {a for item in items for a in item.attributes[1:]}
    brands = {item.attributes[0] for item in items} - later
    assert len(brands) > 100
    assert not brands & set(categories)
