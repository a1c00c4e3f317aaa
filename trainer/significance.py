"""Paired comparison of two models' Recall@M on the same held-out users.

The paper's protocol holds out one item per user, so each model's Recall@M is the mean
of one hit (0 or 1) per user. Two models evaluated on the same split are paired by user,
and the right tests are paired ones:

* McNemar's exact test: under "no difference" the users that only one model hits are
  equally likely to be either model's (a binomial test on the discordant users, SciPy's
  ``binomtest``);
* a paired bootstrap (SciPy's ``bootstrap(..., paired=True)``) of the relative difference
  ``recall_a / recall_b - 1``, the figure issue 11's +5% target is stated in.

``dnc evaluate --hits FILE`` writes the per-user hits this module reads
(:func:`write_hits`, :func:`read_hits`); ``bench/paired.py`` turns pairs of them into a
table.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

HITS_PREFIX = "hits@"


@dataclasses.dataclass(frozen=True)
class Hits:
    """Per-user hits of one evaluation.

    Attributes:
        users: ``[U]`` user indices of the split, in evaluation order.
        hits: M -> ``[U]`` bool: the user's held-out item is in the returned list.
        meta: strings describing the run (model, data, split, variant, merge).
    """

    users: np.ndarray
    hits: Dict[int, np.ndarray]
    meta: Dict[str, str]


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """Model A against model B on the same users at one M.

    Attributes:
        users: users compared.
        recall_a, recall_b: the two recalls.
        relative: ``recall_a / recall_b - 1``.
        ci_low, ci_high: paired-bootstrap confidence interval of ``relative``.
        confidence: the interval's level.
        only_a, only_b: users hit by A only, by B only (the discordant pairs).
        p_value: McNemar's exact two-sided p-value (1 when no user is discordant); None
            for a comparison pooled over training seeds (:func:`pooled_comparison`), where
            a user's hits in the seeds are not independent pairs.
        seeds: training seeds pooled (1: one pair of models).
    """

    users: int
    recall_a: float
    recall_b: float
    relative: float
    ci_low: float
    ci_high: float
    confidence: float
    only_a: int
    only_b: int
    p_value: Optional[float]
    seeds: int = 1

    def to_json(self) -> Dict[str, Optional[float]]:
        return dataclasses.asdict(self)


def write_hits(path: str, users: np.ndarray, hits: Mapping[int, np.ndarray], **meta: str) -> None:
    """Writes per-user hits to ``path`` (``.npz``) atomically (temp file + rename).

    Raises:
        ValueError: a hits array whose length is not the number of users.
    """
    users = np.asarray(users)
    arrays = {"users": users}
    for m, values in hits.items():
        values = np.asarray(values, dtype=bool)
        if values.shape != users.shape:
            raise ValueError(f"hits@{m} has shape {values.shape}, users {users.shape}")
        arrays[f"{HITS_PREFIX}{int(m)}"] = values
    arrays.update({f"meta_{k}": np.asarray(str(v)) for k, v in meta.items()})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def read_hits(path: str) -> Hits:
    """Reads a file of :func:`write_hits`."""
    with np.load(path, allow_pickle=False) as f:
        hits = {int(k[len(HITS_PREFIX) :]): f[k] for k in f.files if k.startswith(HITS_PREFIX)}
        meta = {k[len("meta_") :]: str(f[k]) for k in f.files if k.startswith("meta_")}
        return Hits(users=f["users"], hits=hits, meta=meta)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired hits need two [users] arrays, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired hits need at least one user")
    if not b.any():
        raise ValueError("model B hits no user: the relative difference is undefined")


def mcnemar_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value from the discordant counts."""
    from scipy.stats import binomtest

    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)


def _relative(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) / np.mean(b, axis=axis) - 1.0


