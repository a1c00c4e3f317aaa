"""Seeded synthetic interactions with planted cluster structure.

The data set is built so that the point of "divide and conquer" retrieval is
visible: telling a user's next item apart from *other items of the same
category* is the hard part, and the category itself is easy.

Generative model (all draws from numpy ``SeedSequence`` streams):

* World (from ``config.seed`` alone). Category shares come from a
  Dirichlet(2) draw, so category sizes are uneven (every category has at least
  one item). Within a category the items have a random popularity rank ``r``
  and Zipf popularity ``(r + 1) ** -popularity_exponent``, and a random unit
  latent vector ``v`` of size ``latent_dim``. Item ids are shuffled, so an id
  says nothing about its category.
* User ``u`` (from ``(seed, u)`` alone). A personal unit taste vector ``t``,
  ``k`` in ``[min_interests, max_interests]`` interest categories (drawn
  without replacement by category share) with Dirichlet strengths, and a
  log-normal length around ``mean_length`` (at least ``min_length``).
* Interest drift. The current interest is a Markov chain: at each step it is
  re-drawn by strength with probability ``switch_prob`` (it may stay), else kept.
* Items. Over all steps in interest category ``c`` the user picks distinct
  items, without replacement, from ``softmax(t . v / temperature + log pop)``
  within ``c`` (Gumbel top-k). So both the popular head and the personal long
  tail are used, and popularity alone does not explain the choice.
* Sequential signal. The picks of a category are consumed as a walk around the
  circle given by the first two latent coordinates of ``v`` (random start and
  direction per user and category, jitter ``sequential_noise``), so consecutive
  items of a category are close in that plane of the latent space and a
  sequential model has something to learn. A user who returns to a category
  resumes the walk.
* Exploration. With probability ``explore_prob`` a step instead goes to a
  category drawn by share; outside the user's interests it picks one item by
  popularity alone (inside them it is served like any interest step).
* Repeats happen only when a user has consumed every item of a category (the
  walk starts another lap) or when two exploration picks collide.
* Timestamps start at a per-user random offset after 2020-09-13 and increase by
  at least one second per event.

``build_world`` and ``generate_user`` are pure numpy; ``read_synthetic`` wraps
them as a Beam source whose output does not depend on how users are split
across workers; ``write_csv`` streams the same data to a CSV file.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
import numpy as np

from preprocessing.config import SyntheticConfig
from preprocessing.records import Interaction, ItemCategory, Rejected, Skipped
from preprocessing.sources.common import SourceOutputs

USERS_PER_CHUNK = 500
ITEMS_PER_CHUNK = 20000
BASE_EPOCH = 1_600_000_000
CATEGORY_SIZE_ALPHA = 2.0
MEAN_GAP_SECONDS = 120.0
CSV_HEADER = "user_id,item_id,timestamp,category"
_WORLD_STREAM = 0
_USER_STREAM = 1
_TWO_PI = 2.0 * np.pi


@dataclasses.dataclass(frozen=True, eq=False)
class World:
    """The item side of the synthetic data set; members are sorted by category.

    Attributes:
        config: the settings the world was built from.
        item_ids: item id per item index, e.g. ``i000123`` (object array).
        category_names: name per category index, e.g. ``cat03``.
        item_category: category index per item index.
        item_category_name: category name per item index (object array).
        members: item indices sorted by category, then by popularity rank.
        cat_start: offset of each category's block in ``members``.
        cat_size: number of items in each category.
        cat_share: fraction of all items in each category.
        member_vec: unit latent vector per member, shape ``(num_items, latent_dim)``.
        member_log_pop: log of the within-category popularity per member
            (sums to one per category).
        member_angle: angle of the first two latent coordinates per member.
        member_cum_pop: ``c + cumulative popularity`` per member of category ``c``,
            for inverse-CDF sampling.
    """

    config: SyntheticConfig
    item_ids: np.ndarray
    category_names: tuple[str, ...]
    item_category: np.ndarray
    item_category_name: np.ndarray
    members: np.ndarray
    cat_start: np.ndarray
    cat_size: np.ndarray
    cat_share: np.ndarray
    member_vec: np.ndarray
    member_log_pop: np.ndarray
    member_angle: np.ndarray
    member_cum_pop: np.ndarray


class UserProfile(NamedTuple):
    """The hidden preferences of one user (for analysis and tests).

    Attributes:
        interests: category indices of the user's interests.
        strengths: Dirichlet strength of each interest (sums to one).
        taste: unit taste vector of size ``latent_dim``.
        length: number of interactions generated for the user.
    """

    interests: np.ndarray
    strengths: np.ndarray
    taste: np.ndarray
    length: int


def _width(count: int, minimum: int) -> int:
    return max(minimum, len(str(max(count - 1, 0))))


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.sqrt(np.einsum("...i,...i->...", rows, rows))[..., None]


def build_world(config: SyntheticConfig) -> World:
    """Builds the item side of the data set, deterministically from ``config.seed``.

    Args:
        config: synthetic data settings.

    Returns:
        The ``World``: categories, popularity and latent vectors of all items.
    """
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(_WORLD_STREAM,)))
    n, c = config.num_items, config.num_categories
    share = rng.dirichlet(np.full(c, CATEGORY_SIZE_ALPHA))
    cat_size = 1 + rng.multinomial(n - c, share)
    cat_start = np.concatenate(([0], np.cumsum(cat_size)[:-1]))
    member_cat = np.repeat(np.arange(c), cat_size)
    rank = np.arange(n) - cat_start[member_cat]
    pop = (rank + 1.0) ** -config.popularity_exponent
    pop_sum = np.bincount(member_cat, weights=pop)
    member_pop = pop / pop_sum[member_cat]
    cum = np.cumsum(member_pop)
    cum_before = np.concatenate(([0.0], cum))[cat_start]
    member_cum_pop = member_cat + np.minimum(cum - cum_before[member_cat], 1.0)
    member_vec = _unit(rng.standard_normal((n, config.latent_dim)))
    members = rng.permutation(n)  # member position -> shuffled item index
    item_category = np.empty(n, dtype=np.int64)
    item_category[members] = member_cat
    item_width, cat_width = _width(n, 6), _width(c, 2)
    category_names = tuple(f"cat{j:0{cat_width}d}" for j in range(c))
    return World(
        config=config,
        item_ids=np.array([f"i{i:0{item_width}d}" for i in range(n)], dtype=object),
        category_names=category_names,
        item_category=item_category,
        item_category_name=np.array(category_names, dtype=object)[item_category],
        members=members,
        cat_start=cat_start,
        cat_size=cat_size,
        cat_share=cat_size / n,
        member_vec=member_vec,
        member_log_pop=np.log(member_pop),
        member_angle=np.arctan2(member_vec[:, 1], member_vec[:, 0]),
        member_cum_pop=member_cum_pop,
    )


def _user_rng(world: World, user_index: int) -> np.random.Generator:
    if not 0 <= user_index < world.config.num_users:
        raise ValueError(f"user_index {user_index} is outside [0, {world.config.num_users})")
    seq = np.random.SeedSequence(world.config.seed, spawn_key=(_USER_STREAM, user_index))
    return np.random.default_rng(seq)


def _draw_profile(world: World, rng: np.random.Generator) -> UserProfile:
    cfg = world.config
    cats = len(world.cat_size)
    k = int(rng.integers(min(cfg.min_interests, cats), min(cfg.max_interests, cats) + 1))
    keys = np.log(world.cat_share) + rng.gumbel(size=cats)
    interests = np.argpartition(-keys, k - 1)[:k] if k < cats else rng.permutation(cats)
    strengths = rng.dirichlet(np.full(k, cfg.interest_concentration))
    taste = _unit(rng.standard_normal(cfg.latent_dim))
    z = rng.standard_normal()
    raw = cfg.mean_length * np.exp(cfg.length_sigma * z - cfg.length_sigma**2 / 2.0)
    return UserProfile(interests, strengths, taste, max(cfg.min_length, round(raw)))


def user_profile(world: World, user_index: int) -> UserProfile:
    """Returns the hidden preferences ``generate_user`` uses for ``user_index``.

    Raises:
        ValueError: ``user_index`` is outside ``[0, num_users)``.
    """
    return _draw_profile(world, _user_rng(world, user_index))


def generate_user_arrays(world: World, user_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Generates one user's sequence as arrays, from ``(seed, user_index)`` alone.

    Args:
        world: the item side, from ``build_world``.
        user_index: the user, in ``[0, num_users)``.

    Returns:
        ``(items, timestamps)``: item indices (into ``world.item_ids``) and
        strictly increasing integer timestamps, in event order.

    Raises:
        ValueError: ``user_index`` is outside ``[0, num_users)``.
    """
    cfg = world.config
    rng = _user_rng(world, user_index)
    prof = _draw_profile(world, rng)
    length = prof.length
    # Interest chain: re-draw by strength at switch steps, forward-fill between them.
    switch = rng.random(length) < cfg.switch_prob
    switch[0] = True
    drawn = np.searchsorted(np.cumsum(prof.strengths), rng.random(length) * prof.strengths.sum())
    drawn = np.minimum(drawn, len(prof.interests) - 1)
    last_switch = np.maximum.accumulate(np.where(switch, np.arange(length), 0))
    step_cat = prof.interests[drawn[last_switch]]
    # Exploration: a category by share; outside the interests, an item by popularity alone.
    explore = rng.random(length) < cfg.explore_prob
    n_explore = int(explore.sum())
    cat_cum = np.cumsum(world.cat_share)
    explore_cat = np.minimum(np.searchsorted(cat_cum, rng.random(n_explore)), len(cat_cum) - 1)
    step_cat[explore] = explore_cat
    is_interest = np.zeros(len(cat_cum), dtype=bool)
    is_interest[prof.interests] = True
    pure = explore & ~is_interest[step_cat]
    pure_cat = step_cat[pure]
    first = world.cat_start[pure_cat]
    pos = np.searchsorted(world.member_cum_pop, pure_cat + rng.random(len(pure_cat)))
    member_at = np.empty(length, dtype=np.int64)
    member_at[pure] = np.clip(pos, first, first + world.cat_size[pure_cat] - 1)
    # Interest steps: Gumbel top-k by taste + popularity, consumed as a walk.
    step_cat[pure] = -1
    taste = prof.taste / cfg.temperature
    for cat in prof.interests.tolist():
        slots = np.flatnonzero(step_cat == cat)
        need = len(slots)
        if need == 0:
            continue
        start, size = int(world.cat_start[cat]), int(world.cat_size[cat])
        logits = world.member_vec[start : start + size] @ taste
        logits += world.member_log_pop[start : start + size]
        noise = np.log(rng.standard_exponential(size))  # -Gumbel(0, 1), one log only
        logits -= noise
        if need < size:
            chosen, lap = np.argpartition(logits, size - need)[size - need :], 0.0
        else:  # the user exhausts the category: whole laps, then the top of a last lap
            laps, rest = divmod(need, size)
            top = np.argpartition(logits, size - rest)[size - rest :] if rest else []
            chosen = np.concatenate((np.tile(np.arange(size), laps), top)).astype(np.int64)
            lap = _TWO_PI * np.repeat(np.arange(laps + 1), [size] * laps + [rest])
        phase, turn = rng.random(2)
        direction = 1.0 if turn < 0.5 else -1.0
        angle = ((world.member_angle[start + chosen] - phase * _TWO_PI) * direction) % _TWO_PI
        key = angle + lap + cfg.sequential_noise * rng.standard_normal(need)
        member_at[slots] = start + chosen[np.argsort(key, kind="stable")]
    gaps = 1 + rng.exponential(MEAN_GAP_SECONDS, length).astype(np.int64)
    start_time = BASE_EPOCH + int(rng.integers(0, 30 * 86400))
    return world.members[member_at], start_time + np.cumsum(gaps)


