"""Per-user sequences: ordering, de-duplication, min-count filters and the split.

Pure Python, so each rule is unit-testable without Beam; ``beam_pipeline`` wires
these functions into the pipeline.
"""

from __future__ import annotations

import collections
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam

Event = Tuple[int, str, Optional[str]]  # (timestamp, item_id, category)
MIN_SPLIT_LENGTH = 3  # one training item, one validation item, one test item


class SplitSequence(NamedTuple):
    """One user's chronological sequence split by the leave-one-out protocol.

    Attributes:
        user_id: raw user id.
        items: all items, oldest first.
        timestamps: parallel timestamps.
    """

    user_id: str
    items: Tuple[str, ...]
    timestamps: Tuple[int, ...]

    @property
    def train(self) -> Tuple[str, ...]:
        """Everything but the last two items."""
        return self.items[:-2]

    @property
    def validation_target(self) -> str:
        """The penultimate item."""
        return self.items[-2]

    @property
    def test_target(self) -> str:
        """The last item."""
        return self.items[-1]


def order_events(events: Iterable[Event], dedup_consecutive: bool = False) -> List[Event]:
    """Sorts one user's events chronologically.

    Ties on the timestamp are broken by the item id (string order), so the
    result does not depend on the order rows were read in. With
    ``dedup_consecutive`` an event whose item equals the previous one is dropped.
    """
    ordered = sorted(events, key=lambda e: (e[0], e[1]))
    if not dedup_consecutive:
        return ordered
    result: List[Event] = []
    for event in ordered:
        if not result or result[-1][1] != event[1]:
            result.append(event)
    return result


class ItemCountsFn(beam.CombineFn):
    """Counts interactions per item over ``(user_id, events)`` elements."""

    def create_accumulator(self) -> collections.Counter:
        return collections.Counter()

    def add_input(self, acc: collections.Counter, element) -> collections.Counter:
        acc.update(item for _, item, _ in element[1])
        return acc

    def merge_accumulators(self, accumulators) -> collections.Counter:
        merged = collections.Counter()
        for acc in accumulators:
            merged.update(acc)
        return merged

    def extract_output(self, acc: collections.Counter) -> Dict[str, int]:
        return dict(acc)


def filter_user(
    element: Tuple[str, List[Event]],
    item_counts: Mapping[str, int],
    min_item_interactions: int,
    min_user_interactions: int,
) -> Iterable[Tuple[str, List[Event]]]:
    """One filter round for one user: drops rare items, then the user if too short."""
    user_id, events = element
    kept = [e for e in events if item_counts.get(e[1], 0) >= min_item_interactions]
    if len(kept) >= min_user_interactions:
        yield user_id, kept


def filter_is_stable(
    item_counts: Mapping[str, int],
    user_lengths: Iterable[int],
    min_item_interactions: int,
    min_user_interactions: int,
) -> bool:
    """True if another filter round would remove nothing."""
    if any(count < min_item_interactions for count in item_counts.values()):
        return False
    return all(length >= min_user_interactions for length in user_lengths)


def split_user(element: Tuple[str, Sequence[Event]]) -> Iterable[beam.pvalue.TaggedOutput]:
    """Splits a user's sequence; users shorter than MIN_SPLIT_LENGTH go to ``too_short``."""
    user_id, events = element
    if len(events) < MIN_SPLIT_LENGTH:
        yield beam.pvalue.TaggedOutput("too_short", user_id)
        return
    yield SplitSequence(
        user_id=user_id,
        items=tuple(e[1] for e in events),
        timestamps=tuple(e[0] for e in events),
    )


def split_records(
    seq: SplitSequence, item_to_cluster: Mapping[str, int]
) -> Iterable[Tuple[str, dict]]:
    """The three raw TFT records of one user: the sequence visible to each split.

    Train holds the training items; validation adds the validation target as
    its last element; test adds the test target. Every record carries the
    cluster id of each item.
    """
    from preprocessing import features

    clusters = [item_to_cluster[item] for item in seq.items]
    visible = {features.TRAIN: len(seq.items) - 2, features.VALIDATION: len(seq.items) - 1}
    visible[features.TEST] = len(seq.items)
    for split, length in visible.items():
        yield (
            split,
            {
                features.USER_ID: seq.user_id,
                features.SPLIT: split,
                features.ITEM_IDS: list(seq.items[:length]),
                features.ITEM_CLUSTERS: clusters[:length],
                features.TIMESTAMPS: list(seq.timestamps[:length]),
            },
        )
