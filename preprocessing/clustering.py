"""Step 1 of the method: divide the item corpus into K clusters.

Two methods (``ClusteringConfig.method``):

``kmeans`` (default)
    item2vec -- gensim ``Word2Vec`` skip-gram over the users' *training*
    sequences only (validation/test targets never reach the model, so nothing
    leaks) -- followed by scikit-learn ``KMeans`` on the L2-normalised item
    vectors. item2vec similarity is cosine similarity (vector norms mostly
    track item frequency), and on unit vectors squared Euclidean distance is
    ``2 - 2 * cosine``, so K-means on normalised vectors clusters by cosine
    geometry instead of by popularity. Frequent items are downsampled with
    ``ClusteringConfig.sample``; a tqdm bar over epochs is shown above
    ``PROGRESS_MIN_TOKENS`` training tokens. If the training sequences hold fewer
    distinct items than K, K is reduced to that number (logged as a warning).

``category``
    One cluster per content category. If there are more categories than K, the
    K-1 categories with the most training interactions keep their own cluster
    and all the others are merged into one cluster named ``"other"`` (placed
    last); ties in interactions are broken by category name. If there are fewer
    categories than K, there is one cluster per category (effective K smaller,
    logged as a warning). Cluster ids follow the ranking (most interactions
    first).

Fallbacks, so that every item of ``all_items`` gets exactly one cluster:

* ``kmeans``, for an item with no item2vec vector (never in a training
  sequence), in this order:

  1. ``category_majority_fallback``: its category is known and some training
     items share it -> the cluster most common among those training items.
  2. ``context_centroid_fallback``: some of its context items (the training
     items that preceded it, ``unseen_contexts``) have vectors -> the K-means
     centroid nearest to the L2-normalised mean of their normalised vectors.
  3. ``largest_cluster_fallback``: the cluster with the most training items.

* ``category``, for an item without a known category:

  1. ``context_majority_fallback``: the cluster most common among the clusters
     of its context items' categories. The context of an item outside the
     training sequences is ``unseen_contexts[item]``; that of a training item is
     the up to ``window`` items preceding each of its training occurrences.
  2. ``largest_cluster_fallback``: the cluster with the most categorised items.

All ties are broken towards the smaller cluster id, so the result depends only
on the inputs and the config: the training sequences are fed to Word2Vec in an
order fixed by a CRC32 key (independent of the caller's order), with one worker
thread, a fixed seed and a salt-free ``hashfxn``; K-means uses a fixed
``random_state`` and ``n_init``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
import zlib
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from gensim.models import Word2Vec
from gensim.models.callbacks import CallbackAny2Vec
from sklearn.cluster import BisectingKMeans, KMeans
from tqdm.auto import tqdm

from preprocessing.config import CLUSTERINGS, ClusteringConfig

logger = logging.getLogger(__name__)

PROGRESS_MIN_TOKENS = 1_000_000  # show the epoch progress bar above this many tokens
MAX_SENTENCE_TOKENS = 10_000  # gensim silently truncates longer sentences; we split them
TOP_ITEMS = 10  # items listed per cluster in clusters.json
OTHER_CATEGORY = "other"


@dataclasses.dataclass(frozen=True)
class ClusterAssignment:
    """The cluster of every item.

    Attributes:
        item_to_cluster: item id -> cluster id in ``0..num_clusters-1``; every id is used.
        names: cluster id -> name (category name, ``"other"`` or ``"c00"``...).
        method: the clustering method that produced it.
        num_clusters: effective K (may be below the requested K).
        requested_num_clusters: K from the config.
        assignment_source: how many items got their cluster each way (``kmeans``,
            ``category`` or one of the fallbacks in the module docstring).
    """

    item_to_cluster: Dict[str, int]
    names: List[str]
    method: str
    num_clusters: int
    requested_num_clusters: int
    assignment_source: Dict[str, int]

    def sizes(self) -> List[int]:
        """Returns the number of items of each cluster, indexed by cluster id."""
        sizes = [0] * self.num_clusters
        for cluster in self.item_to_cluster.values():
            sizes[cluster] += 1
        return sizes

    def to_json(self, item_counts: Mapping[str, int]) -> dict:
        """Summarises the clusters for ``clusters.json``.

        Args:
            item_counts: training interactions per item (missing items count 0).

        Returns:
            A JSON-serialisable dict with the method, effective and requested K,
            the assignment source counts and, per cluster, its id, name, size,
            training interactions and its ``TOP_ITEMS`` most frequent items
            (count descending, then item id).
        """
        members: List[List[str]] = [[] for _ in range(self.num_clusters)]
        for item, cluster in self.item_to_cluster.items():
            members[cluster].append(item)
        clusters = []
        for cluster_id, items in enumerate(members):
            ranked = sorted(items, key=lambda item: (-int(item_counts.get(item, 0)), item))
            clusters.append(
                {
                    "id": cluster_id,
                    "name": self.names[cluster_id],
                    "size": len(items),
                    "train_interactions": int(sum(item_counts.get(i, 0) for i in items)),
                    "top_items": [
                        {"item_id": item, "count": int(item_counts.get(item, 0))}
                        for item in ranked[:TOP_ITEMS]
                    ],
                }
            )
        return {
            "method": self.method,
            "num_clusters": self.num_clusters,
            "requested_num_clusters": self.requested_num_clusters,
            "assignment_source": dict(sorted(self.assignment_source.items())),
            "clusters": clusters,
        }


def fit_clusters(
    train_sequences: Sequence[Sequence[str]],
    all_items: Sequence[str],
    item_categories: Mapping[str, str],
    unseen_contexts: Mapping[str, Sequence[str]],
    config: ClusteringConfig,
) -> ClusterAssignment:
    """Assigns every item to one of (at most) K clusters.

    Args:
        train_sequences: per-user chronological training item ids (any order of users).
        all_items: every item that needs a cluster; must include all training items.
        item_categories: known item -> category (may be empty or partial).
        unseen_contexts: for items outside the training sequences, the training
            items that preceded them in users' histories.
        config: method, K and item2vec/K-means settings.

    Returns:
        The assignment; see the module docstring for the rules.

    Raises:
        ValueError: on an unknown method, K < 1, non-positive item2vec settings,
            no items, training items missing from ``all_items``, no training
            items (kmeans) or no known category (category).
    """
    if config.method not in CLUSTERINGS:
        raise ValueError(f"unknown clustering {config.method!r}; expected one of {CLUSTERINGS}")
    for name in ("num_clusters", "embedding_dim", "window", "epochs", "negative", "kmeans_n_init"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.sample < 0:
        raise ValueError(f"sample must be >= 0, got {config.sample}")
    items = list(dict.fromkeys(all_items))
    if not items:
        raise ValueError("all_items is empty: nothing to cluster")
    counts = collections.Counter(item for seq in train_sequences for item in seq)
    missing = sorted(set(counts) - set(items))
    if missing:
        raise ValueError(
            f"{len(missing)} training items missing from all_items, e.g. {missing[:5]}"
        )
    if config.method == "kmeans":
        return _fit_kmeans(train_sequences, items, counts, item_categories, unseen_contexts, config)
    return _fit_category(train_sequences, items, counts, item_categories, unseen_contexts, config)


def _majority(tally: Mapping[int, int]) -> Optional[int]:
    """Cluster id with the highest count, ties to the smaller id; None if none counted."""
    counted = [cluster for cluster, count in tally.items() if count > 0]
    if not counted:
        return None
    return min(counted, key=lambda c: (-tally[c], c))


def _largest(sizes: Sequence[int]) -> int:
    """Id of the largest cluster, ties to the smaller id."""
    return int(np.argmax(sizes))


def _stable_hash(text: str) -> int:
    """Salt-free replacement of ``hash`` for gensim's ``hashfxn``."""
    return zlib.crc32(text.encode("utf-8"))


