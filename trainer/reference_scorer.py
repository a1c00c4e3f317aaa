"""A tiny NumPy model that satisfies ``trainer.evaluation.Scorer``: the reference model of the
evaluation and merge tests (mean-pooled history, Hadamard task prompt, centroid intent)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from trainer.config import PAD_ID


class MeanPoolScorer:
    """A tiny NumPy model: mean-pooled history, Hadamard task prompt, centroid intent.

    ``e_uk = mean(e_i for i in history) * t_k`` (``t_K`` is all ones) and
    ``p_u = softmax(mean_history @ centroids.T)``.

    Args:
        item_embeddings: ``[N + 1, d]`` (row 0 = pad).
        task_embeddings: ``[K + 1, d]`` prompts; row K should be ones.
        centroids: ``[K, d]`` intent centroids, or None for a model without intent.
    """

    def __init__(
        self,
        item_embeddings: np.ndarray,
        task_embeddings: np.ndarray,
        centroids: Optional[np.ndarray] = None,
    ) -> None:
        item_embeddings = np.asarray(item_embeddings, dtype=np.float32)
        task_embeddings = np.asarray(task_embeddings, dtype=np.float32)
        d = item_embeddings.shape[1]
        if task_embeddings.ndim != 2 or task_embeddings.shape[1] != d:
            raise ValueError(
                f"task_embeddings has shape {task_embeddings.shape}, expected [K + 1, {d}]"
            )
        if centroids is not None:
            centroids = np.asarray(centroids, dtype=np.float32)
            if centroids.shape != (task_embeddings.shape[0] - 1, d):
                raise ValueError(
                    f"centroids has shape {centroids.shape}, "
                    f"expected {(task_embeddings.shape[0] - 1, d)}"
                )
        self._items = item_embeddings
        self._tasks = task_embeddings
        self._centroids = centroids
        self.num_tasks = task_embeddings.shape[0] - 1

    @classmethod
    def random(
        cls, num_items: int, num_tasks: int, dim: int = 8, seed: int = 0, intent: bool = True
    ) -> MeanPoolScorer:
        """Fixed random embeddings (prompts around 1, centroids random)."""
        rng = np.random.default_rng(seed)
        items = rng.normal(size=(num_items + 1, dim))
        items[PAD_ID] = 0.0
        tasks = np.vstack([1.0 + 0.5 * rng.normal(size=(num_tasks, dim)), np.ones((1, dim))])
        centroids = rng.normal(size=(num_tasks, dim)) if intent else None
        return cls(items, tasks, centroids)

    def item_embeddings(self) -> np.ndarray:
        return self._items

    def _pooled(self, history: np.ndarray) -> np.ndarray:
        valid = (history != PAD_ID)[:, :, None]
        total = (self._items[history] * valid).sum(axis=1)
        return total / np.maximum(valid.sum(axis=1), 1)

    def user_embeddings(self, history: np.ndarray, task: np.ndarray) -> np.ndarray:
        return self._pooled(history) * self._tasks[task]

    def intent(self, history: np.ndarray) -> Optional[np.ndarray]:
        if self._centroids is None:
            return None
        logits = self._pooled(history) @ self._centroids.T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)
