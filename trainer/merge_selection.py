"""Selecting the merge, its alpha and its prompt weight on validation recall.

The towers run once per user batch and the per-cluster top lists once per prompt weight
(``candidate_lists.weighted_batches``); only the cheap merges (``trainer.merges``) are
repeated for every point of the grids. ``dnc evaluate`` and ``dnc export`` select with
:func:`select_merge`, so the exported graph serves the merge evaluation chose.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from trainer import candidate_lists, metrics
from trainer.alpha import check_alpha
from trainer.candidate_lists import MEMORY_BUDGET_BYTES, Scorer
from trainer.merges import (
    DEFAULT_ALPHA_GRID,
    MERGE_GRIDS,
    PROMPT_WEIGHT_GRID,
    check_m,
    check_merge,
    merge_batch,
)
from trainer.metrics import AlphaSelection, MergeSelection


def selection_weights(prompt_weight: Optional[float] = None) -> Tuple[float, ...]:
    """The score merge's prompt weights left to select on validation: ``PROMPT_WEIGHT_GRID``,
    or the one given."""
    return PROMPT_WEIGHT_GRID if prompt_weight is None else (float(prompt_weight),)


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
        for w in weights if check_merge(merge) == "score" else (1.0,):
            points += [(merge, a, w) for a in (alphas[:1] if w == 0.0 else alphas)]
    return points


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
        histories, targets, exclude, item_cluster: validation data, as in
            :func:`trainer.evaluation.evaluate`.
        grids: merge -> candidate alphas (>= 0, ``math.inf`` allowed); None:
            ``MERGE_GRIDS`` (both merges).
        m: list size of the selection metric.
        merged: per-cluster lists from the conditioned tower (True) or from the
            unconditioned embedding (False, the merge column of plain models).
        batch_size, progress, memory_budget: as in :func:`trainer.evaluation.evaluate`.
        prompt_weights: the score merge's candidate weights (``PROMPT_WEIGHT_GRID``).

    Returns:
        The :class:`MergeSelection` (the first point in grid order wins ties).
    """
    (m,) = check_m((m,))
    grids = MERGE_GRIDS if grids is None else grids
    points = _points(grids, prompt_weights)
    if not points:
        raise ValueError("grids must hold at least one alpha")
    weights = tuple(dict.fromkeys(w for _, _, w in points))
    data = candidate_lists.prepare(scorer, histories, targets, exclude, item_cluster, users)
    found = {point: 0.0 for point in points}
    batches = candidate_lists.weighted_batches(
        scorer, data, m, merged, batch_size, progress, memory_budget, False, weights
    )
    for group in batches:
        if group[0].intent is None:
            raise ValueError("merge selection needs a scorer with intent (intent() returned None)")
        for merge, a, w in points:
            batch = group[weights.index(w)]
            hits = metrics.hits(merge_batch(batch, m, a, merge, w), batch.targets)
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
    merges = tuple(MERGE_GRIDS) if merge is None else (check_merge(merge),)
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