class _EpochProgress(CallbackAny2Vec):
    """Advances a tqdm bar at the end of every Word2Vec epoch."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def on_epoch_end(self, model: Word2Vec) -> None:
        self.bar.update(1)


def _corpus(train_sequences: Sequence[Sequence[str]], seed: int) -> List[Tuple[str, ...]]:
    """Training sentences in a caller-independent, seeded pseudo-random order.

    Sentences longer than gensim's ``MAX_SENTENCE_TOKENS`` limit are split.
    """
    salt = f"{seed}\x1e"
    keyed = sorted(
        (zlib.crc32((salt + "\x1f".join(seq)).encode("utf-8")), tuple(seq))
        for seq in train_sequences
        if seq
    )
    corpus = []
    for _, seq in keyed:
        for start in range(0, len(seq), MAX_SENTENCE_TOKENS):
            corpus.append(seq[start : start + MAX_SENTENCE_TOKENS])
    return corpus


def item2vec_epochs(num_tokens: int, config: ClusteringConfig) -> int:
    """Epochs item2vec trains over ``num_tokens`` tokens under ``config.token_budget``.

    ``config.epochs``, cut so that epochs x tokens stays within the budget, but
    never below one epoch; a budget of 0 means no bound.
    """
    if config.token_budget == 0 or num_tokens == 0:
        return config.epochs
    return max(1, min(config.epochs, config.token_budget // num_tokens))


def _item2vec(corpus: List[Tuple[str, ...]], num_tokens: int, config: ClusteringConfig) -> Word2Vec:
    """Trains item2vec deterministically (one worker, fixed seed, stable hash)."""
    epochs = item2vec_epochs(num_tokens, config)
    logger.info(
        "item2vec: training %d of %d epochs on %d tokens (token_budget %d)",
        epochs,
        config.epochs,
        num_tokens,
        config.token_budget,
    )
    model = Word2Vec(
        sg=1,
        vector_size=config.embedding_dim,
        window=config.window,
        negative=config.negative,
        epochs=epochs,
        min_count=1,
        sample=config.sample,
        seed=config.seed,
        workers=1,
        hashfxn=_stable_hash,
    )
    model.build_vocab(corpus)
    with tqdm(
        total=epochs,
        desc="item2vec",
        unit="epoch",
        disable=num_tokens <= PROGRESS_MIN_TOKENS,
    ) as bar:
        model.train(
            corpus,
            total_examples=model.corpus_count,
            total_words=num_tokens,
            epochs=epochs,
            callbacks=[_EpochProgress(bar)],
        )
    return model


def _kmeans_estimator(k: int, config: ClusteringConfig) -> KMeans | BisectingKMeans:
    """scikit-learn's K-means of ``config.kmeans_strategy`` with K = ``k``."""
    if config.kmeans_strategy == "bisecting":
        return BisectingKMeans(
            n_clusters=k,
            random_state=config.seed,
            n_init=config.kmeans_n_init,
            bisecting_strategy="largest_cluster",
        )
    return KMeans(n_clusters=k, random_state=config.seed, n_init=config.kmeans_n_init)


