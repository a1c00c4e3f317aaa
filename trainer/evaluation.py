"""Exact offline evaluation of divide-and-conquer and plain retrieval models.

Protocol (the paper's): the candidates of a user are all items not in its
history; Recall@M is the share of users whose held-out item is among the M
returned items.

* Merged models (``merged=True``) condition the user tower on every cluster k,
  retrieve a top list inside each cluster, and keep the first
  ``M_k ~ M * p_uk^alpha / sum_j p_uj^alpha`` items of cluster k
  (``trainer.quotas.compute_quotas``: integers summing to M, capped by the
  items available in each cluster, remainder redistributed).
* Plain models (``merged=False``) rank every candidate with the unconditioned
  embedding (task ``K``) and return the global top-M.
* Multi-interest models (scorers with ``interest_embeddings``: ``mind``, ``comirec-sa``)
  retrieve with each of their I interests and merge the lists by score, which is the
  global top-M of ``max_k v_k . e_i`` (``trainer.interest_merge``); ComiRec's diversity
  aggregation (``diversity_lambda > 0``) greedily re-selects from the same lists.

Scoring is exact (NumPy matmuls, no ANN). Per batch, each cluster's items are
scored once, against that cluster's user embedding, so the work is
``B * (N + 1) * d`` whatever K; the top lists are computed once for the largest
M and reused for every M and every alpha.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterator, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from trainer import metrics
from trainer.alpha import check_alpha
from trainer.config import PAD_ID
from trainer.metrics import AlphaSelection, EvaluationResult, MergeSelection

DEFAULT_ALPHA = 1.0
DEFAULT_ALPHA_GRID: Tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, math.inf)
# alpha = 1 is the hierarchical softmax; 0 ignores the intent, inf takes clusters in order.
SCORE_ALPHA_GRID: Tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 4.0, math.inf)
MERGE_GRIDS: Dict[str, Tuple[float, ...]] = {
    "quota": DEFAULT_ALPHA_GRID,
    "score": SCORE_ALPHA_GRID,
}
# Prompt weights of the score merge (trainer.score_merge.blend_queries): 1 is the full
# score merge, 0 the unprompted global ranking; first in order wins ties.
PROMPT_WEIGHT_GRID: Tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)
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
class _Data:
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
class _Batch:
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


def _prepare(scorer: Scorer, histories, targets, exclude, item_cluster, users=None) -> _Data:
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
    return _Data(
        histories.astype(np.int32), targets.astype(np.int64), ptr, ids, item_cluster,
        items, cluster_items, k, users,
    )  # fmt: skip


def _batches(
    scorer: Scorer,
    data: _Data,
    length: int,
    conditioned: bool,
    batch_size: int,
    progress: Optional[bool],
    memory_budget: int,
    interest_lists: bool = False,
    prompt_weight: float = 1.0,
) -> Iterator[_Batch]:
    """Per-cluster top-``length`` lists of every user batch (exact, tie-consistent); with
    ``interest_lists``, also each interest's own global top lists (multi-interest scorers);
    clusters queried with the blend of ``prompt_weight`` (``score_merge.blend_queries``)."""
    for group in _weighted_batches(
        scorer, data, length, conditioned, batch_size, progress, memory_budget,
        interest_lists, (prompt_weight,),
    ):  # fmt: skip
        yield group[0]


def _weighted_batches(
    scorer: Scorer,
    data: _Data,
    length: int,
    conditioned: bool,
    batch_size: int,
    progress: Optional[bool],
    memory_budget: int,
    interest_lists: bool,
    prompt_weights: Sequence[float],
) -> Iterator[Tuple[_Batch, ...]]:
    """:func:`_batches` for several prompt weights at once: one tuple of batches (in
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
                    _Batch(ids, scores, capacity, intent, log_z, targets, clusters, **extra)
                )
            yield tuple(group)
            bar.update(b)


