"""The synthetic catalogue of the serving benchmarks (``bench/serving.py``,
``bench/merge_latency.py``, ``bench/request_profile.py``, ``bench/scann_sweep.py``).

Items: ``--clusters`` Gaussian centres in ``--dim`` dimensions, item = centre + noise
(isotropic, or mostly in a ``--latent-dim`` subspace), uneven cluster sizes (share of cluster
c ~ 1 / (c + 1)^0.8). Requests: 20-50 items drawn from 1-3 clusters. ``SyntheticTowers``
stands in for the trained towers, and the real ``serving.retrieval_module.RetrievalModule``
wraps them with the index plans ``dnc export`` would choose.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from serving.index_kinds import GLOBAL_LEAVES_FRACTION, LEAVES_FRACTION

# ---------------------------------------------------------------------------- data


def cluster_sizes(num_items: int, num_clusters: int, exponent: float = 0.8) -> np.ndarray:
    """Uneven cluster sizes summing to ``num_items`` (share of c ~ 1 / (c + 1)^exponent)."""
    share = 1.0 / np.arange(1, num_clusters + 1) ** exponent
    sizes = np.floor(share / share.sum() * num_items).astype(np.int64)
    sizes[0] += num_items - int(sizes.sum())
    return sizes


def synthetic_items(
    num_items: int, num_clusters: int, dim: int, noise: float, seed: int, latent_dim: int = 0
) -> Dict[str, np.ndarray]:
    """Clustered item embeddings.

    The noise around a centre is isotropic (``latent_dim`` 0) or mostly in a random
    ``latent_dim``-dimensional subspace plus 10% isotropic noise (a decaying spectrum,
    closer to learned embeddings; ANN recall depends strongly on it).

    Returns:
        ``embeddings`` [N + 1, d] float32 (row 0 = padding, zeros), ``item_cluster``
        [N + 1] int32 (index 0 = pad, cluster 0), ``centroids`` [K, d] float32 and
        ``sizes`` [K].
    """
    rng = np.random.default_rng(seed)
    centroids = rng.normal(0.0, 1.0, (num_clusters, dim)).astype(np.float32)
    sizes = cluster_sizes(num_items, num_clusters)
    cluster = np.repeat(np.arange(num_clusters, dtype=np.int32), sizes)
    rng.shuffle(cluster)
    basis = None
    if latent_dim > 0:
        basis = rng.normal(0.0, 1.0, (latent_dim, dim)) / np.sqrt(latent_dim)
    embeddings = np.zeros((num_items + 1, dim), np.float32)
    chunk = 200_000
    for start in range(0, num_items, chunk):
        stop = min(start + chunk, num_items)
        if basis is None:
            noise_part = rng.normal(0.0, noise, (stop - start, dim)).astype(np.float32)
        else:
            latent = rng.normal(0.0, noise, (stop - start, latent_dim)) @ basis
            extra = rng.normal(0.0, 0.1 * noise, (stop - start, dim))
            noise_part = (latent + extra).astype(np.float32)
        embeddings[1 + start : 1 + stop] = centroids[cluster[start:stop]] + noise_part
    item_cluster = np.concatenate([[0], cluster]).astype(np.int32)
    return {
        "embeddings": embeddings,
        "item_cluster": item_cluster,
        "centroids": centroids,
        "sizes": sizes,
    }


def item_ids(num_items: int) -> List[str]:
    """Raw item ids of item_index 0..N-1."""
    return [f"item{i}" for i in range(num_items)]


def synthetic_histories(
    item_cluster: np.ndarray,
    sizes: np.ndarray,
    count: int,
    min_len: int,
    max_len: int,
    seed: int,
) -> List[np.ndarray]:
    """``count`` request histories ([1, n] raw-id object arrays) from 1-3 clusters each."""
    rng = np.random.default_rng(seed + 1)
    members = [np.flatnonzero(item_cluster[1:] == c) for c in range(len(sizes))]
    weights = sizes / sizes.sum()
    histories = []
    for _ in range(count):
        chosen = rng.choice(len(sizes), size=int(rng.integers(1, 4)), replace=False, p=weights)
        length = int(rng.integers(min_len, max_len + 1))
        picks = [members[int(rng.choice(chosen))] for _ in range(length)]
        rows = np.array([int(m[rng.integers(len(m))]) for m in picks])
        ids = np.array([f"item{r}".encode() for r in rows], dtype=object).reshape(1, -1)
        histories.append(ids)
    return histories


# ---------------------------------------------------------------------------- model


def make_towers(data: Dict[str, np.ndarray], max_len: int, seed: int) -> Any:
    """A ``SyntheticTowers`` instance (built lazily so that import stays TF-free)."""
    import tensorflow as tf

    from trainer.config import PAD_ID
    from trainer.model import user_vector_per_task

    class SyntheticTowers(tf.Module):
        """Stand-in for ``trainer.model.RetrievalModel`` with the interface that
        ``RetrievalModule`` uses (``candidate_embeddings``, ``user_embedding``, ``intent``).

        ``e_uk = (mean history embedding * prompt_k) @ W + 0.5 centre_k`` (task K = no
        cluster: no pull); ``p(k | u) = softmax(mean . centre_k / sqrt(d))``.
        """

        def __init__(self) -> None:
            super().__init__(name="synthetic_towers")
            rng = np.random.default_rng(seed + 2)
            embeddings = data["embeddings"]
            centroids = data["centroids"]
            k, d = centroids.shape
            self.variant = SimpleNamespace(merged=True, multi_interest=False, name="synthetic-dnc")
            self.num_clusters = int(k)
            self.num_items = int(embeddings.shape[0] - 1)
            self.model_config = SimpleNamespace(max_len=int(max_len))
            self.item_embeddings = tf.Variable(embeddings, trainable=False, name="items")
            prompts = rng.normal(1.0, 0.1, (k + 1, d)).astype(np.float32)
            self.prompts = tf.Variable(prompts, trainable=False, name="prompts")
            pull = np.concatenate([0.5 * centroids, np.zeros((1, d), np.float32)])
            self.pull = tf.Variable(pull, trainable=False, name="pull")
            self.centroids = tf.Variable(centroids, trainable=False, name="centroids")
            w = np.eye(d, dtype=np.float32) + rng.normal(0, 0.05, (d, d)).astype(np.float32)
            self.w = tf.Variable(w, trainable=False, name="w")
            self.scale = float(1.0 / np.sqrt(d))

        def candidate_embeddings(self, ids: tf.Tensor) -> tf.Tensor:
            """Item embeddings of model ids."""
            return tf.gather(self.item_embeddings, ids)

        def _pool(self, history: tf.Tensor) -> tf.Tensor:
            history = tf.cast(history, tf.int32)
            mask = tf.cast(tf.not_equal(history, PAD_ID), tf.float32)[..., None]
            total = tf.reduce_sum(tf.gather(self.item_embeddings, history) * mask, axis=1)
            return total / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

        def user_embedding(self, history: tf.Tensor, task: tf.Tensor, training=False):
            """[B, max_len] history, [B] task -> [B, d]."""
            del training
            pooled = self._pool(history) * tf.gather(self.prompts, task)
            return tf.matmul(pooled, self.w) + tf.gather(self.pull, task)

        # Each task's vector is cheap here: no pass to share between the clusters.
        shares_tower_pass = False

        def cluster_user_embeddings(
            self, history: tf.Tensor, with_plain: bool = False, unprompted=None
        ) -> tf.Tensor:
            """[B, max_len] history -> [B, K (+1), d], one ``user_embedding`` per task."""
            del unprompted
            rows = self.num_clusters + 1 if with_plain else self.num_clusters
            return user_vector_per_task(self.user_embedding, history, rows)

        def intent(
            self, history: tf.Tensor, training=False, item_embeddings_t=None, unprompted=None
        ) -> tf.Tensor:
            """[B, max_len] history -> [B, K] intent probabilities."""
            del training, item_embeddings_t, unprompted
            logits = tf.matmul(self._pool(history), self.centroids, transpose_b=True)
            return tf.nn.softmax(logits * self.scale, axis=-1)

    return SyntheticTowers()


def index_plans(
    data: Dict[str, np.ndarray], index: str, args: argparse.Namespace
) -> List[Dict[str, Any]]:
    """The plan ``dnc export`` would choose for each cluster's index."""
    return [_plan(int(s), index, args, args.leaves_fraction) for s in data["sizes"]]


