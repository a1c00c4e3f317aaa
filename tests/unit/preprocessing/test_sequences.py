"""Sequence ordering, filters and the leave-one-out split (pure functions)."""

import pytest

from preprocessing import features, sequences


def test_order_events_sorts_by_time_and_breaks_ties_by_item_id():
    events = [(20, "b", None), (10, "z", None), (20, "a", None), (5, "q", None)]
    ordered = sequences.order_events(reversed(events))
    assert [e[1] for e in ordered] == ["q", "z", "a", "b"]


def test_dedup_consecutive_keeps_non_adjacent_repeats():
    events = [(1, "a", None), (2, "a", None), (3, "b", None), (4, "a", None)]
    assert [e[1] for e in sequences.order_events(events, dedup_consecutive=True)] == [
        "a",
        "b",
        "a",
    ]
    assert len(sequences.order_events(events)) == 4


def test_filter_user_drops_rare_items_then_short_users():
    counts = {"a": 5, "b": 1, "c": 3}
    user = ("u", [(1, "a", None), (2, "b", None), (3, "c", None)])
    assert list(sequences.filter_user(user, counts, 2, 2)) == [
        ("u", [(1, "a", None), (3, "c", None)])
    ]
    assert list(sequences.filter_user(user, counts, 4, 2)) == []


def test_filter_is_stable():
    assert sequences.filter_is_stable({"a": 3}, [5], 3, 5)
    assert not sequences.filter_is_stable({"a": 2}, [5], 3, 5)
    assert not sequences.filter_is_stable({"a": 3}, [4], 3, 5)


def test_split_user_protocol_and_too_short():
    events = [(t, item, None) for t, item in enumerate(["a", "b", "c", "d"])]
    (seq,) = list(sequences.split_user(("u1", events)))
    assert seq.train == ("a", "b")
    assert seq.validation_target == "c"
    assert seq.test_target == "d"
    (short,) = list(sequences.split_user(("u2", events[:2])))
    assert short.tag == "too_short" and short.value == "u2"


def test_split_records_hold_the_sequence_visible_to_each_split():
    seq = sequences.SplitSequence("u", ("a", "b", "c", "d"), (1, 2, 3, 4))
    records = dict(sequences.split_records(seq, {"a": 0, "b": 1, "c": 1, "d": 2}))
    assert records[features.TRAIN][features.ITEM_IDS] == ["a", "b"]
    assert records[features.VALIDATION][features.ITEM_IDS] == ["a", "b", "c"]
    assert records[features.TEST][features.ITEM_IDS] == ["a", "b", "c", "d"]
    assert records[features.TEST][features.ITEM_CLUSTERS] == [0, 1, 1, 2]
    assert records[features.VALIDATION][features.TIMESTAMPS] == [1, 2, 3]


def test_records_pattern_rejects_unknown_split():
    assert features.records_pattern(features.TRAIN).startswith(features.RECORDS_DIR)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        features.records_pattern("dev")
