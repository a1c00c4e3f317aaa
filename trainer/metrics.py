"""NumPy building blocks of the offline evaluation: exact top-k, merging, metrics, results.

Every function works on a batch of users at once. Item lists hold model item
ids (``item_index + 1``); ``PAD_ID = 0`` marks an empty slot and its score is
``-inf``. Ties between equal scores are always broken by the smaller item id, so
results never depend on how users are batched.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import numpy as np

from trainer.alpha import alpha_label, alpha_to_json
from trainer.config import PAD_ID


def top_k_exact(scores: np.ndarray, ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The k best candidates of every row, best first.

    Args:
        scores: ``[B, C]`` float scores; ``-inf`` marks a candidate that must not be
            returned (excluded or out of scope).
        ids: ``[C]`` item ids of the columns, strictly increasing.
        k: list length (>= 1).

    Returns:
        ``(top_ids [B, k], top_scores [B, k])`` ordered by score descending, then
        item id ascending. Slots without an available candidate hold ``PAD_ID``
        and ``-inf``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows, cols = scores.shape
    if ids.shape != (cols,):
        raise ValueError(f"ids has shape {ids.shape}, expected ({cols},) for scores {scores.shape}")
    if cols <= k:
        sel_cols = np.broadcast_to(np.arange(cols), (rows, cols))
    else:
        # Exact, tie-consistent selection: everything above the k-th value, then
        # the lowest-id columns among those equal to it.
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
        above = scores > kth
        ties = scores == kth
        need = k - above.sum(axis=1, keepdims=True)
        if np.array_equal(ties.sum(axis=1, keepdims=True), need):
            chosen = above | ties  # no tie straddles the boundary (the usual case)
        else:
            chosen = above | (ties & (np.cumsum(ties, axis=1, dtype=np.int32) <= need))
        sel_cols = np.nonzero(chosen)[1].reshape(rows, k)
    top_scores = np.take_along_axis(scores, sel_cols, axis=1)
    top_ids = ids[sel_cols]
    order = np.lexsort((top_ids, -top_scores), axis=1)
    top_ids = np.take_along_axis(top_ids, order, axis=1)
    top_scores = np.take_along_axis(top_scores, order, axis=1)
    top_ids = np.where(np.isneginf(top_scores), PAD_ID, top_ids)
    if cols < k:
        pad = k - cols
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=PAD_ID)
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_ids, top_scores


def merge_lists(lists: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """Union of the first ``quotas[b, k]`` items of each cluster's list.

    Args:
        lists: ``[B, K, L]`` per-cluster top lists (``PAD_ID`` for empty slots).
        quotas: ``[B, K]`` non-negative integers, at most the number of filled
            slots of the corresponding list.

    Returns:
        ``[B, K * L]`` merged ids: the kept items in cluster order, padded on the
        right with ``PAD_ID``.
    """
    b, k, length = lists.shape
    if quotas.shape != (b, k):
        raise ValueError(f"quotas has shape {quotas.shape}, expected {(b, k)}")
    keep = np.arange(length)[None, None, :] < quotas[:, :, None]
    flat = np.where(keep, lists, PAD_ID).reshape(b, k * length)
    # Stable left-compaction of the kept (non-pad) slots.
    order = np.argsort(flat == PAD_ID, axis=1, kind="stable")
    return np.take_along_axis(flat, order, axis=1)


def global_from_cluster_lists(ids: np.ndarray, scores: np.ndarray, m: int) -> np.ndarray:
    """Global top-m from per-cluster top lists scored by one shared embedding.

    The global top-m is contained in the union of every cluster's top-m, so
    ranking that union again gives the exact global list.

    Args:
        ids: ``[B, K, L]`` per-cluster ids with ``L >= m``.
        scores: ``[B, K, L]`` matching scores (``-inf`` for empty slots).
        m: list length.

    Returns:
        ``[B, m]`` ids, best first, ``PAD_ID`` where fewer than m are available.
    """
    b = ids.shape[0]
    flat_ids = ids.reshape(b, -1)
    flat_scores = scores.reshape(b, -1)
    order = np.lexsort((flat_ids, -flat_scores), axis=1)[:, :m]
    top_ids = np.take_along_axis(flat_ids, order, axis=1)
    top_scores = np.take_along_axis(flat_scores, order, axis=1)
    return np.where(np.isneginf(top_scores), PAD_ID, top_ids)


def hits(lists: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``[B]`` bool: whether each user's target id is in its list (``[B, L]``)."""
    return np.any(lists == targets[:, None], axis=1) & (targets != PAD_ID)