def build_module(
    data: Dict[str, np.ndarray],
    ids: Sequence[str],
    plans: List[Dict[str, Any]],
    vocab_dir: str,
    args: argparse.Namespace,
    per_cluster_k: bool = True,
    merge: str = "quota",
    prompt_weight: float = 1.0,
    global_index: Optional[str] = None,
) -> Any:
    """The ``RetrievalModule`` over ``data`` with the index ``plans`` (:func:`index_plans`;
    vocabulary file written to ``vocab_dir`` once); ``global_index``: the kind of one more
    index over every item (score merge at prompt weight 0; None: none); the other arguments
    as in :func:`export_synthetic`."""
    from preprocessing import features
    from serving.retrieval_module import RetrievalModule

    vocab_path = os.path.join(vocab_dir, "vocab.txt")
    if not os.path.exists(vocab_path):
        with open(vocab_path, "w", encoding="utf-8") as f:
            for raw, c in zip(ids, data["item_cluster"][1:], strict=True):
                f.write(f"{raw}{features.VOCAB_DELIMITER}{int(c)}\n")
    return RetrievalModule(
        make_towers(data, args.max_len, args.seed),
        vocab_path,
        list(ids),
        data["item_cluster"],
        plans,
        max_num_results=args.max_num_results,
        default_num_results=args.num_results,
        alpha=args.alpha,
        max_history=args.max_history,
        per_cluster_k=per_cluster_k,
        merge=merge,
        prompt_weight=prompt_weight,
        global_plan=None if global_index is None else global_plan(data, global_index, args),
    )