def generate_user(world: World, user_index: int) -> list[Interaction]:
    """Generates one user's interactions, from ``(seed, user_index)`` alone.

    The result does not depend on which other users are generated, or in
    which order, so any split of users across workers gives the same data.

    Args:
        world: the item side, from ``build_world``.
        user_index: the user, in ``[0, num_users)``.

    Returns:
        The user's interactions in time order; ``category`` is the item's category.

    Raises:
        ValueError: ``user_index`` is outside ``[0, num_users)``.
    """
    items, stamps = generate_user_arrays(world, user_index)
    user_id = f"u{user_index:0{_width(world.config.num_users, 6)}d}"
    return list(
        map(
            Interaction,
            itertools.repeat(user_id),
            world.item_ids[items].tolist(),
            stamps.tolist(),
            world.item_category_name[items].tolist(),
        )
    )


def true_categories(world: World) -> dict[str, str]:
    """Returns the planted category name of every item, keyed by item id."""
    return dict(zip(world.item_ids.tolist(), world.item_category_name.tolist(), strict=True))


def write_csv(config: SyntheticConfig, path: str) -> int:
    """Writes the data set as ``user_id,item_id,timestamp,category`` CSV with a header.

    Users are generated and written one at a time, so memory stays small.

    Args:
        config: synthetic data settings.
        path: local output file.

    Returns:
        The number of interaction rows written.
    """
    world = build_world(config)
    rows = 0
    with open(path, "w", encoding="utf-8", newline="") as out:
        out.write(CSV_HEADER + "\n")
        for user_index in range(config.num_users):
            events = generate_user(world, user_index)
            out.write("".join(f"{u},{i},{t},{c}\n" for u, i, t, c in events))
            rows += len(events)
    return rows