def _fit_kmeans(
    train_sequences: Sequence[Sequence[str]],
    items: List[str],
    counts: Mapping[str, int],
    item_categories: Mapping[str, str],
    unseen_contexts: Mapping[str, Sequence[str]],
    config: ClusteringConfig,
) -> ClusterAssignment:
    """item2vec + K-means with the fallbacks for items outside the training data."""
    if not counts:
        raise ValueError("kmeans clustering needs training sequences; all are empty")
    k = config.num_clusters
    if len(counts) < k:
        logger.warning(
            "only %d distinct training items for num_clusters=%d; using K=%d",
            len(counts),
            k,
            len(counts),
        )
        k = len(counts)
    num_tokens = sum(counts.values())
    start = time.perf_counter()
    model = _item2vec(_corpus(train_sequences, config.seed), num_tokens, config)
    keys = list(model.wv.index_to_key)
    vectors = model.wv.vectors.astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors /= np.where(norms > 0, norms, 1.0)
    logger.info(
        "item2vec: %d items, %d tokens, %.1fs", len(keys), num_tokens, time.perf_counter() - start
    )

    start = time.perf_counter()
    kmeans = _kmeans_estimator(k, config).fit(vectors)
    # Compact to the labels actually used (K-means may leave a cluster empty
    # when several vectors coincide), keeping their order.
    used = np.unique(kmeans.labels_)
    relabel = {int(old): new for new, old in enumerate(used)}
    centers = kmeans.cluster_centers_[used]
    k = len(used)
    logger.info("k-means: K=%d, %.1fs", k, time.perf_counter() - start)

    item_to_cluster = {
        key: relabel[int(label)] for key, label in zip(keys, kmeans.labels_, strict=True)
    }
    sizes = np.bincount(list(item_to_cluster.values()), minlength=k)
    by_category: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for key, cluster in item_to_cluster.items():
        category = item_categories.get(key)
        if category:
            by_category[category][cluster] += 1
    source = collections.Counter({"kmeans": len(item_to_cluster)})
    for item in items:
        if item in item_to_cluster:
            continue
        cluster = _majority(by_category.get(item_categories.get(item) or "", {}))
        how = "category_majority_fallback"
        if cluster is None:
            context = [
                model.wv.key_to_index[c] for c in unseen_contexts.get(item, ()) if c in model.wv
            ]
            if context:
                mean = vectors[context].mean(axis=0)
                mean /= max(float(np.linalg.norm(mean)), 1e-12)
                cluster = int(np.argmin(((centers - mean) ** 2).sum(axis=1)))
                how = "context_centroid_fallback"
            else:
                cluster, how = _largest(sizes), "largest_cluster_fallback"
        item_to_cluster[item] = cluster
        source[how] += 1
    width = max(2, len(str(k - 1)))
    return ClusterAssignment(
        item_to_cluster={item: item_to_cluster[item] for item in items},
        names=[f"c{i:0{width}d}" for i in range(k)],
        method="kmeans",
        num_clusters=k,
        requested_num_clusters=config.num_clusters,
        assignment_source=dict(source),
    )