def global_plan(data: Dict[str, np.ndarray], index: str, args: argparse.Namespace):
    """The plan ``dnc export`` would choose for one index over every item."""
    return _plan(int(np.sum(data["sizes"])), index, args, args.global_leaves_fraction)


def _plan(size: int, index: str, args: argparse.Namespace, leaves_fraction: float):
    """``dnc export``'s plan of one index over ``size`` items (k: results + history)."""
    from serving.indexes import index_plan

    k = args.max_num_results + args.max_history
    return index_plan(size, k, index, args.scann_min_size, leaves_fraction)


def export_synthetic(
    data: Dict[str, np.ndarray],
    ids: Sequence[str],
    index: str,
    output: str,
    args: argparse.Namespace,
    per_cluster_k: bool = True,
    merge: str = "quota",
    prompt_weight: float = 1.0,
    global_index: bool = False,
) -> Dict[str, Any]:
    """Builds the ``RetrievalModule`` over ``data`` and saves it to ``output``
    (``per_cluster_k=False``: the fixed-k reference path; ``merge``, ``prompt_weight`` and
    ``global_index`` as ``dnc export``'s).

    Returns build / save seconds, the plans and the SavedModel size.
    """
    import tensorflow as tf

    os.makedirs(os.path.dirname(output), exist_ok=True)
    plans = index_plans(data, index, args)
    start = time.monotonic()
    module = build_module(
        data, ids, plans, os.path.dirname(os.path.dirname(output)), args,
        per_cluster_k=per_cluster_k, merge=merge, prompt_weight=prompt_weight,
        global_index=index if global_index else None,
    )  # fmt: skip
    build_seconds = time.monotonic() - start
    start = time.monotonic()
    tf.saved_model.save(
        module,
        output,
        signatures=module.signatures(),
        options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]),
    )
    save_seconds = time.monotonic() - start
    # What dnc export records and the server reads (max_num_results; a version with this
    # file follows the export contract, so batched histories may be padded).
    from serving.model_config import METADATA_DIR, METADATA_FILE

    os.makedirs(os.path.join(output, METADATA_DIR), exist_ok=True)
    with open(os.path.join(output, METADATA_DIR, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump({"max_num_results": args.max_num_results, "synthetic": True}, f)
    del module
    gc.collect()
    size = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(output) for f in files
    )
    return {
        "build_seconds": round(build_seconds, 2),
        "save_seconds": round(save_seconds, 2),
        "saved_model_mb": round(size / 2**20, 1),
        "plans": plans,
    }


def add_catalogue_args(p: argparse.ArgumentParser, latent_dim: int) -> None:
    """The synthetic catalogue, export and request flags this benchmark and its siblings
    (``bench/merge_latency.py``, ``bench/request_profile.py``) share."""
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--noise", type=float, default=1.0, help="item noise std around a centre")
    p.add_argument(
        "--latent-dim", type=int, default=latent_dim, help="noise subspace dimension (0: isotropic)"
    )
    p.add_argument("--num-results", type=int, default=50, help="M of serving_default")
    p.add_argument("--max-num-results", type=int, default=200, help="as dnc export")
    p.add_argument("--max-history", type=int, default=512, help="as dnc export")
    p.add_argument("--max-len", type=int, default=50, help="tower history length")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--scann-min-size", type=int, default=1024)
    p.add_argument("--leaves-fraction", type=float, default=LEAVES_FRACTION, help="as dnc export")
    p.add_argument(
        "--global-leaves-fraction",
        type=float,
        default=GLOBAL_LEAVES_FRACTION,
        help="as dnc export (the one index over all items)",
    )
    p.add_argument("--min-history", type=int, default=20)
    p.add_argument("--max-history-len", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
