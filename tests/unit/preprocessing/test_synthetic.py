"""Tests of the seeded synthetic source: determinism, the Beam wrapper, the CSV
writer, and that the planted structure (interests, drift, popularity, personal
taste, sequential walk) is measurable in the generated data."""

from __future__ import annotations

import csv
import itertools
import re
from collections import Counter

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from preprocessing.config import SyntheticConfig
from preprocessing.records import Interaction
from preprocessing.sources import synthetic

TINY = SyntheticConfig(num_users=50, num_items=100, num_categories=10, mean_length=40, seed=3)
# Big enough categories (~300 items) that users do not exhaust them.
MEDIUM = SyntheticConfig(num_users=300, num_items=3000, num_categories=10, mean_length=40)


def _all_users(config: SyntheticConfig) -> list[Interaction]:
    world = synthetic.build_world(config)
    return [e for u in range(config.num_users) for e in synthetic.generate_user(world, u)]


@pytest.fixture(scope="module")
def medium():
    """The MEDIUM world and every user's (item indices, timestamps)."""
    world = synthetic.build_world(MEDIUM)
    return world, [synthetic.generate_user_arrays(world, u) for u in range(MEDIUM.num_users)]


def _member_position(world: synthetic.World) -> np.ndarray:
    position = np.empty(len(world.members), dtype=np.int64)
    position[world.members] = np.arange(len(world.members))
    return position


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_interactions():
    assert _all_users(TINY) == _all_users(SyntheticConfig(**vars(TINY)))


def test_different_seed_gives_different_interactions():
    other = SyntheticConfig(**{**vars(TINY), "seed": TINY.seed + 1})
    first, second = _all_users(TINY), _all_users(other)
    assert Counter(e.item_id for e in first) != Counter(e.item_id for e in second)
    assert synthetic.true_categories(synthetic.build_world(TINY)) != synthetic.true_categories(
        synthetic.build_world(other)
    )


def test_user_does_not_depend_on_other_users():
    world = synthetic.build_world(TINY)
    alone = synthetic.generate_user(synthetic.build_world(TINY), 17)
    for u in (49, 3, 0):  # generating others first, in any order, changes nothing
        synthetic.generate_user(world, u)
    assert synthetic.generate_user(world, 17) == alone
    more_users = synthetic.build_world(SyntheticConfig(**{**vars(TINY), "num_users": 500}))
    assert synthetic.generate_user(more_users, 17) == alone


# ------------------------------------------------------------------- Beam, CSV


def test_read_synthetic_equals_generate_user():
    expected = _all_users(TINY)
    categories = synthetic.true_categories(synthetic.build_world(TINY))
    with beam.Pipeline(runner="DirectRunner") as pipeline:
        out = synthetic.read_synthetic(pipeline, TINY, users_per_chunk=7)
        assert_that(out.interactions, equal_to(expected), label="Interactions")
        assert_that(
            out.item_categories | beam.Map(tuple),
            equal_to(list(categories.items())),
            label="ItemCategories",
        )
        assert_that(out.rejected, equal_to([]), label="Rejected")
        assert_that(out.skipped, equal_to([]), label="Skipped")
        # accepted + skipped + rejected = rows read (the source invariant)
        rows = len(expected) + TINY.num_items
        assert_that(out.rows_read, equal_to([rows]), label="RowsRead")


def test_write_csv_streams_the_same_rows(tmp_path):
    path = tmp_path / "synthetic.csv"
    written = synthetic.write_csv(TINY, str(path))
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["user_id", "item_id", "timestamp", "category"]
    expected = [[e.user_id, e.item_id, str(e.timestamp), e.category] for e in _all_users(TINY)]
    assert rows[1:] == expected
    assert written == len(expected)


# ------------------------------------------------------------ format and shape


def test_ids_categories_lengths_and_timestamps():
    world = synthetic.build_world(TINY)
    categories = synthetic.true_categories(world)
    assert len(categories) == TINY.num_items
    assert len(set(categories.values())) == TINY.num_categories
    assert all(re.fullmatch(r"i\d{6}", i) for i in categories)
    assert all(re.fullmatch(r"cat\d{2}", c) for c in categories.values())
    sizes = np.bincount(world.item_category, minlength=TINY.num_categories)
    assert sizes.min() >= 1 and sizes.max() >= 2 * sizes.min()  # uneven category sizes
    for user, events in itertools.groupby(_all_users(TINY), key=lambda e: e.user_id):
        events = list(events)
        assert re.fullmatch(r"u\d{6}", user)
        assert len(events) >= TINY.min_length
        stamps = [e.timestamp for e in events]
        assert all(b > a for a, b in itertools.pairwise(stamps))
        assert all(e.category == categories[e.item_id] for e in events)


def test_min_length_and_increasing_timestamps_at_medium_size(medium):
    _, users = medium
    assert min(len(items) for items, _ in users) >= MEDIUM.min_length
    assert all(np.all(np.diff(stamps) > 0) for _, stamps in users)
    lengths = np.array([len(items) for items, _ in users])
    assert 0.8 * MEDIUM.mean_length < lengths.mean() < 1.2 * MEDIUM.mean_length
    assert lengths.std() > 0.3 * MEDIUM.mean_length  # lengths vary per user


