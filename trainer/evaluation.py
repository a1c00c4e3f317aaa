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

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from trainer import candidate_lists, metrics
from trainer.alpha import check_alpha
from trainer.candidate_lists import MEMORY_BUDGET_BYTES, ListBatch, Scorer
from trainer.merges import (
    DEFAULT_ALPHA,
    check_m,
    check_merge,
    check_prompt_weight,
    merge_batch,
)
from trainer.metrics import EvaluationResult


def _plain_list(batch: ListBatch, m: int, item_cluster: np.ndarray, lam: float) -> np.ndarray:
    """The global top-m of a plain model (for multi-interest scorers: of the best interest's
    score), or ComiRec's diversity merge of the interests' own lists."""
    if batch.interest_ids is not None:
        from trainer.interest_merge import diversity_merge  # loads TensorFlow

        return diversity_merge(
            batch.interest_scores[:, :, :m], batch.interest_ids[:, :, :m], item_cluster, m, lam
        )
    return metrics.global_from_cluster_lists(batch.ids[:, :, :m], batch.scores[:, :, :m], m)


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

    :func:`evaluate_weights` at the one ``prompt_weight``; the arguments are its.

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
            the scorer has no intent. Pick it on validation with
            :func:`trainer.merge_selection.select_merge`.
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
    (result,) = evaluate_weights(
        scorer, histories, targets, exclude, item_cluster, m_values, alpha, merged,
        batch_size, progress, memory_budget, users, merge, diversity_lambda, (prompt_weight,),
    )  # fmt: skip
    return result


def evaluate_weights(
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
    prompt_weights: Sequence[float] = (1.0,),
) -> Tuple[EvaluationResult, ...]:
    """:func:`evaluate` at several prompt weights of the score merge, one result per weight
    (in order). The towers run once per user batch whatever the number of weights
    (``candidate_lists.weighted_batches``); each weight gets its own per-cluster lists.
    """
    ms = check_m(m_values)
    check_merge(merge)
    alpha = check_alpha(DEFAULT_ALPHA if alpha is None else alpha)
    data = candidate_lists.prepare(scorer, histories, targets, exclude, item_cluster, users)
    lam = float(diversity_lambda)
    if not lam >= 0:
        raise ValueError(f"diversity_lambda must be >= 0, got {diversity_lambda}")
    weights = tuple(check_prompt_weight(w, merge) for w in prompt_weights)
    if not weights:
        raise ValueError("prompt_weights must hold at least one weight")
    # Per-user values of each weight, averaged at the end: results do not depend on the
    # batching.
    sums: Tuple[Dict[str, list], ...] = tuple({} for _ in weights)
    has_intent = False
    batches = candidate_lists.weighted_batches(
        scorer, data, max(ms), merged, batch_size, progress, memory_budget, lam > 0, weights
    )
    for group in batches:
        has_intent = group[0].intent is not None
        for parts, batch, w in zip(sums, group, weights, strict=True):
            _add_batch(parts, batch, ms, alpha if has_intent else 0.0, merged, merge, w, data, lam)
    return tuple(_result(parts, data, ms, merged, merge, alpha, has_intent, lam) for parts in sums)


def _add_batch(
    parts: Dict[str, list],
    batch: ListBatch,
    ms: Tuple[int, ...],
    alpha: float,
    merged: bool,
    merge: str,
    prompt_weight: float,
    data: candidate_lists.EvalData,
    lam: float,
) -> None:
    """Adds one user batch's per-user values at one prompt weight to ``parts``."""

    def add(key: str, values: np.ndarray) -> None:
        parts.setdefault(key, []).append(np.asarray(values, dtype=np.float64))

    if batch.intent is not None:
        add("intent_top1", metrics.intent_hits(batch.intent, batch.target_clusters, 1))
        add("intent_top3", metrics.intent_hits(batch.intent, batch.target_clusters, 3))
    rows = np.arange(batch.targets.shape[0])
    for m in ms:
        if merged:
            lists = merge_batch(batch, m, alpha, merge, prompt_weight)
        else:
            lists = _plain_list(batch, m, data.item_cluster, lam)
            merged_lists = merge_batch(batch, m, alpha, merge, prompt_weight)
            add(f"merged_recall@{m}", metrics.hits(merged_lists, batch.targets))
        add(f"recall@{m}", metrics.hits(lists, batch.targets))
        if m == max(ms):
            add("target_cluster", batch.target_clusters)
        own = batch.ids[rows, batch.target_clusters, :m]
        add(f"within_cluster_recall@{m}", metrics.hits(own, batch.targets))
        covered, entropy = metrics.cluster_diversity(lists, data.item_cluster, data.num_tasks)
        add(f"clusters_covered@{m}", covered)
        add(f"entropy@{m}", entropy)


def _result(
    parts: Dict[str, list],
    data: candidate_lists.EvalData,
    ms: Tuple[int, ...],
    merged: bool,
    merge: str,
    alpha: float,
    has_intent: bool,
    lam: float,
) -> EvaluationResult:
    """The :class:`EvaluationResult` of one prompt weight's accumulated ``parts``."""
    users = data.histories.shape[0]
    hits = {m: np.concatenate(parts[f"recall@{m}"]).astype(bool) for m in ms}
    hits_at_m = hits[max(ms)]
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
        hits=hits,
    )


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
    (m,) = check_m((m,))
    check_merge(merge)
    alpha = check_alpha(DEFAULT_ALPHA if alpha is None else alpha)
    prompt_weight = check_prompt_weight(prompt_weight, merge)
    data = candidate_lists.prepare(scorer, histories, None, exclude, item_cluster, users)
    out = []
    batches = candidate_lists.batches(
        scorer, data, m, merged, batch_size, progress, memory_budget, False, prompt_weight
    )
    for batch in batches:
        if merged:
            used = alpha if batch.intent is not None else 0.0
            lists = merge_batch(batch, m, used, merge, prompt_weight)
        else:
            lists = metrics.global_from_cluster_lists(batch.ids, batch.scores, m)
        out.append(lists[:, :m])
    return np.concatenate(out)
