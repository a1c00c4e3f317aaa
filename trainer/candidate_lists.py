"""Per-cluster candidate lists of user batches: the exact scoring behind the evaluation.

``prepare`` checks a scorer's outputs and the users' histories, targets and exclusions
once; ``batches`` / ``weighted_batches`` then score every user batch exactly (NumPy
matmuls, one per cluster against that cluster's items) and yield each cluster's top
unseen items with their scores, the cluster capacities, the intent and the in-cluster
log-partitions, in batches sized by a memory budget. ``trainer.evaluation`` merges and
measures these lists.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from trainer import metrics
from trainer.config import PAD_ID

MEMORY_BUDGET_BYTES = 256 * 2**20
PROGRESS_MIN_USERS = 5000
# Working set of one user during scoring: exclusion mask plus the scores and
# selection temporaries of the largest cluster.
_BYTES_PER_USER_ITEM = 24


@runtime_checkable
class Scorer(Protocol):
    """What the evaluation needs from a model.

    Attributes:
        num_tasks: K, the number of clusters; task ``K`` is the unconditioned one.
    """

    num_tasks: int

    def item_embeddings(self) -> np.ndarray:
        """``[N + 1, d]`` item tower output; row 0 is the pad item."""

    def user_embeddings(self, history: np.ndarray, task: np.ndarray) -> np.ndarray:
        """``[B, d]`` user tower output for histories ``[B, L]`` and tasks ``[B]``."""

    def intent(self, history: np.ndarray) -> Optional[np.ndarray]:
        """``[B, K]`` intent distribution p_uk, or None for models without one."""


def interests_of(scorer: Scorer, history: np.ndarray) -> Optional[np.ndarray]:
    """``[B, I, d]`` interests of a multi-interest scorer (its optional
    ``interest_embeddings``), or None for single-vector scorers."""
    method = getattr(scorer, "interest_embeddings", None)
    if method is None:
        return None
    interests = method(history)
    if interests is None:
        return None
    interests = np.asarray(interests, dtype=np.float32)
    if interests.ndim != 3 or interests.shape[0] != history.shape[0]:
        raise ValueError(
            f"interest_embeddings() must be [{history.shape[0]}, I, d], got {interests.shape}"
        )
    return interests


@dataclasses.dataclass(frozen=True)
class EvalData:
    histories: np.ndarray
    targets: np.ndarray
    excl_ptr: np.ndarray
    excl_ids: np.ndarray
    item_cluster: np.ndarray
    items: np.ndarray  # [N + 1, d] float32
    cluster_items: Tuple[np.ndarray, ...]  # model ids of each cluster, ascending
    num_tasks: int
    users: Optional[np.ndarray] = None  # [U] user indices, for scorers keyed by user (MF)


@dataclasses.dataclass(frozen=True)
class ListBatch:
    ids: np.ndarray  # [B, K, L] per-cluster top lists
    scores: np.ndarray  # [B, K, L]
    capacity: np.ndarray  # [B, K] candidates available in each cluster
    intent: Optional[np.ndarray]  # [B, K]
    log_z: np.ndarray  # [B, K] in-cluster log-partition over the unseen items
    targets: np.ndarray  # [B]
    target_clusters: np.ndarray  # [B]
    # Multi-interest scorers with a diversity merge: each interest's global top lists.
    interest_ids: Optional[np.ndarray] = None  # [B, I, L]
    interest_scores: Optional[np.ndarray] = None  # [B, I, L]


def _exclusions(exclude: object, histories: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(indptr, ids) of every user's excluded items from a list, a CSR matrix or None."""
    users = histories.shape[0]
    if exclude is None:
        rows = [h[h != PAD_ID] for h in histories]
    elif hasattr(exclude, "indptr") and hasattr(exclude, "indices"):
        if exclude.shape[0] != users:
            raise ValueError(f"exclude has {exclude.shape[0]} rows, histories has {users}")
        return np.asarray(exclude.indptr, np.int64), np.asarray(exclude.indices, np.int64)
    else:
        rows = [np.asarray(r, dtype=np.int64).ravel() for r in exclude]
        if len(rows) != users:
            raise ValueError(f"exclude has {len(rows)} users, histories has {users}")
    ptr = np.zeros(users + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(r) for r in rows])
    ids = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return ptr, ids