def test_no_repeats_when_categories_are_large(medium):
    _, users = medium
    repeats = sum(len(items) - len(np.unique(items)) for items, _ in users)
    assert repeats / sum(len(items) for items, _ in users) < 0.005


# ----------------------------------------------------------- planted structure


def test_users_concentrate_on_few_categories(medium):
    # Each user has <= 4 interests with Dirichlet(1) strengths (expected weakest
    # strength 1/16) and explores 3% of steps: the top-3 categories should hold
    # >= ~0.9 of a user's events. Shuffling categories across users (same global
    # category mix, no users) gives ~0.4, so 0.85 vs 0.6 separates the two.
    world, users = medium
    cats = [world.item_category[items] for items, _ in users]

    def mean_top3(per_user):
        return np.mean([np.sort(np.bincount(c))[-3:].sum() / len(c) for c in per_user])

    shuffled = np.random.default_rng(0).permutation(np.concatenate(cats))
    baseline = np.split(shuffled, np.cumsum([len(c) for c in cats])[:-1])
    assert mean_top3(cats) > 0.85
    assert mean_top3(baseline) < 0.6


def test_consecutive_events_share_the_category_far_above_chance(medium):
    # Stay probability >= (1 - switch_prob) * (1 - explore_prob)^2 ~= 0.85;
    # chance is sum_c share_c^2 ~= 0.12 with 10 uneven categories.
    world, users = medium
    cats = [world.item_category[items] for items, _ in users]
    same = np.mean(np.concatenate([c[1:] == c[:-1] for c in cats]))
    share = np.bincount(np.concatenate(cats)) / sum(len(c) for c in cats)
    assert same > 0.8
    assert same > 4 * np.sum(share**2)


def test_popularity_is_skewed_but_the_long_tail_is_used(medium):
    world, users = medium
    rank = _member_position(world) - world.cat_start[world.item_category]
    size = world.cat_size[world.item_category]
    counts = np.bincount(np.concatenate([items for items, _ in users]), minlength=len(rank))
    head, tail = rank < np.ceil(0.1 * size), rank >= size / 2
    assert counts[head].sum() / counts.sum() > 2 * head.mean()  # top 10% get > 2x their share
    assert counts[tail].sum() / counts.sum() > 0.1  # bottom half still used
    assert (counts > 0).mean() > 0.7


def test_within_category_choice_is_personal(medium):
    # In-category AUC of consumed vs unconsumed items: a category-only model
    # scores 0.5, popularity alone does better, the user's true taste clearly
    # better still -- so same-category hard negatives are informative.
    world, users = medium
    position = _member_position(world)
    log_pop = world.member_log_pop[position]
    auc_true, auc_pop = [], []
    for user, (items, _) in enumerate(users):
        taste = synthetic.user_profile(world, user).taste
        score = world.member_vec[position] @ taste / MEDIUM.temperature + log_pop
        consumed = np.zeros(len(position), dtype=bool)
        consumed[items] = True
        for cat in np.unique(world.item_category[items]):
            in_cat = world.item_category == cat
            pos, neg = consumed & in_cat, ~consumed & in_cat
            if pos.sum() >= 3 and neg.any():
                auc_true.append(np.mean(score[pos][:, None] > score[neg][None, :]))
                auc_pop.append(np.mean(log_pop[pos][:, None] > log_pop[neg][None, :]))
    assert 0.6 < np.mean(auc_pop) < np.mean(auc_true) - 0.05
    assert np.mean(auc_true) > 0.8


def test_consecutive_items_follow_the_walk(medium):
    # Within a category the user walks around the circle of the first two latent
    # coordinates: consecutive same-category items are much closer in that angle
    # than two random items the same user consumed from that category.
    world, users = medium
    angle = world.member_angle[_member_position(world)]
    rng = np.random.default_rng(0)

    def gap(first, second):
        return np.abs(np.angle(np.exp(1j * (angle[first] - angle[second]))))

    adjacent, shuffled = [], []
    for items, _ in users:
        cats = world.item_category[items]
        keep = cats[1:] == cats[:-1]
        adjacent.append(gap(items[1:], items[:-1])[keep])
        for cat in np.unique(cats):
            mine = rng.permutation(items[cats == cat])
            shuffled.append(gap(mine[1:], mine[:-1]))
    adjacent_gap, shuffled_gap = (
        np.mean(np.concatenate(adjacent)),
        np.mean(np.concatenate(shuffled)),
    )
    assert adjacent_gap < 0.5 * shuffled_gap, (adjacent_gap, shuffled_gap)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("latent_dim", 1),
        ("max_interests", 0),
        ("switch_prob", 1.5),
        ("explore_prob", -0.1),
        ("temperature", 0.0),
        ("popularity_exponent", -1.0),
        ("min_length", 0),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=str(value)):
        SyntheticConfig(**{field: value})


def test_bad_user_index_and_chunk_size():
    world = synthetic.build_world(TINY)
    with pytest.raises(ValueError, match="50"):
        synthetic.generate_user(world, TINY.num_users)
    with pytest.raises(ValueError, match="-1"):
        synthetic.generate_user(world, -1)
    with pytest.raises(ValueError, match="0"):
        synthetic.read_synthetic(beam.Pipeline(), TINY, users_per_chunk=0)
