"""Typed, frozen configuration of the preprocessing job."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

SOURCES = ("ml1m", "kuairand", "sequences", "csv", "synthetic")
CLUSTERINGS = ("kmeans", "category")
KMEANS_STRATEGIES = ("kmeans", "bisecting")
FILTER_MODES = ("until_stable", "once")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and structure of the seeded synthetic data set.

    The generative model is documented in ``preprocessing.sources.synthetic``.

    Attributes:
        num_users: number of users generated.
        num_items: number of items in the corpus.
        num_categories: number of latent categories the items belong to.
        mean_length: mean number of interactions per user.
        seed: random seed; the same seed gives the same data on any runner.
        latent_dim: size of the item and user taste vectors (>= 2).
        min_interests: fewest interest categories per user.
        max_interests: most interest categories per user (capped by num_categories).
        interest_concentration: Dirichlet concentration of a user's interest
            strengths; small values give one dominant interest.
        switch_prob: per step, probability that the user re-draws the current
            interest by strength (it may draw the same one again).
        explore_prob: per step, probability of one popularity-driven pick from a
            category drawn by size (usually outside the user's interests).
        popularity_exponent: Zipf exponent of the within-category popularity.
        temperature: softmax temperature of the user-item taste affinity; lower
            makes personal taste matter more relative to popularity.
        sequential_noise: std (radians) of the jitter on the within-category walk;
            larger values weaken the sequential signal.
        length_sigma: log-normal sigma of the per-user sequence length.
        min_length: shortest user sequence.
    """

    num_users: int = 2000
    num_items: int = 1000
    num_categories: int = 10
    mean_length: int = 40
    seed: int = 7
    latent_dim: int = 16
    min_interests: int = 1
    max_interests: int = 4
    interest_concentration: float = 1.0
    switch_prob: float = 0.1
    explore_prob: float = 0.03
    popularity_exponent: float = 1.0
    temperature: float = 0.1
    sequential_noise: float = 0.5
    length_sigma: float = 0.6
    min_length: int = 5

    def __post_init__(self) -> None:
        for name in (
            "num_users",
            "num_items",
            "num_categories",
            "mean_length",
            "min_interests",
            "min_length",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic {name} must be >= 1, got {getattr(self, name)}")
        if self.num_categories > self.num_items:
            raise ValueError(
                f"synthetic num_categories ({self.num_categories}) exceeds "
                f"num_items ({self.num_items})"
            )
        if self.latent_dim < 2:
            raise ValueError(f"synthetic latent_dim must be >= 2, got {self.latent_dim}")
        if self.max_interests < self.min_interests:
            raise ValueError(
                f"synthetic max_interests ({self.max_interests}) is below "
                f"min_interests ({self.min_interests})"
            )
        for name in ("switch_prob", "explore_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"synthetic {name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("interest_concentration", "temperature"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"synthetic {name} must be > 0, got {getattr(self, name)}")
        for name in ("popularity_exponent", "sequential_noise", "length_sigma"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"synthetic {name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where raw interactions come from and which rows count.

    Attributes:
        name: one of SOURCES.
        input: file, directory or glob of the raw data (unused by ``synthetic``).
        min_rating: ml1m/csv-with-rating: keep ratings >= this (None keeps all).
        kuairand_tab: KuaiRand: keep rows with this ``tab`` (None keeps all tabs).
        kuairand_require_click: KuaiRand: keep only rows with ``is_click == 1``.
        synthetic: generator settings for ``synthetic``.
    """

    name: str = "synthetic"
    input: Optional[str] = None
    min_rating: Optional[float] = None
    kuairand_tab: Optional[int] = 1
    kuairand_require_click: bool = True
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.name not in SOURCES:
            raise ValueError(f"unknown source {self.name!r}; expected one of {SOURCES}")
        if self.name != "synthetic" and not self.input:
            raise ValueError(f"--input is required for source {self.name!r}")


@dataclasses.dataclass(frozen=True)
class ClusteringConfig:
    """How items are divided into clusters (step 1 of the method).

    Attributes:
        method: ``kmeans`` (item2vec + K-means) or ``category``.
        num_clusters: K.
        embedding_dim: item2vec vector size.
        window: item2vec (skip-gram) context window.
        epochs: item2vec training epochs (at most; see ``token_budget``).
        negative: item2vec negative samples per positive.
        seed: seed of Word2Vec and K-means.
        sample: item2vec downsampling threshold of frequent items (gensim ``sample``;
            1e-4 rather than gensim's 1e-3: item catalogues are far smaller than
            vocabularies, so popular items are much more frequent than words).
        kmeans_n_init: K-means restarts (fixed, not sklearn's version-dependent default).
        kmeans_strategy: ``kmeans`` (scikit-learn ``KMeans``) or ``bisecting``
            (``BisectingKMeans`` splitting the largest cluster each time: more even
            cluster sizes).
        token_budget: bound on item2vec's work, in training tokens over all epochs:
            the epochs are cut to ``max(1, token_budget // tokens)`` when the training
            sequences hold more than ``token_budget / epochs`` tokens (0: no bound).
            The default keeps all 10 epochs up to 2M tokens (every public data set
            here) and trains one epoch at 20M (KuaiRand's size), where item2vec
            would otherwise dominate preprocessing (see docs/scale.md).
    """

    method: str = "kmeans"
    num_clusters: int = 10
    embedding_dim: int = 64
    window: int = 5
    epochs: int = 10
    negative: int = 5
    seed: int = 42
    sample: float = 1e-4
    kmeans_n_init: int = 10
    kmeans_strategy: str = "kmeans"
    token_budget: int = 20_000_000

    def __post_init__(self) -> None:
        if self.token_budget < 0:
            raise ValueError(f"token_budget must be >= 0, got {self.token_budget}")
        if self.kmeans_strategy not in KMEANS_STRATEGIES:
            raise ValueError(
                f"unknown kmeans_strategy {self.kmeans_strategy!r}; "
                f"expected one of {KMEANS_STRATEGIES}"
            )
        if self.method not in CLUSTERINGS:
            raise ValueError(f"unknown clustering {self.method!r}; expected one of {CLUSTERINGS}")
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {self.num_clusters}")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Everything ``dnc preprocess`` needs.

    Attributes:
        source: raw data settings.
        output: output directory.
        clustering: clustering settings.
        min_item_interactions: drop items with fewer interactions.
        min_user_interactions: drop users with fewer interactions.
        filter_mode: ``until_stable`` repeats both filters until nothing changes
            (at most ``max_filter_rounds``), ``once`` applies each once.
        max_filter_rounds: bound on ``until_stable`` rounds.
        dedup_consecutive: collapse consecutive repeats of the same item.
        num_shards: TFRecord shards per split (0 lets the runner decide).
        beam_args: pipeline options passed through to Beam unchanged.
    """

    source: SourceConfig
    output: str
    clustering: ClusteringConfig = dataclasses.field(default_factory=ClusteringConfig)
    min_item_interactions: int = 1
    min_user_interactions: int = 1
    filter_mode: str = "until_stable"
    max_filter_rounds: int = 20
    dedup_consecutive: bool = False
    num_shards: int = 1
    beam_args: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.filter_mode not in FILTER_MODES:
            raise ValueError(
                f"unknown filter_mode {self.filter_mode!r}; expected one of {FILTER_MODES}"
            )
        for name in ("min_item_interactions", "min_user_interactions", "max_filter_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_shards < 0:
            raise ValueError(f"num_shards must be >= 0, got {self.num_shards}")