def prepare(scorer: Scorer, histories, targets, exclude, item_cluster, users=None) -> EvalData:
    histories = np.asarray(histories)
    if users is not None:
        users = np.asarray(users, dtype=np.int32)
        if users.shape != (histories.shape[0],):
            raise ValueError(f"users has shape {users.shape}, expected ({histories.shape[0]},)")
    item_cluster = np.asarray(item_cluster)
    if histories.ndim != 2:
        raise ValueError(f"histories must be [U, L], got shape {histories.shape}")
    no_targets = targets is None
    targets = np.ones(histories.shape[0], np.int64) if no_targets else np.asarray(targets)
    if targets.shape != (histories.shape[0],):
        raise ValueError(
            f"targets has shape {targets.shape}, expected ({histories.shape[0]},) "
            f"for histories {histories.shape}"
        )
    if histories.shape[0] == 0:
        raise ValueError("no users to evaluate (histories is empty)")
    k = int(scorer.num_tasks)
    if k < 1:
        raise ValueError(f"scorer.num_tasks must be >= 1, got {k}")
    items = np.asarray(scorer.item_embeddings(), dtype=np.float32)
    if items.ndim != 2 or items.shape[0] < 2:
        raise ValueError(f"item_embeddings() must be [N + 1, d], got shape {items.shape}")
    n1 = items.shape[0]
    if item_cluster.shape != (n1,):
        raise ValueError(f"item_cluster has shape {item_cluster.shape}, expected ({n1},)")
    real = item_cluster[1:]
    if real.min() < 0 or real.max() >= k:
        raise ValueError(
            f"item_cluster must be in [0, {k}) for item ids >= 1, "
            f"got values in [{real.min()}, {real.max()}]"
        )
    if not no_targets and (targets.min() < 1 or targets.max() >= n1):
        raise ValueError(f"targets must be model item ids in [1, {n1 - 1}]")
    if histories.min() < 0 or histories.max() >= n1:
        raise ValueError(f"histories must hold ids in [0, {n1 - 1}]")
    ptr, ids = _exclusions(exclude, histories)
    if ids.size and (ids.min() < 0 or ids.max() >= n1):
        raise ValueError(f"exclude must hold ids in [0, {n1 - 1}]")
    item_cluster = item_cluster.astype(np.int64)
    cluster_items = tuple(np.flatnonzero(item_cluster == c) for c in range(k))
    return EvalData(
        histories.astype(np.int32), targets.astype(np.int64), ptr, ids, item_cluster,
        items, cluster_items, k, users,
    )  # fmt: skip


def batches(
    scorer: Scorer,
    data: EvalData,
    length: int,
    conditioned: bool,
    batch_size: int,
    progress: Optional[bool],
    memory_budget: int,
    interest_lists: bool = False,
    prompt_weight: float = 1.0,
) -> Iterator[ListBatch]:
    """Per-cluster top-``length`` lists of every user batch (exact, tie-consistent); with
    ``interest_lists``, also each interest's own global top lists (multi-interest scorers);
    clusters queried with the blend of ``prompt_weight`` (``score_merge.blend_queries``)."""
    for group in weighted_batches(
        scorer, data, length, conditioned, batch_size, progress, memory_budget,
        interest_lists, (prompt_weight,),
    ):  # fmt: skip
        yield group[0]