class _GenerateUsers(beam.DoFn):
    """Turns a ``(first, end)`` user range into that range's interactions."""

    def __init__(self, config: SyntheticConfig):
        self._config = config
        self._world = None

    def setup(self) -> None:
        self._world = build_world(self._config)

    def process(self, user_range: tuple[int, int]) -> Iterator[Interaction]:
        for user_index in range(*user_range):
            yield from generate_user(self._world, user_index)


class _ItemCategories(beam.DoFn):
    """Turns a ``(first, end)`` item range into ``ItemCategory`` rows."""

    def __init__(self, config: SyntheticConfig):
        self._config = config
        self._world = None

    def setup(self) -> None:
        self._world = build_world(self._config)

    def process(self, item_range: tuple[int, int]) -> Iterator[ItemCategory]:
        first, end = item_range
        ids = self._world.item_ids[first:end].tolist()
        names = self._world.item_category_name[first:end].tolist()
        yield from map(ItemCategory, ids, names)


def _ranges(total: int, chunk: int) -> list[tuple[int, int]]:
    return [(first, min(first + chunk, total)) for first in range(0, total, chunk)]


def read_synthetic(
    pipeline: beam.Pipeline,
    config: SyntheticConfig,
    users_per_chunk: int = USERS_PER_CHUNK,
    label: str = "Synthetic",
) -> SourceOutputs:
    """Adds the seeded synthetic source to ``pipeline``.

    Users are generated in chunks of ``users_per_chunk`` by a DoFn that builds
    the ``World`` once per worker; the output equals calling ``generate_user``
    for every user, whatever the runner's split.

    Args:
        pipeline: the pipeline to add to.
        config: synthetic data settings.
        users_per_chunk: users per work element (the unit of parallelism).
        label: prefix of the transform labels (to add the source twice).

    Returns:
        ``SourceOutputs``: interactions, one ``ItemCategory`` per item, empty
        rejected/skipped, and ``rows_read`` = ``accepted_rows`` = interactions +
        items, so that the source invariant (accepted + skipped + rejected =
        rows read) holds.

    Raises:
        ValueError: ``users_per_chunk`` is below 1.
    """
    if users_per_chunk < 1:
        raise ValueError(f"users_per_chunk must be >= 1, got {users_per_chunk}")
    interactions = (
        pipeline
        | f"{label}UserRanges" >> beam.Create(_ranges(config.num_users, users_per_chunk))
        | f"{label}Generate" >> beam.ParDo(_GenerateUsers(config)).with_output_types(Interaction)
    )
    item_categories = (
        pipeline
        | f"{label}ItemRanges" >> beam.Create(_ranges(config.num_items, ITEMS_PER_CHUNK))
        | f"{label}ItemCategories"
        >> beam.ParDo(_ItemCategories(config)).with_output_types(ItemCategory)
    )
    rejected = pipeline | f"{label}Rejected" >> beam.Create([]).with_output_types(Rejected)
    skipped = pipeline | f"{label}Skipped" >> beam.Create([]).with_output_types(Skipped)
    counts = [
        pcoll | f"{label}Count{name}" >> beam.combiners.Count.Globally()
        for name, pcoll in (("Interactions", interactions), ("Items", item_categories))
    ]
    rows_read = (
        counts
        | f"{label}FlattenCounts" >> beam.Flatten()
        | f"{label}RowsRead" >> beam.CombineGlobally(sum)
    )
    return SourceOutputs(interactions, item_categories, rejected, skipped, rows_read, rows_read)