def paired_comparison(
    hits_a: np.ndarray,
    hits_b: np.ndarray,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Compares two models' per-user hits on the same users.

    Args:
        hits_a, hits_b: ``[U]`` bool, the same users in the same order.
        confidence: level of the bootstrap interval.
        n_resamples: bootstrap resamples.
        seed: the resampling seed (the interval is reproducible).

    Raises:
        ValueError: arrays of different shapes, no users, or B with no hit.
    """
    a = np.asarray(hits_a, dtype=bool)
    b = np.asarray(hits_b, dtype=bool)
    _check_pair(a, b)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    low, high = _interval(a, b, confidence, n_resamples, seed)
    return PairedComparison(
        users=int(a.size),
        recall_a=float(a.mean()),
        recall_b=float(b.mean()),
        relative=float(_relative(a, b)),
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        only_a=only_a,
        only_b=only_b,
        p_value=mcnemar_p(only_a, only_b),
    )


def _interval(
    a: np.ndarray, b: np.ndarray, confidence: float, n_resamples: int, seed: int
) -> Tuple[float, float]:
    """Paired percentile bootstrap over users of ``mean(a) / mean(b) - 1``."""
    from scipy.stats import bootstrap

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    interval = bootstrap(
        (a.astype(np.float32), b.astype(np.float32)),
        _relative,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        batch=max(1, 20_000_000 // a.size),  # bounds the resampling memory
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(interval.low), float(interval.high)


def pooled_comparison(
    pairs: Sequence[Tuple[np.ndarray, np.ndarray]],
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """A against B over several training seeds: one (hits_a, hits_b) pair per seed, the
    same users in each. The relative difference is that of the recalls averaged over the
    seeds; the bootstrap resamples users with all their seeds (a cluster bootstrap: one
    user's hits under the seeds are not independent). Averaging the seeds removes part of
    the training noise from the point estimate, but with a few seeds the interval does not
    hold the spread between seeds: report the per-seed results beside it.

    Raises:
        ValueError: no pairs, or pairs of different shapes.
    """
    if not pairs:
        raise ValueError("pooled_comparison needs at least one pair")
    if len(pairs) == 1:
        return paired_comparison(*pairs[0], confidence, n_resamples, seed)
    a = np.stack([np.asarray(x, dtype=bool) for x, _ in pairs], axis=1)  # [U, seeds]
    b = np.stack([np.asarray(y, dtype=bool) for _, y in pairs], axis=1)
    _check_pair(a.reshape(-1), b.reshape(-1))
    low, high = _interval(a.mean(1), b.mean(1), confidence, n_resamples, seed)
    return PairedComparison(
        users=int(a.shape[0]),
        recall_a=float(a.mean()),
        recall_b=float(b.mean()),
        relative=float(a.mean() / b.mean() - 1.0),
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        only_a=int(np.sum(a & ~b)),
        only_b=int(np.sum(~a & b)),
        p_value=None,
        seeds=len(pairs),
    )


def _same_users(path_a: str, a: Hits, path_b: str, b: Hits) -> None:
    if a.users.shape != b.users.shape or not np.array_equal(a.users, b.users):
        raise ValueError(
            f"{path_a} and {path_b} hold different users ({a.users.size} and {b.users.size}): "
            "evaluate both models on the same data directory and split"
        )


def compare_files(
    path_a: str, path_b: str, m_values: Optional[tuple] = None, **kwargs
) -> Dict[int, PairedComparison]:
    """:func:`paired_comparison` of two :func:`write_hits` files at each shared M.

    Raises:
        ValueError: the files hold different users (not the same split), or no shared M.
    """
    return compare_seeds([(path_a, path_b)], m_values, **kwargs)


def compare_seeds(
    paths: List[Tuple[str, str]], m_values: Optional[tuple] = None, **kwargs
) -> Dict[int, PairedComparison]:
    """A against B from pairs of :func:`write_hits` files, one pair per training seed:
    :func:`paired_comparison` for one pair, :func:`pooled_comparison` for several.

    Raises:
        ValueError: a pair whose files hold different users, users that differ between
            the pairs, or no M in every file.
    """
    if not paths:
        raise ValueError("compare_seeds needs at least one pair of files")
    loaded = []
    for path_a, path_b in paths:
        a, b = read_hits(path_a), read_hits(path_b)
        _same_users(path_a, a, path_b, b)
        if loaded:
            _same_users(paths[0][0], loaded[0][0], path_a, a)
        loaded.append((a, b))
    shared = sorted(set.intersection(*(set(x.hits) & set(y.hits) for x, y in loaded)))
    ms = shared if m_values is None else [m for m in m_values if m in shared]
    if not ms:
        raise ValueError(f"no list size in every file of {paths}")
    if len(loaded) == 1:
        a, b = loaded[0]
        return {m: paired_comparison(a.hits[m], b.hits[m], **kwargs) for m in ms}
    return {m: pooled_comparison([(a.hits[m], b.hits[m]) for a, b in loaded], **kwargs) for m in ms}