def weighted_batches(
    scorer: Scorer,
    data: EvalData,
    length: int,
    conditioned: bool,
    batch_size: int,
    progress: Optional[bool],
    memory_budget: int,
    interest_lists: bool,
    prompt_weights: Sequence[float],
) -> Iterator[Tuple[ListBatch, ...]]:
    """:func:`batches` for several prompt weights at once: one tuple of batches (in
    ``prompt_weights`` order) per user batch; the towers run once per user batch."""
    from trainer.score_merge import blend_queries, check_prompt_weight

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    weights = tuple(check_prompt_weight(w) for w in prompt_weights)
    users, k = data.histories.shape[0], data.num_tasks
    n1 = data.items.shape[0]
    per_user_item = _BYTES_PER_USER_ITEM + 4 * int(getattr(scorer, "num_interests", 0) or 0)
    step = max(1, min(batch_size, memory_budget // (per_user_item * n1)))
    show = users > PROGRESS_MIN_USERS if progress is None else progress
    blended = conditioned and any(w != 1.0 for w in weights)
    cluster_emb = [data.items[c] for c in data.cluster_items]
    with tqdm(total=users, unit="user", desc="evaluate", disable=not show) as bar:
        for start in range(0, users, step):
            stop = min(start + step, users)
            b = stop - start
            hist = data.histories[start:stop]
            lo, hi = data.excl_ptr[start], data.excl_ptr[stop]
            lens = np.diff(data.excl_ptr[start : stop + 1])
            mask = np.zeros((b, n1), dtype=bool)
            mask[np.repeat(np.arange(b), lens), data.excl_ids[lo:hi]] = True
            mask[:, PAD_ID] = True
            who = None if data.users is None else data.users[start:stop]
            interests = None if conditioned else interests_of(scorer, hist)
            every = None
            if interests is not None:
                # Multi-interest scorers: every interest's scores of the catalogue, computed
                # once for the per-cluster lists (best interest) and the interests' own lists.
                every = np.einsum("bid,nd->bin", interests, data.items)
                queries = {w: None for w in weights}
            else:
                users_emb = _user_vectors(scorer, hist, who, k, conditioned, blended)
                if users_emb.shape[-1] != data.items.shape[1]:
                    raise ValueError(
                        f"user_embeddings() has dim {users_emb.shape[-1]}, "
                        f"item_embeddings() has {data.items.shape[1]}"
                    )
                if blended:
                    prompted, plain = users_emb[:, :k], users_emb[:, k]
                    queries = {w: blend_queries(prompted, plain, w) for w in weights}
                else:
                    queries = {w: users_emb for w in weights}
            intent = scorer.intent(hist)
            if intent is not None:
                intent = np.asarray(intent, dtype=np.float64)
                if intent.shape != (b, k):
                    raise ValueError(f"intent() has shape {intent.shape}, expected {(b, k)}")
            targets = data.targets[start:stop]
            extra = {}
            if interest_lists and every is not None:
                extra = _interest_lists(every, mask, length)
            clusters = data.item_cluster[targets]
            group = []
            for w in weights:
                ids, scores, capacity, log_z = _cluster_lists(
                    data, cluster_emb, queries[w], every, mask, length, conditioned
                )
                group.append(
                    ListBatch(ids, scores, capacity, intent, log_z, targets, clusters, **extra)
                )
            yield tuple(group)
            bar.update(b)


def _user_vectors(scorer, hist, who, k: int, conditioned: bool, with_plain: bool) -> np.ndarray:
    """User vectors [B, K, d] of every cluster (conditioned; with ``with_plain`` also the
    unprompted task K: [B, K + 1, d]) or [B, 1, d] of task K (plain scorers). A scorer
    with ``cluster_user_embeddings(history, with_plain)`` gives the conditioned ones in
    one call (a model whose clusters share one tower pass runs it once)."""
    b = hist.shape[0]
    every_cluster = getattr(scorer, "cluster_user_embeddings", None)
    if conditioned and every_cluster is not None:
        extra = {} if who is None else {"users": who}
        return np.asarray(every_cluster(hist, with_plain, **extra), dtype=np.float32)
    if conditioned:
        tasks_per_row = k + 1 if with_plain else k
        tasks = np.tile(np.arange(tasks_per_row, dtype=np.int32), b)
        extra = {} if who is None else {"users": np.repeat(who, tasks_per_row)}
        out = scorer.user_embeddings(np.repeat(hist, tasks_per_row, axis=0), tasks, **extra)
        return np.asarray(out, dtype=np.float32).reshape(b, tasks_per_row, -1)
    extra = {} if who is None else {"users": who}
    out = scorer.user_embeddings(hist, np.full(b, k, dtype=np.int32), **extra)
    return np.asarray(out, dtype=np.float32)[:, None, :]


def _cluster_lists(data: EvalData, cluster_emb, queries, every, mask, length: int, conditioned):
    """(ids [B, K, L], scores [B, K, L], capacity [B, K], log_z [B, K]): each cluster's top
    unseen items by its query (``queries`` [B, K or 1, d]) or, for multi-interest scorers,
    by the best interest's score ``every`` [B, I, N + 1]."""
    from trainer.score_merge import log_partition

    b, k = mask.shape[0], data.num_tasks
    ids = np.zeros((b, k, length), dtype=np.int64)
    scores = np.full((b, k, length), -np.inf, dtype=np.float32)
    capacity = np.zeros((b, k), dtype=np.int64)
    log_z = np.full((b, k), -np.inf)
    for c, (cols, emb) in enumerate(zip(data.cluster_items, cluster_emb, strict=True)):
        if cols.size == 0:
            continue
        if every is not None:
            s = every[:, :, cols].max(axis=1)
        else:
            s = queries[:, c if conditioned else 0] @ emb.T
        excluded = mask[:, cols]
        s[excluded] = -np.inf
        capacity[:, c] = cols.size - excluded.sum(axis=1)
        log_z[:, c] = log_partition(s, excluded)
        ids[:, c], scores[:, c] = metrics.top_k_exact(s, cols, length)
    return ids, scores, capacity, log_z


def _interest_lists(every: np.ndarray, mask: np.ndarray, length: int) -> Dict[str, np.ndarray]:
    """Each interest's top-``length`` unseen items, from its scores ``every`` [B, I, N + 1]."""
    cols = np.arange(every.shape[2])
    ids, scores = [], []
    for i in range(every.shape[1]):
        s = np.where(mask, -np.inf, every[:, i])
        top_ids, top_scores = metrics.top_k_exact(s, cols, length)
        ids.append(top_ids)
        scores.append(top_scores)
    return {"interest_ids": np.stack(ids, 1), "interest_scores": np.stack(scores, 1)}