def _user_vectors(scorer, hist, who, k: int, conditioned: bool, with_plain: bool) -> np.ndarray:
    """User vectors [B, K, d] of every cluster (conditioned; with ``with_plain`` also the
    unprompted task K: [B, K + 1, d]) or [B, 1, d] of task K (plain scorers)."""
    b = hist.shape[0]
    if conditioned:
        tasks_per_row = k + 1 if with_plain else k
        tasks = np.tile(np.arange(tasks_per_row, dtype=np.int32), b)
        extra = {} if who is None else {"users": np.repeat(who, tasks_per_row)}
        out = scorer.user_embeddings(np.repeat(hist, tasks_per_row, axis=0), tasks, **extra)
        return np.asarray(out, dtype=np.float32).reshape(b, tasks_per_row, -1)
    extra = {} if who is None else {"users": who}
    out = scorer.user_embeddings(hist, np.full(b, k, dtype=np.int32), **extra)
    return np.asarray(out, dtype=np.float32)[:, None, :]


def _cluster_lists(data: _Data, cluster_emb, queries, every, mask, length: int, conditioned):
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


def _plain_list(batch: _Batch, m: int, item_cluster: np.ndarray, lam: float) -> np.ndarray:
    """The global top-m of a plain model (for multi-interest scorers: of the best interest's
    score), or ComiRec's diversity merge of the interests' own lists."""
    if batch.interest_ids is not None:
        from trainer.interest_merge import diversity_merge  # loads TensorFlow

        return diversity_merge(
            batch.interest_scores[:, :, :m], batch.interest_ids[:, :, :m], item_cluster, m, lam
        )
    return metrics.global_from_cluster_lists(batch.ids[:, :, :m], batch.scores[:, :, :m], m)


def _merge(
    batch: _Batch, m: int, alpha: float, merge: str = "quota", prompt_weight: float = 1.0
) -> np.ndarray:
    """Merge of a batch's per-cluster lists for list size m (uniform p without intent).

    ``quota``: integer quotas (``trainer.quotas``), lists in cluster order;
    ``score``: top-m by the joint score (``trainer.score_merge``), best first; the batch's
    lists must come from the queries of the same ``prompt_weight``.
    """
    # Imported here: both modules load TensorFlow, which NumPy-only callers do not need.
    from trainer import score_merge
    from trainer.quotas import compute_quotas

    p = batch.intent if batch.intent is not None else np.ones(batch.capacity.shape)
    if merge == "score":
        ids, _, _ = score_merge.score_merge(
            batch.scores[:, :, :m], batch.ids[:, :, :m], batch.log_z, p, alpha, m, prompt_weight
        )
        return ids
    quotas = np.asarray(compute_quotas(p, m, alpha, batch.capacity), dtype=np.int64)
    return metrics.merge_lists(batch.ids[:, :, :m], quotas)


def _check_m(m_values: Sequence[int]) -> Tuple[int, ...]:
    ms = tuple(int(m) for m in m_values)
    if not ms or min(ms) < 1:
        raise ValueError(f"list sizes M must be >= 1, got {tuple(m_values)}")
    return ms


def _check_prompt_weight(prompt_weight: float, merge: str) -> float:
    from trainer.score_merge import check_prompt_weight  # loads TensorFlow

    return check_prompt_weight(prompt_weight, merge)


def selection_weights(prompt_weight: Optional[float] = None) -> Tuple[float, ...]:
    """The score merge's prompt weights left to select on validation: ``PROMPT_WEIGHT_GRID``,
    or the one given."""
    return PROMPT_WEIGHT_GRID if prompt_weight is None else (float(prompt_weight),)


def _check_merge(merge: str) -> str:
    if merge not in MERGE_GRIDS:
        raise ValueError(f"unknown merge {merge!r}; expected one of {tuple(MERGE_GRIDS)}")
    return merge


def _points(grids: Dict[str, Sequence[float]], prompt_weights: Sequence[float]) -> list:
    """(merge, alpha, prompt_weight) selection points in tie-breaking order: the quota merge
    at weight 1; the score merge at every weight, a single alpha at weight 0 (no offsets)."""
    from trainer.score_merge import check_prompt_weight

    weights = tuple(check_prompt_weight(w) for w in prompt_weights)
    if not weights:
        raise ValueError("prompt_weights must hold at least one weight")
    points = []
    for merge, alphas in grids.items():
        alphas = [check_alpha(a) for a in alphas]
        for w in weights if _check_merge(merge) == "score" else (1.0,):
            points += [(merge, a, w) for a in (alphas[:1] if w == 0.0 else alphas)]
    return points