def cluster_diversity(
    lists: np.ndarray, item_cluster: np.ndarray, num_clusters: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Clusters covered and cluster entropy of every list.

    Args:
        lists: ``[B, L]`` item ids, ``PAD_ID`` slots ignored.
        item_cluster: ``[N + 1]`` cluster of each model item id.
        num_clusters: K.

    Returns:
        ``(covered [B], entropy [B])``: the number of distinct clusters in the
        list and the entropy (natural log) of its cluster distribution; both 0
        for an empty list.
    """
    b = lists.shape[0]
    valid = lists != PAD_ID
    clusters = item_cluster[lists]
    counts = np.zeros((b, num_clusters), dtype=np.float64)
    rows = np.broadcast_to(np.arange(b)[:, None], lists.shape)
    np.add.at(counts, (rows[valid], clusters[valid]), 1.0)
    covered = (counts > 0).sum(axis=1).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    probs = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log(probs, out=np.zeros_like(probs), where=probs > 0)
    entropy = -(probs * logs).sum(axis=1)
    return covered, entropy


def intent_hits(intent: np.ndarray, target_clusters: np.ndarray, top: int) -> np.ndarray:
    """``[B]`` bool: whether the target's cluster is among the ``top`` largest p_uk.

    Ties in ``intent`` are broken by the smaller cluster id.
    """
    order = np.argsort(-intent, axis=1, kind="stable")[:, :top]
    return np.any(order == target_clusters[:, None], axis=1)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """Metrics of one evaluation run (all means over users).

    Attributes:
        users: evaluated users.
        merged: whether ``recall`` comes from the per-cluster merge.
        alpha: exponent of the quotas used by the merge (``recall`` for merged
            models, ``merged_recall`` for plain ones).
        m_values: list sizes M.
        recall: M -> Recall@M of the returned list.
        within_cluster_recall: M -> recall when candidates are restricted to the
            held-out item's cluster (Table 3).
        clusters_covered: M -> mean number of distinct clusters in the returned list.
        entropy: M -> mean entropy (nats) of the returned list's cluster distribution.
        merged_recall: plain models only: M -> recall of the merge applied to the
            unconditioned embedding (intent quotas, uniform without intent).
        intent_top1: share of users whose target cluster has the largest p_uk.
        intent_top3: share of users whose target cluster is among the 3 largest p_uk.
        merge: the merge behind ``recall`` (merged models) or ``merged_recall``.
        diversity_lambda: multi-interest models: ComiRec's diversity weight of the merge
            of the interests' lists (0: by score).
        cluster_recall: Recall at the largest M of the users whose held-out item is in
            each cluster (cluster id -> recall; clusters without such users are absent).
        hits: M -> ``[users]`` bool, whether each user's held-out item is in the returned
            list, in the order the users were given (``recall[m]`` is its mean). Not part
            of :meth:`to_json`; ``trainer.significance`` compares two models with it.
    """

    users: int
    merged: bool
    alpha: Optional[float]
    m_values: Tuple[int, ...]
    recall: Dict[int, float]
    within_cluster_recall: Dict[int, float]
    clusters_covered: Dict[int, float]
    entropy: Dict[int, float]
    merged_recall: Optional[Dict[int, float]] = None
    intent_top1: Optional[float] = None
    intent_top3: Optional[float] = None
    merge: str = "quota"
    diversity_lambda: float = 0.0
    cluster_recall: Optional[Dict[int, float]] = None
    hits: Optional[Dict[int, np.ndarray]] = dataclasses.field(
        default=None, compare=False, repr=False
    )

    def to_json(self) -> Dict[str, object]:
        """Flat JSON-safe dict (``recall@20``, ..., ``alpha``; an infinite alpha is ``"inf"``)."""
        out: Dict[str, object] = {}
        per_m = [
            ("recall", self.recall),
            ("within_cluster_recall", self.within_cluster_recall),
            ("merged_recall", self.merged_recall),
            ("clusters_covered", self.clusters_covered),
            ("entropy", self.entropy),
        ]
        for name, values in per_m:
            if values is not None:
                out.update({f"{name}@{m}": values[m] for m in self.m_values})
        out["intent_top1"] = self.intent_top1
        out["intent_top3"] = self.intent_top3
        alpha = self.alpha
        out["alpha"] = alpha_to_json(alpha)
        out["merged"] = self.merged
        out["merge"] = self.merge
        if self.diversity_lambda:
            out["diversity_lambda"] = self.diversity_lambda
        if self.cluster_recall is not None:
            m = max(self.m_values)
            out[f"cluster_recall@{m}"] = {str(c): r for c, r in self.cluster_recall.items()}
        out["users"] = self.users
        return out

    def format_table(self) -> str:
        """A printable table: one row per metric, one column per M."""
        head = f"{'metric':<24}" + "".join(f"{'@' + str(m):>10}" for m in self.m_values)
        lines = [head, "-" * len(head)]
        rows = [
            ("recall", self.recall),
            ("within_cluster_recall", self.within_cluster_recall),
            ("merged_recall", self.merged_recall),
            ("clusters_covered", self.clusters_covered),
            ("entropy", self.entropy),
        ]
        for name, values in rows:
            if values is not None:
                lines.append(f"{name:<24}" + "".join(f"{values[m]:>10.4f}" for m in self.m_values))
        lines.append(f"intent top-1 / top-3: {_fmt(self.intent_top1)} / {_fmt(self.intent_top3)}")
        lines.append(
            f"alpha: {self.alpha}   merge: {self.merge}   merged: {self.merged}   "
            f"users: {self.users}"
        )
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class AlphaSelection:
    """Result of ``trainer.merge_selection.select_alpha``.

    Attributes:
        alpha: the grid value with the best validation Recall@M (first on ties).
        m: the list size M used for selection.
        recalls: alpha -> validation Recall@M, in grid order.
        users: validation users.
    """

    alpha: float
    m: int
    recalls: Dict[float, float]
    users: int

    def to_json(self) -> Dict[str, object]:
        """Flat JSON-safe dict (infinite alphas written ``"inf"``)."""
        out: Dict[str, object] = {
            f"recall@{self.m}[alpha={alpha_label(a)}]": r for a, r in self.recalls.items()
        }
        out.update({"alpha": alpha_label(self.alpha), "m": self.m, "users": self.users})
        return out

    def format_table(self) -> str:
        """The grid as a printed table, the selected alpha marked with ``*``."""
        lines = [f"{'alpha':>8}  recall@{self.m}"]
        for a, r in self.recalls.items():
            mark = " *" if a == self.alpha else ""
            lines.append(f"{a:>8g}  {r:.4f}{mark}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class MergeSelection:
    """Result of ``trainer.merge_selection.select_merge``.

    Attributes:
        merge: the selected merge (``quota`` or ``score``).
        alpha: its selected alpha.
        m: the list size M used for selection.
        recalls: (merge, alpha, prompt_weight) -> validation Recall@M, in grid order.
        users: validation users.
        prompt_weight: the selected prompt weight (score merge; 1 for the quota merge).
    """

    merge: str
    alpha: float
    m: int
    recalls: Dict[Tuple[str, float, float], float]
    users: int
    prompt_weight: float = 1.0

    def to_json(self) -> Dict[str, object]:
        """Flat JSON-safe dict: ``recall@M[alpha=A]`` for the quota merge (the keys of
        earlier reports), ``recall@M[score,alpha=A]`` for the score merge at weight 1 and
        ``recall@M[score,alpha=A,w=W]`` at other prompt weights."""
        out: Dict[str, object] = {}
        for (merge, a, w), r in self.recalls.items():
            tag = "" if merge == "quota" else f"{merge},"
            weight = "" if w == 1.0 else f",w={w:g}"
            out[f"recall@{self.m}[{tag}alpha={alpha_label(a)}{weight}]"] = r
        out.update(
            {
                "merge": self.merge,
                "alpha": alpha_label(self.alpha),
                "prompt_weight": self.prompt_weight,
                "m": self.m,
                "users": self.users,
            }
        )
        return out

    def format_table(self) -> str:
        """The grid as a printed table, the selected point marked with ``*``."""
        chosen = (self.merge, self.alpha, self.prompt_weight)
        lines = [f"{'merge':>6} {'alpha':>8} {'w':>5}  recall@{self.m}"]
        for point, r in self.recalls.items():
            merge, a, w = point
            mark = " *" if point == chosen else ""
            lines.append(f"{merge:>6} {a:>8g} {w:>5g}  {r:.4f}{mark}")
        return "\n".join(lines)
