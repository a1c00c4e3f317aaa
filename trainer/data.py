"""Reading the preprocessing output: items table, training samples, evaluation arrays.

Training samples are expanded from one record per user inside tf.data: a
training sequence ``s_1..s_n`` yields ``n - 1`` samples (history ``s_1..s_{t-1}``
truncated to the last ``max_len`` items, target ``s_t``), and the task of a
sample is the cluster of its target. Negatives are drawn in the same tf.data
pipeline (on the host, before a distribution strategy splits the batch) with
stateless random ops seeded from the pipeline seed, so runs are reproducible on
any strategy.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from preprocessing import features
from trainer.config import PAD_ID

# Feature keys of a training batch (model-internal; not part of the data files).
HISTORY = "history"
TARGET = "target"
TARGET_CLUSTER = "target_cluster"
USER = "user"
NEGATIVES = "negatives"
NEGATIVES_VALID = "negatives_valid"
NEGATIVES_LOG_Q = "negatives_log_q"
# All-position batches only (``trainer.sequence_data``): 1.0 where a position has a
# (history, target) pair, 0.0 on padding.
MASK = "mask"


@dataclasses.dataclass(frozen=True)
class ItemsTable:
    """The item corpus as the model sees it.

    Attributes:
        item_ids: raw item id of each item_index (``items.tsv`` order).
        item_cluster: cluster of each *model* item id (index 0 = padding, -1).
        num_clusters: K.
        num_users: size of the user vocabulary (for the MF baseline).
    """

    item_ids: np.ndarray
    item_cluster: np.ndarray
    num_clusters: int
    num_users: int

    @property
    def num_items(self) -> int:
        """N, the number of real items (model ids 1..N)."""
        return len(self.item_ids)


def load_items(data_dir: str) -> ItemsTable:
    """Reads ``items.tsv`` and ``stats.json`` of a preprocessing output directory."""
    path = os.path.join(data_dir, features.ITEMS_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{data_dir} is not a preprocessing output: {path} is missing")
    with open(path, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = tuple(next(reader))
        if header != features.ITEMS_HEADER:
            raise ValueError(f"{path}: header {header} != {features.ITEMS_HEADER}")
        rows = [(item, int(index), int(cluster)) for item, index, cluster in reader]
    rows.sort(key=lambda r: r[1])
    if [r[1] for r in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: item_index is not 0..{len(rows) - 1}")
    with open(os.path.join(data_dir, features.STATS_FILE), encoding="utf-8") as f:
        stats = json.load(f)
    item_cluster = np.array([-1] + [r[2] for r in rows], dtype=np.int32)
    return ItemsTable(
        item_ids=np.array([r[0] for r in rows], dtype=object),
        item_cluster=item_cluster,
        num_clusters=int(stats["clusters"]),
        num_users=int(stats["users"]),
    )


def _record_files(data_dir: str, split: str) -> List[str]:
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, features.records_pattern(split))))
    if not files:
        raise ValueError(f"no {split} records under {data_dir}")
    return files


def _record_spec(data_dir: str) -> Dict[str, Any]:
    """The parsing spec of the transformed records, from the TFT output (loaded once per
    transform output: ``_cached_spec`` is keyed by its directory and modification time)."""
    transform_dir = os.path.join(data_dir, features.TRANSFORM_DIR)
    return _cached_spec(transform_dir, os.stat(transform_dir).st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_spec(transform_dir: str, mtime_ns: int) -> Dict[str, Any]:
    spec = tft.TFTransformOutput(transform_dir).transformed_feature_spec()
    keys = (features.USER_INDEX, features.ITEM_INDICES, features.CLUSTER_INDICES)
    return {k: spec[k] for k in keys}


def read_split(data_dir: str, split: str) -> tf.data.Dataset:
    """Per-user records of one split: dict of user index, model item ids, clusters."""
    spec = _record_spec(data_dir)

    def parse(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        return {
            USER: tf.cast(ex[features.USER_INDEX], tf.int32),
            "items": tf.cast(tf.sparse.to_dense(ex[features.ITEM_INDICES]), tf.int32) + 1,
            "clusters": tf.cast(tf.sparse.to_dense(ex[features.CLUSTER_INDICES]), tf.int32),
        }

    files = _record_files(data_dir, split)
    return tf.data.TFRecordDataset(files, compression_type="GZIP").map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


@dataclasses.dataclass(frozen=True)
class TrainSplit:
    """The training split read once, held in memory for every epoch.

    ``dnc train`` needs the sequence lengths before the first epoch (steps per epoch,
    samples/s) and then the records every epoch; reading them once into this object serves
    both. It holds what ``read_split(...).cache()`` held: one int32 per interaction for the
    items and one for the clusters.

    Attributes:
        users: [U] user indices.
        items: [U, None] model item ids of each user, oldest first.
        clusters: [U, None] their clusters.
    """

    users: tf.Tensor
    items: tf.RaggedTensor
    clusters: tf.RaggedTensor

    @property
    def lengths(self) -> np.ndarray:
        """[U] interactions of each user."""
        return self.items.row_lengths().numpy()

    def dataset(self) -> tf.data.Dataset:
        """Per-user records, as ``read_split`` yields them, in the same order."""
        return tf.data.Dataset.from_tensor_slices(
            {USER: self.users, "items": self.items, "clusters": self.clusters}
        )


def load_train_split(data_dir: str, read_batch: int = 4096) -> TrainSplit:
    """Reads the training records of ``data_dir`` once (see :class:`TrainSplit`)."""
    parts = list(read_split(data_dir, features.TRAIN).ragged_batch(read_batch))
    if not parts:
        raise ValueError(f"no training users under {data_dir}")
    return TrainSplit(
        users=tf.concat([p[USER] for p in parts], 0),
        items=tf.concat([p["items"] for p in parts], 0),
        clusters=tf.concat([p["clusters"] for p in parts], 0),
    )


def prefix_windows(items: tf.Tensor, max_len: int) -> tf.Tensor:
    """All right-aligned history windows of one sequence.

    Args:
        items: [n] model item ids.
        max_len: L.

    Returns:
        [n - 1, L] int32: row t-1 holds ``items[:t]``'s last L items, left-padded.
    """
    n = tf.shape(items)[0]
    ends = tf.range(1, n)  # history of target t is items[:t]
    positions = ends[:, None] - max_len + tf.range(max_len)[None, :]
    padded = tf.concat([[PAD_ID], items], axis=0)
    return tf.gather(padded, tf.maximum(positions + 1, 0))


def _expand_user(record: Dict[str, tf.Tensor], max_len: int) -> tf.data.Dataset:
    items, clusters = record["items"], record["clusters"]
    n = tf.shape(items)[0]
    return tf.data.Dataset.from_tensor_slices(
        {
            HISTORY: prefix_windows(items, max_len),
            TARGET: items[1:],
            TARGET_CLUSTER: clusters[1:],
            USER: tf.fill([tf.maximum(n - 1, 0)], record[USER]),
        }
    )


def training_dataset(
    data_dir: str,
    max_len: int,
    batch_size: int,
    sampler=None,
    num_negatives: int = 1,
    shuffle_buffer: int = 100_000,
    seed: int = 42,
    repeat: bool = True,
    split: Optional[TrainSplit] = None,
) -> tf.data.Dataset:
    """Shuffled, batched (history prefix, next item) samples with sampled negatives.

    Args:
        data_dir: preprocessing output directory.
        max_len: history length L.
        batch_size: samples per batch.
        sampler: a ``trainer.samplers.NegativeSampler``; None adds no negatives.
        num_negatives: negatives per positive.
        shuffle_buffer: samples in the shuffle buffer.
        seed: seed of shuffling and negative sampling.
        repeat: repeat forever (use ``steps_per_epoch``).
        split: the training split already read (:func:`load_train_split`); None reads it.
    """
    return batched_examples(
        data_dir,
        lambda r: _expand_user(r, max_len),
        lambda b, s: _add_negatives(b, s, sampler, num_negatives),
        sampler is not None,
        batch_size,
        shuffle_buffer,
        seed,
        repeat,
        split=split,
    )


def batched_examples(
    data_dir,
    expand,
    add_negatives,
    with_negatives,
    batch_size,
    shuffle_buffer,
    seed,
    repeat,
    batch: Optional[Callable[[tf.data.Dataset], tf.data.Dataset]] = None,
    split: Optional[TrainSplit] = None,
) -> tf.data.Dataset:
    """Train users -> shuffled examples (``expand``) -> batches (+ ``add_negatives``).

    ``batch`` replaces the default fixed-size batching (``batch_size`` examples,
    remainder dropped), e.g. with length-bucketed batches. ``split`` is the training split
    already in memory (None: read ``data_dir``'s once and cache it).
    """
    if split is None:
        users = read_split(data_dir, features.TRAIN).cache()
    else:
        users = split.dataset()
    users = users.shuffle(100_000, seed=seed, reshuffle_each_iteration=True)
    examples = users.flat_map(expand)
    examples = examples.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
    if repeat:
        examples = examples.repeat()
    if batch is None:
        batches = examples.batch(batch_size, drop_remainder=True)
    else:
        batches = batch(examples)
    return with_negatives_and_prefetch(batches, add_negatives if with_negatives else None, seed)


def with_negatives_and_prefetch(
    batches: tf.data.Dataset, add_negatives: Optional[Callable] = None, seed: int = 42
) -> tf.data.Dataset:
    """``batches`` with ``add_negatives(batch, seed_pair)`` applied (None: as they are),
    prefetched. The per-batch seed pairs come from ``seed + 2``."""
    if add_negatives is not None:
        seeds = tf.data.Dataset.random(seed=seed + 2).batch(2)
        batches = tf.data.Dataset.zip((batches, seeds)).map(
            add_negatives, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    return batches.prefetch(tf.data.AUTOTUNE)


def _add_negatives(batch, seed, sampler, num_negatives):
    negatives, valid, log_q = sampler.sample(
        batch[TARGET], batch[TARGET_CLUSTER], batch[HISTORY], num_negatives, seed=seed
    )
    return {**batch, NEGATIVES: negatives, NEGATIVES_VALID: valid, NEGATIVES_LOG_Q: log_q}


def count_training_samples(data_dir: str, split: Optional[TrainSplit] = None) -> int:
    """Number of (prefix, target) samples of one epoch (of ``split`` if given)."""
    lengths = (load_train_split(data_dir) if split is None else split).lengths
    return int(np.maximum(lengths - 1, 0).sum())


@dataclasses.dataclass(frozen=True)
class EvaluationData:
    """Held-out targets of one split with their histories.

    Attributes:
        users: user index of each row.
        histories: [U, L] right-aligned model item ids (the last L before the target).
        targets: [U] held-out model item ids.
        exclude: each user's full history (everything before the target).
    """

    users: np.ndarray
    histories: np.ndarray
    targets: np.ndarray
    exclude: List[np.ndarray]


def evaluation_data(
    data_dir: str, split: str, max_len: int, max_users: Optional[int] = None, seed: int = 0
) -> EvaluationData:
    """Reads the validation or test split into arrays for ``trainer.evaluation``.

    With ``max_users`` a seeded random subset of users is kept (fast per-epoch
    validation); the test evaluation uses every user.
    """
    if split == features.TRAIN:
        raise ValueError("evaluation needs the validation or test split, not train")
    users, histories, targets, exclude = [], [], [], []
    for record in read_split(data_dir, split).as_numpy_iterator():
        items = record["items"]
        if len(items) < 2:
            continue
        history = items[:-1]
        window = np.zeros(max_len, dtype=np.int32)
        tail = history[-max_len:]
        window[max_len - len(tail) :] = tail
        users.append(record[USER])
        histories.append(window)
        targets.append(items[-1])
        exclude.append(history.astype(np.int32))
    order = np.argsort(users, kind="stable")
    if max_users is not None and max_users < len(order):
        order = np.sort(np.random.default_rng(seed).choice(order, max_users, replace=False))
    return EvaluationData(
        users=np.asarray(users, dtype=np.int32)[order],
        histories=np.stack(histories)[order] if histories else np.zeros((0, max_len), np.int32),
        targets=np.asarray(targets, dtype=np.int32)[order],
        exclude=[exclude[i] for i in order],
    )