def evaluate(
    scorer: Scorer,
    histories: np.ndarray,
    targets: np.ndarray,
    exclude: object,
    item_cluster: np.ndarray,
    m_values: Sequence[int] = (20, 50),
    alpha: Optional[float] = None,
    merged: bool = True,
    batch_size: int = 256,
    progress: Optional[bool] = None,
    memory_budget: int = MEMORY_BUDGET_BYTES,
    users: Optional[np.ndarray] = None,
    merge: str = "quota",
    diversity_lambda: float = 0.0,
    prompt_weight: float = 1.0,
) -> EvaluationResult:
    """Exact Recall@M, within-cluster recall, intent accuracy and diversity.

    Args:
        scorer: the model (see :class:`Scorer`).
        histories: ``[U, L]`` right-aligned model item ids, left padding.
        targets: ``[U]`` held-out model item ids.
        exclude: each user's history items (everything before the target, may be
            longer than L): a list of int arrays, a CSR matrix ``[U, N + 1]``, or
            None to use the non-pad items of ``histories``. A target that is also
            in ``exclude`` can never be returned (counts as a miss).
        item_cluster: ``[N + 1]`` cluster of each model item id (-1 for pad).
        m_values: list sizes M.
        alpha: quota exponent; None means ``DEFAULT_ALPHA`` (1). Ignored (0) when
            the scorer has no intent. Pick it on validation with :func:`select_alpha`.
        merged: divide-and-conquer merge (True) or global top-M of the
            unconditioned embedding (False).
        batch_size: users per batch (lowered to fit ``memory_budget``).
        progress: tqdm bar over users; None shows it above 5000 users.
        memory_budget: approximate bytes of scoring working set per batch.
        users: ``[U]`` user indices, passed to ``scorer.user_embeddings(..., users=)``
            for scorers keyed by user (the MF baseline); None for sequence models.
        merge: ``quota`` (the paper's integer quotas) or ``score`` (the joint
            hierarchical-softmax score, ``trainer.score_merge``).
        diversity_lambda: multi-interest scorers: ComiRec's diversity weight for merging
            the interests' lists (``trainer.interest_merge.diversity_merge``; 0 merges by
            score, the paper's protocol).
        prompt_weight: the score merge's blend of prompted and unprompted queries
            (``trainer.score_merge``; 1 = the full score merge). The quota merge needs 1.

    Returns:
        The :class:`EvaluationResult`. ``within_cluster_recall`` is also the recall
        of an oracle intent: the top-M of the target's own cluster.
    """
    ms = _check_m(m_values)
    _check_merge(merge)
    alpha = check_alpha(DEFAULT_ALPHA if alpha is None else alpha)
    data = _prepare(scorer, histories, targets, exclude, item_cluster, users)
    k = data.num_tasks
    # Per-user values, averaged at the end: results do not depend on the batching.
    parts: Dict[str, list] = {}

    def add(key: str, values: np.ndarray) -> None:
        parts.setdefault(key, []).append(np.asarray(values, dtype=np.float64))

    has_intent = False
    lam = float(diversity_lambda)
    if not lam >= 0:
        raise ValueError(f"diversity_lambda must be >= 0, got {diversity_lambda}")
    prompt_weight = _check_prompt_weight(prompt_weight, merge)
    batches = _batches(
        scorer, data, max(ms), merged, batch_size, progress, memory_budget, lam > 0, prompt_weight
    )
    for batch in batches:
        has_intent = batch.intent is not None
        used_alpha = alpha if has_intent else 0.0
        if has_intent:
            add("intent_top1", metrics.intent_hits(batch.intent, batch.target_clusters, 1))
            add("intent_top3", metrics.intent_hits(batch.intent, batch.target_clusters, 3))
        rows = np.arange(batch.targets.shape[0])
        for m in ms:
            if merged:
                lists = _merge(batch, m, used_alpha, merge, prompt_weight)
            else:
                lists = _plain_list(batch, m, data.item_cluster, lam)
                merged_lists = _merge(batch, m, used_alpha, merge, prompt_weight)
                add(f"merged_recall@{m}", metrics.hits(merged_lists, batch.targets))
            add(f"recall@{m}", metrics.hits(lists, batch.targets))
            if m == max(ms):
                add("target_cluster", batch.target_clusters)
            own = batch.ids[rows, batch.target_clusters, :m]
            add(f"within_cluster_recall@{m}", metrics.hits(own, batch.targets))
            covered, entropy = metrics.cluster_diversity(lists, data.item_cluster, k)
            add(f"clusters_covered@{m}", covered)
            add(f"entropy@{m}", entropy)

    users = data.histories.shape[0]
    hits_at_m = np.concatenate(parts[f"recall@{max(ms)}"])
    target_cluster = np.concatenate(parts.pop("target_cluster")).astype(np.int64)
    cluster_recall = {
        int(c): float(hits_at_m[target_cluster == c].mean()) for c in np.unique(target_cluster)
    }
    means = {key: float(np.mean(np.concatenate(values))) for key, values in parts.items()}

    def per_m(name: str) -> Dict[int, float]:
        return {m: means[f"{name}@{m}"] for m in ms}

    return EvaluationResult(
        users=users,
        merged=merged,
        alpha=alpha if has_intent else 0.0,
        merge=merge,
        m_values=ms,
        recall=per_m("recall"),
        within_cluster_recall=per_m("within_cluster_recall"),
        clusters_covered=per_m("clusters_covered"),
        entropy=per_m("entropy"),
        merged_recall=None if merged else per_m("merged_recall"),
        intent_top1=means["intent_top1"] if has_intent else None,
        intent_top3=means["intent_top3"] if has_intent else None,
        diversity_lambda=lam,
        cluster_recall=cluster_recall,
    )


