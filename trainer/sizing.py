"""Defaults of the ``dnc``, ``sasrec`` and ``sasrec-mixed`` regimes that follow the size of
the data.

A preprocessing output records how many interactions it kept (``stats.json``). Two
defaults depend on that count, each measured on validation (docs/divide-and-conquer.md,
sections 10 and 16):

* below ``SMALL_DATA_INTERACTIONS`` the embeddings are ``SMALL_DATA_DIM`` wide instead of
  100: on LastFM (52K interactions) 50 beat 100 for ``dnc`` (+5% / +13% validation
  R@20 / R@50) and for ``sasrec``, while on the Amazon sets (167K-198K) 100 won at
  dropout 0.2 (with more dropout 50 won there: the third rule);
* from ``LARGE_DATA_INTERACTIONS`` on the learning rate starts at
  ``LARGE_DATA_LEARNING_RATE`` and is multiplied by ``LARGE_DATA_LR_DECAY`` after each
  epoch without validation improvement: on the ML-1M-sized set (1M interactions) the
  constant 1e-3 needed 45 epochs (27.6 minutes on 2 cores) to converge, while 2e-3 was
  below 1e-3 on validation on all three real sets (52K-198K). ``sasrec`` gained from the
  same schedule there too (36.5 instead of 55 minutes, test R@20 / R@50 0.7008 / 0.8303
  against 0.6940 / 0.8272); ``sasrec``'s width is 50 in its regime already. Early
  stopping there waits ``LARGE_DATA_PATIENCE`` epochs instead of 3: by the third epoch
  without improvement the decay has cut the rate to an eighth, and on the ML-1M-sized set
  the epochs it waited beyond the second never changed the model kept by more than 0.0012
  validation recall (section 19).

A third follows how long the users' sequences are (section 17):

* where users hold fewer than ``SPARSE_MEAN_LENGTH`` interactions on average, the dropout is
  ``SPARSE_DROPOUT`` instead of 0.2 (SASRec's own setting for its sparse sets) and the
  embeddings are ``SPARSE_DIM`` wide: on Amazon Beauty and Toys (9 interactions a user)
  ``sasrec`` gained +3.7% / +9.0% test R@20 from dropout 0.5, and ``dnc`` at d=50 with
  dropout 0.5 beat its d=100, dropout 0.2 point on the full validation split (+2.1% / +2.3%
  R@20) and on test (+3.3% / +4.2%). ``sasrec`` is 50 wide in its regime anyway. Early
  stopping there waits ``SPARSE_PATIENCE`` epochs instead of 3 (section 24): on Beauty the
  validation curve still rises about 0.001 an epoch after epoch 15, below the noise of the
  2,000-user monitor, and patience 3 stopped ``dnc``'s two seeds 7-10 epochs early; with 6
  the same run trained to epoch 28 (best 22) and tested +4.7% / +3.6% R@20 / R@50
  (paired, significant). Large sparse data keeps the large-data patience.

``sasrec-mixed`` (the paper's SASRec+) is ``sasrec``'s tower with half of its negatives
drawn from the target's cluster, and follows the same rules: section 22 gave it the sparse
and the large-data settings as flags, since its baseline regime was not sized, and section
24 ran its grid under them.

An explicit value (a flag, a pipeline config key) always wins over a sized default.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

from preprocessing.features import STATS_FILE

SMALL_DATA_INTERACTIONS = 100_000
SMALL_DATA_DIM = 50
LARGE_DATA_INTERACTIONS = 500_000
LARGE_DATA_LEARNING_RATE = 3e-3
LARGE_DATA_LR_DECAY = 0.5
LARGE_DATA_PATIENCE = 2
# The variants whose default regime is sized by the data (the others keep theirs).
SIZED_VARIANTS = ("dnc", "sasrec", "sasrec-mixed")
SPARSE_MEAN_LENGTH = 20
SPARSE_DROPOUT = 0.5
SPARSE_DIM = 50
SPARSE_PATIENCE = 6


def data_counts(data: str) -> Optional[Tuple[int, int]]:
    """(interactions, users) kept by the preprocessing of ``data`` (its ``stats.json``), or
    None where ``data`` is not (yet) a preprocessing output, as when a config is checked
    before any data exists."""
    path = os.path.join(data, STATS_FILE) if data else ""
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        stats = json.load(f)
    missing = [k for k in ("interactions", "users") if k not in stats]
    if missing:
        raise ValueError(f"{path} has no {missing} count; rerun dnc preprocess")
    return int(stats["interactions"]), int(stats["users"])


def sized_defaults(variant: str, preset: str, data: str) -> Dict[str, Any]:
    """The defaults of ``variant`` under ``preset`` that the size of ``data`` sets.

    Args:
        variant: a ``--variant`` name.
        preset: ``default`` or ``paper`` (the paper's setting is never sized).
        data: a preprocessing output directory (or any path: no ``stats.json``, no
            sized defaults).

    Returns:
        ``TrainConfig`` or ``ModelConfig`` field -> value (``embedding_dim`` and
        ``dropout`` are ``ModelConfig`` fields). Empty where the regime's own values apply.
    """
    if preset != "default" or variant not in SIZED_VARIANTS:
        return {}
    counts = data_counts(data)
    if counts is None:
        return {}
    interactions, users = counts
    sized: Dict[str, Any] = {}
    if interactions < SMALL_DATA_INTERACTIONS:
        sized["embedding_dim"] = SMALL_DATA_DIM
    if interactions >= LARGE_DATA_INTERACTIONS:
        sized.update(
            learning_rate=LARGE_DATA_LEARNING_RATE,
            lr_decay=LARGE_DATA_LR_DECAY,
            patience=LARGE_DATA_PATIENCE,
        )
    if interactions < SPARSE_MEAN_LENGTH * max(users, 1):
        sized.update(dropout=SPARSE_DROPOUT, embedding_dim=SPARSE_DIM)
        sized.setdefault("patience", SPARSE_PATIENCE)  # large data keeps its shorter wait
    return sized
