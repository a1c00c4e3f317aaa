"""The top-k indexes of the serving graph: per-cluster plans, builds and ScaNN state.

``index_plan`` sizes one index (ScaNN leaves, leaves searched, re-scored candidates, or
exact brute force for small clusters), ``build_index`` builds one ``tfrs`` top-k layer
over given embeddings and identifiers, and ``build_indexes`` builds a catalogue's indexes,
on a thread pool from ``PARALLEL_BUILD_MIN_ITEMS`` items. ``serving.retrieval_module``
holds the indexes it builds; ``dnc export`` picks the plans.
"""

from __future__ import annotations

import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from serving.index_kinds import INDEX_KINDS, LEAVES_FRACTION

# Exactly re-scored candidates per ScaNN search, in multiples of the plan's k (index_plan).
REORDER_FACTOR = 2


def index_plan(
    size: int,
    k: int,
    kind: str,
    scann_min_size: int = 1024,
    leaves_fraction: float = LEAVES_FRACTION,
    coverage: float = 4.0,
) -> Dict[str, object]:
    """Index parameters of one cluster (or of the whole corpus for plain variants).

    ScaNN gets ``num_leaves ~ sqrt(size)`` and searches ``leaves_fraction`` of them, but
    at least enough leaves to hold ``coverage * k`` points on average (so that the tree
    search nearly always yields k candidates); ``REORDER_FACTOR * k`` asymmetric-hashing
    candidates are re-scored exactly. ``bench/scann_sweep.py`` (``docs/serving-results.md``)
    chose both: recall against exact search is bounded by the quantized scores, not by the
    leaves, until about 16 times the request's k is re-scored; the export's k (results +
    history + exclusions, 812 by default) is about 8 times a typical request's, hence 2.
    Clusters smaller than ``scann_min_size`` (or ones where k covers the cluster) use exact
    brute force.

    Args:
        size: number of items indexed.
        k: candidates returned per query.
        kind: ``scann`` or ``brute-force``.
        scann_min_size: smallest cluster served by ScaNN.
        leaves_fraction: share of the leaves searched.
        coverage: minimum expected searched points, in multiples of k.

    Returns:
        ``{"kind", "size", "k"}`` plus ``num_leaves``, ``num_leaves_to_search`` and
        ``num_reordering_candidates`` for ScaNN.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
    if size < 0 or k < 0:
        raise ValueError(f"size and k must be >= 0, got size={size}, k={k}")
    k = min(k, size)
    if kind == "brute-force" or size < max(scann_min_size, 16) or k >= size:
        return {"kind": "brute-force", "size": size, "k": k}
    num_leaves = max(2, int(round(math.sqrt(size))))
    needed = math.ceil(coverage * k * num_leaves / size)
    search = min(num_leaves, max(1, math.ceil(leaves_fraction * num_leaves), needed))
    return {
        "kind": "scann",
        "size": size,
        "k": k,
        "num_leaves": num_leaves,
        "num_leaves_to_search": search,
        "num_reordering_candidates": min(size, REORDER_FACTOR * k),
    }


class TransposedBruteForce(tfrs.layers.factorized_top_k.BruteForce):
    """``tfrs`` ``BruteForce`` that stores its candidates transposed, ``[d, n]``.

    The parent scores a batch of queries as ``matmul(queries, candidates,
    transpose_b=True)``. On CPU that product is about 6x slower for one query than a
    product with a stored ``[d, n]`` operand (11 vs 1.9 ms at 108K x 100,
    ``docs/scale.md``), and serving asks one query per request. Same results, same
    memory (one copy, transposed), same ``call``.
    """

    def index(
        self, candidates: tf.Tensor, identifiers: Optional[tf.Tensor] = None
    ) -> TransposedBruteForce:
        """Indexes ``candidates`` [n, d] under ``identifiers`` [n] (default: row numbers)."""
        candidates = tf.convert_to_tensor(candidates)
        if candidates.shape.rank != 2:
            raise ValueError(f"The candidates tensor must be 2D (got {candidates.shape}).")
        if identifiers is None:
            identifiers = tf.range(candidates.shape[0])
        identifiers = tf.convert_to_tensor(identifiers)
        if candidates.shape[0] != identifiers.shape[0]:
            raise ValueError(
                f"{candidates.shape[0]} candidate rows but {identifiers.shape[0]} identifiers"
            )
        self._identifiers = self.add_weight(
            name="identifiers",
            dtype=identifiers.dtype,
            shape=identifiers.shape,
            initializer=tf.keras.initializers.Constant(tf.zeros((), identifiers.dtype)),
            trainable=False,
        )
        self._candidates = self.add_weight(
            name="candidates_t",
            dtype=candidates.dtype,
            shape=[candidates.shape[1], candidates.shape[0]],
            initializer=tf.keras.initializers.Zeros(),
            trainable=False,
        )
        self._identifiers.assign(identifiers)
        self._candidates.assign(tf.transpose(candidates))
        self._reset_tf_function_cache()
        return self

    def _compute_score(self, queries: tf.Tensor, candidates: tf.Tensor) -> tf.Tensor:
        return tf.matmul(queries, candidates)  # candidates are stored [d, n]


def build_index(
    plan: Dict[str, object], embeddings: np.ndarray, identifiers: np.ndarray, name: str
) -> tf.keras.layers.Layer:
    """A tfrs top-k layer over ``embeddings`` [n, d] returning ``identifiers`` [n] (the
    serving graph passes int32 model ids; strings work too)."""
    k = int(plan["k"])
    identifiers = np.asarray(identifiers)
    if identifiers.dtype.kind in "OSU":
        identifiers = identifiers.astype(object).astype(bytes)
    ids = tf.constant(identifiers)
    if plan["kind"] == "scann":
        index = tfrs.layers.factorized_top_k.ScaNN(
            k=k,
            num_leaves=int(plan["num_leaves"]),
            num_leaves_to_search=int(plan["num_leaves_to_search"]),
            num_reordering_candidates=int(plan["num_reordering_candidates"]),
            name=name,
        )
        index.index(tf.constant(embeddings, tf.float32), ids)
        index._serialized_searcher = _NamedScannState(
            index._serialized_searcher, f"dnc-{name}-{uuid.uuid4().hex}"
        )
        return index
    index = TransposedBruteForce(k=k, name=name)
    return index.index(tf.constant(embeddings, tf.float32), ids)


PARALLEL_BUILD_MIN_ITEMS = 100_000


def build_indexes(
    jobs: Sequence[Tuple[Dict[str, object], np.ndarray, str]], embeddings: np.ndarray
) -> List[Optional[tf.keras.layers.Layer]]:
    """:func:`build_index` of every ``(plan, model ids, name)`` job over those rows of
    ``embeddings`` (None for no rows); one thread per core from ``PARALLEL_BUILD_MIN_ITEMS``
    items on.

    ScaNN's training releases the GIL and keeps the cores only partly busy: building a
    catalogue's indexes two at a time on 2 cores took 10.0 s instead of 14.2 s. Smaller
    catalogues, where the time does not matter, are built one index at a time. Two ScaNN
    builds of one catalogue (threaded or not) may differ in the last bit of a score, so
    tests compare their lists item for item and their scores to 1e-6.
    """

    def build(job: Tuple[Dict[str, object], np.ndarray, str]):
        plan, rows, name = job
        if rows.size == 0:
            return None
        return build_index(plan, embeddings[rows], rows.astype(np.int32), name)

    items = sum(int(rows.size) for _, rows, _ in jobs)
    threads = max(1, os.cpu_count() or 1) if items >= PARALLEL_BUILD_MIN_ITEMS else 1
    with ThreadPoolExecutor(threads, thread_name_prefix="index") as pool:
        return list(pool.map(build, jobs))


class _NamedScannState(tf.Module):
    """A ScaNN searcher state whose resource has its own ``shared_name``.

    ``scann_ops.ScannState.recreate_handle`` leaves ``shared_name`` empty, so the
    resource is named after its graph node; in a SavedModel every index's node has
    the same name and all indexes silently share the first searcher built. A unique
    name per index (and per export) keeps them apart.
    """

    def __init__(self, state: tf.Module, shared_name: str) -> None:
        super().__init__()
        self.state = state
        self.shared_name = shared_name

    @tf.function(input_signature=[])
    def recreate_handle(self) -> tf.Tensor:
        """The searcher resource (built on first use, then shared by name)."""
        from scann.scann_ops.py import scann_ops

        s = self.state
        return scann_ops.tensors_to_scann(
            s.dataset,
            s.scann_config,
            s.serialized_partitioner,
            s.datapoint_to_token,
            s.ah_codebook,
            s.hashed_dataset,
            s.int8_dataset,
            s.int8_multipliers,
            s.dp_norms,
            shared_name=self.shared_name,
        )
