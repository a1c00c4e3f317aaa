"""Merging a user batch's per-cluster lists into one list of M items.

Two merges (``MERGE_GRIDS``), each with its validation grid of alpha:

* ``quota``: the paper's integer quotas, ``M_k ~ M * p_uk^alpha / sum_j p_uj^alpha``
  (``trainer.quotas.compute_quotas``); the list is in cluster order.
* ``score``: the top-M of the joint score ``alpha * log p(k|u) + log p(i|u,k)``
  (``trainer.score_merge``); the list is best first. Its prompt weight blends the
  prompted and unprompted queries (``PROMPT_WEIGHT_GRID``).

The offline evaluation (``trainer.evaluation``) and the validation selection
(``trainer.merge_selection``) both merge through :func:`merge_batch`; the exported graph
runs the TensorFlow twins of the same functions, tested equal.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np

from trainer import metrics
from trainer.candidate_lists import ListBatch

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


def merge_batch(
    batch: ListBatch, m: int, alpha: float, merge: str = "quota", prompt_weight: float = 1.0
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


def check_m(m_values: Sequence[int]) -> Tuple[int, ...]:
    """The list sizes as ints, or ValueError when none is given or one is below 1."""
    ms = tuple(int(m) for m in m_values)
    if not ms or min(ms) < 1:
        raise ValueError(f"list sizes M must be >= 1, got {tuple(m_values)}")
    return ms


def check_prompt_weight(prompt_weight: float, merge: str) -> float:
    """``prompt_weight`` checked for ``merge`` (``trainer.score_merge.check_prompt_weight``)."""
    from trainer.score_merge import check_prompt_weight  # loads TensorFlow

    return check_prompt_weight(prompt_weight, merge)


def check_merge(merge: str) -> str:
    """``merge`` if it names a merge (``trainer.score_merge.check_merge``), else ValueError."""
    from trainer.score_merge import check_merge  # loads TensorFlow

    return check_merge(merge)
