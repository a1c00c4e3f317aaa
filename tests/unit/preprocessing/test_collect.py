"""The single-worker collection step keeps what the clustering needs, in little memory."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from preprocessing import beam_pipeline
from preprocessing.sequences import SplitSequence


def _distinct(text: str) -> str:
    """An equal string that is a different object (as decoded Beam elements are)."""
    return "".join(list(text))


def test_compact_drops_timestamps_and_shares_item_strings() -> None:
    a = SplitSequence("u1", (_distinct("item-7"), _distinct("item-8"), "x"), (1, 2, 3))
    b = SplitSequence("u2", (_distinct("item-7"), "y", "z"), (4, 5, 6))
    assert a.items[0] is not b.items[0]
    ca, cb = beam_pipeline.compact_for_clustering(a), beam_pipeline.compact_for_clustering(b)
    assert ca.items == a.items and cb.items == b.items
    assert ca.items[0] is cb.items[0]
    assert ca.timestamps == () and cb.timestamps == ()
    assert (ca.train, ca.validation_target, ca.test_target) == (a.train, "item-8", "x")


def test_collect_fn_compacts_and_sorts_in_a_real_pipeline() -> None:
    users = [
        SplitSequence("u2", ("b", "c", "d"), (4, 5, 6)),
        SplitSequence("u1", ("a", "b", "c", "d"), (1, 2, 3, 4)),
    ]
    with beam.Pipeline() as p:
        collected = (
            p
            | beam.Create(users)
            | beam.CombineGlobally(
                beam_pipeline._CollectFn(
                    sort_key=lambda s: s.user_id, compact=beam_pipeline.compact_for_clustering
                )
            )
            | beam.Map(lambda seqs: [(s.user_id, s.items, s.timestamps) for s in seqs])
        )
        assert_that(
            collected,
            equal_to([[("u1", ("a", "b", "c", "d"), ()), ("u2", ("b", "c", "d"), ())]]),
        )