def select_merge(
    scorer: Scorer,
    histories: np.ndarray,
    targets: np.ndarray,
    exclude: object,
    item_cluster: np.ndarray,
    grids: Optional[Dict[str, Sequence[float]]] = None,
    m: int = 50,
    merged: bool = True,
    batch_size: int = 256,
    progress: Optional[bool] = None,
    memory_budget: int = MEMORY_BUDGET_BYTES,
    users: Optional[np.ndarray] = None,
    prompt_weights: Sequence[float] = PROMPT_WEIGHT_GRID,
) -> MergeSelection:
    """Picks the merge, its alpha and (score merge) its prompt weight with the best
    validation Recall@m.

    The towers run once per batch and the per-cluster top lists once per prompt weight;
    only the (cheap) merges are repeated for every point of the grids.

    Args:
        scorer: the model; it must have an intent head.
        histories, targets, exclude, item_cluster: validation data, as in :func:`evaluate`.
        grids: merge -> candidate alphas (>= 0, ``math.inf`` allowed); None:
            ``MERGE_GRIDS`` (both merges).
        m: list size of the selection metric.
        merged: per-cluster lists from the conditioned tower (True) or from the
            unconditioned embedding (False, the merge column of plain models).
        batch_size, progress, memory_budget: as in :func:`evaluate`.
        prompt_weights: the score merge's candidate weights (``PROMPT_WEIGHT_GRID``).

    Returns:
        The :class:`MergeSelection` (the first point in grid order wins ties).
    """
    (m,) = _check_m((m,))
    grids = MERGE_GRIDS if grids is None else grids
    points = _points(grids, prompt_weights)
    if not points:
        raise ValueError("grids must hold at least one alpha")
    weights = tuple(dict.fromkeys(w for _, _, w in points))
    data = _prepare(scorer, histories, targets, exclude, item_cluster, users)
    found = {point: 0.0 for point in points}
    batches = _weighted_batches(
        scorer, data, m, merged, batch_size, progress, memory_budget, False, weights
    )
    for group in batches:
        if group[0].intent is None:
            raise ValueError("merge selection needs a scorer with intent (intent() returned None)")
        for merge, a, w in points:
            batch = group[weights.index(w)]
            hits = metrics.hits(_merge(batch, m, a, merge, w), batch.targets)
            found[(merge, a, w)] += float(np.sum(hits))
    users = data.histories.shape[0]
    recalls = {point: found[point] / users for point in points}
    best = max(points, key=lambda point: (recalls[point], -points.index(point)))
    return MergeSelection(
        merge=best[0], alpha=best[1], m=m, recalls=recalls, users=users, prompt_weight=best[2]
    )


