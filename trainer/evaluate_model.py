"""``dnc evaluate``: a trained model on the held-out test items, paper protocol.

Alpha (the quota exponent) is chosen on the validation split from a grid unless
given; the test split is then evaluated once with it. Merged variants return the
divide-and-conquer merge; plain variants global top-M, with the merge as an
extra column (``merged_recall@M``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, Optional, Sequence

from preprocessing import features
from trainer import data, evaluation
from trainer.config import get_variant
from trainer.train import ModelScorer, load_model

log = logging.getLogger(__name__)

ALPHA_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, math.inf)


def _json_alpha(alpha: float) -> Any:
    return "inf" if math.isinf(alpha) else alpha


def evaluate_model(
    model_dir: str,
    data_dir: str,
    m_values: Sequence[int] = (20, 50),
    alpha: Optional[float] = None,
    alpha_grid: Sequence[float] = ALPHA_GRID,
    split: str = features.TEST,
    progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """Evaluates a trained model; returns the flat JSON of the contract.

    Args:
        model_dir: ``dnc train --output``.
        data_dir: the preprocessing output it was trained on.
        m_values: list sizes M.
        alpha: quota exponent; None selects it on validation from ``alpha_grid``.
        alpha_grid: candidates for the selection.
        split: ``test`` (default) or ``validation``.
        progress: tqdm bars (None: automatic).
    """
    model, config = load_model(model_dir, data_dir)
    variant = get_variant(config.variant)
    items = data.load_items(data_dir)
    scorer = ModelScorer(model)
    max_len = config.model.max_len
    selection = None
    if alpha is None:
        validation = data.evaluation_data(data_dir, features.VALIDATION, max_len)
        selection = evaluation.select_alpha(
            scorer,
            validation.histories,
            validation.targets,
            validation.exclude,
            items.item_cluster,
            grid=alpha_grid,
            m=max(m_values),
            merged=variant.merged,
            progress=progress,
            users=validation.users,
        )
        alpha = selection.alpha
        log.info("alpha %s selected on validation:\n%s", alpha, selection.format_table())
    held_out = data.evaluation_data(data_dir, split, max_len)
    result = evaluation.evaluate(
        scorer,
        held_out.histories,
        held_out.targets,
        held_out.exclude,
        items.item_cluster,
        m_values=m_values,
        alpha=alpha,
        merged=variant.merged,
        progress=progress,
        users=held_out.users,
    )
    report = {
        **result.to_json(),
        "variant": config.variant,
        "loss": config.loss,
        "split": split,
        "alpha": _json_alpha(alpha),
        "alpha_selection": None if selection is None else selection.to_json(),
        "table": result.format_table(),
    }
    return report


def write_json(report: Dict[str, Any], path: str) -> None:
    """Writes ``report`` atomically (temp file + rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