def _fit_category(
    train_sequences: Sequence[Sequence[str]],
    items: List[str],
    counts: Mapping[str, int],
    item_categories: Mapping[str, str],
    unseen_contexts: Mapping[str, Sequence[str]],
    config: ClusteringConfig,
) -> ClusterAssignment:
    """One cluster per category, the least-interacted ones merged into ``other``."""
    known = {item: item_categories[item] for item in items if item_categories.get(item)}
    if not known:
        raise ValueError("category clustering needs at least one item with a known category")
    interactions: Dict[str, int] = collections.Counter()
    for item, category in known.items():
        interactions[category] += counts.get(item, 0)
    ranked = sorted(set(known.values()), key=lambda c: (-interactions[c], c))
    k = config.num_clusters
    if len(ranked) <= k:
        if len(ranked) < k:
            logger.warning(
                "only %d categories for num_clusters=%d; using K=%d", len(ranked), k, len(ranked)
            )
        names = list(ranked)
    else:
        names = ranked[: k - 1]
        merged = OTHER_CATEGORY if OTHER_CATEGORY not in names else f"{OTHER_CATEGORY} (merged)"
        names.append(merged)
        logger.info("merging %d categories into %r", len(ranked) - (k - 1), merged)
    category_to_cluster = {c: min(i, len(names) - 1) for i, c in enumerate(ranked)}

    item_to_cluster = {item: category_to_cluster[c] for item, c in known.items()}
    sizes = np.bincount(list(item_to_cluster.values()), minlength=len(names))
    uncategorised = [item for item in items if item not in known]
    context_clusters = {
        item: category_to_cluster[category]
        for item, category in item_categories.items()
        if category in category_to_cluster
    }
    tallies: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for item in uncategorised:
        if item not in counts:
            context = unseen_contexts.get(item, ())
            tallies[item].update(context_clusters[c] for c in context if c in context_clusters)
    in_train = {item for item in uncategorised if item in counts}
    if in_train:
        for seq in train_sequences:
            for pos, item in enumerate(seq):
                if item in in_train:
                    context = seq[max(0, pos - config.window) : pos]
                    tallies[item].update(
                        context_clusters[c] for c in context if c in context_clusters
                    )
    source = collections.Counter({"category": len(item_to_cluster)})
    for item in uncategorised:
        cluster = _majority(tallies.get(item, {}))
        how = "context_majority_fallback"
        if cluster is None:
            cluster, how = _largest(sizes), "largest_cluster_fallback"
        item_to_cluster[item] = cluster
        source[how] += 1
    return ClusterAssignment(
        item_to_cluster={item: item_to_cluster[item] for item in items},
        names=names,
        method="category",
        num_clusters=len(names),
        requested_num_clusters=config.num_clusters,
        assignment_source=dict(source),
    )