def selection_grids(
    merge: Optional[str] = None, alpha: Optional[float] = None
) -> Dict[str, Tuple[float, ...]]:
    """The (merge, alpha) points left to select on validation when some are fixed.

    ``merge=None`` searches both merges, ``alpha=None`` each merge's grid; a given
    value pins that part (so both given leaves one point).
    """
    merges = tuple(MERGE_GRIDS) if merge is None else (_check_merge(merge),)
    if alpha is None:
        return {g: MERGE_GRIDS[g] for g in merges}
    return {g: (check_alpha(alpha),) for g in merges}


def select_alpha(
    scorer: Scorer,
    histories: np.ndarray,
    targets: np.ndarray,
    exclude: object,
    item_cluster: np.ndarray,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    m: int = 50,
    merged: bool = True,
    batch_size: int = 256,
    progress: Optional[bool] = None,
    memory_budget: int = MEMORY_BUDGET_BYTES,
    users: Optional[np.ndarray] = None,
    merge: str = "quota",
) -> AlphaSelection:
    """Picks the alpha of one merge with the best validation Recall@m.

    Arguments as in :func:`select_merge`, with one ``grid`` for ``merge``.

    Returns:
        The :class:`AlphaSelection` (best alpha first in grid order on ties).
    """
    alphas = tuple(check_alpha(a) for a in grid)
    if not alphas:
        raise ValueError("grid must hold at least one alpha")
    sel = select_merge(
        scorer, histories, targets, exclude, item_cluster, {merge: alphas}, m, merged,
        batch_size, progress, memory_budget, users, prompt_weights=(1.0,),
    )  # fmt: skip
    recalls = {a: r for (_, a, _), r in sel.recalls.items()}
    return AlphaSelection(alpha=sel.alpha, m=sel.m, recalls=recalls, users=sel.users)


def retrieve(
    scorer: Scorer,
    histories: np.ndarray,
    exclude: object,
    item_cluster: np.ndarray,
    m: int,
    alpha: Optional[float] = None,
    merged: bool = True,
    batch_size: int = 256,
    progress: Optional[bool] = None,
    memory_budget: int = MEMORY_BUDGET_BYTES,
    users: Optional[np.ndarray] = None,
    merge: str = "quota",
    prompt_weight: float = 1.0,
) -> np.ndarray:
    """The M items :func:`evaluate` returns to every user (for inspection and tests).

    Returns:
        ``[U, m]`` model item ids, ``PAD_ID`` where fewer than m candidates
        exist. Plain lists and score-merged lists are ordered best first;
        quota-merged lists are in cluster order (each cluster's share best first).
    """
    (m,) = _check_m((m,))
    _check_merge(merge)
    alpha = check_alpha(DEFAULT_ALPHA if alpha is None else alpha)
    prompt_weight = _check_prompt_weight(prompt_weight, merge)
    data = _prepare(scorer, histories, None, exclude, item_cluster, users)
    out = []
    batches = _batches(
        scorer, data, m, merged, batch_size, progress, memory_budget, False, prompt_weight
    )
    for batch in batches:
        if merged:
            used = alpha if batch.intent is not None else 0.0
            lists = _merge(batch, m, used, merge, prompt_weight)
        else:
            lists = metrics.global_from_cluster_lists(batch.ids, batch.scores, m)
        out.append(lists[:, :m])
    return np.concatenate(out)
