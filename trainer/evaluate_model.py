"""``dnc evaluate``: a trained model on the held-out test items, paper protocol.

The merge (``quota`` or ``score``) and its alpha are chosen on the validation
split from a grid unless given; the test split is then evaluated once with them.
Merged variants return the divide-and-conquer merge; plain variants global top-M,
with the merge as an extra column (``merged_recall@M``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

from preprocessing import features
from trainer import data, evaluation, merge_selection, merges
from trainer.alpha import alpha_to_json
from trainer.config import get_variant
from trainer.significance import write_hits
from trainer.train import ModelScorer, load_model

log = logging.getLogger(__name__)

ALPHA_GRID = merges.DEFAULT_ALPHA_GRID


def evaluate_model(
    model_dir: str,
    data_dir: str,
    m_values: Sequence[int] = (20, 50),
    alpha: Optional[float] = None,
    alpha_grid: Optional[Sequence[float]] = None,
    split: str = features.TEST,
    progress: Optional[bool] = None,
    merge: Optional[str] = None,
    diversity_lambda: float = 0.0,
    prompt_weight: Optional[float] = None,
    hits_path: Optional[str] = None,
) -> Dict[str, Any]:
    """Evaluates a trained model; returns the flat JSON of the contract.

    Args:
        model_dir: ``dnc train --output``.
        data_dir: the preprocessing output it was trained on.
        m_values: list sizes M.
        alpha: quota exponent; None selects it on validation from ``alpha_grid``.
        alpha_grid: candidates for the selection (None: each merge's own grid,
            ``merges.MERGE_GRIDS``).
        split: ``test`` (default) or ``validation``.
        progress: tqdm bars (None: automatic).
        merge: ``quota`` or ``score``; None selects it on validation with alpha.
        diversity_lambda: multi-interest variants (``mind``, ``comirec-sa``): ComiRec's
            diversity weight for merging the interests' lists (0: by score).
        prompt_weight: the score merge's blend of prompted and unprompted queries
            (``trainer.score_merge``); None selects it on validation with the merge
            and alpha (1 when both of those are given).
        hits_path: also write each user's hit at every M here (``.npz``,
            ``trainer.significance.write_hits``) for paired comparisons.

    Raises:
        ValueError: ``diversity_lambda`` for a single-vector variant, or below 0.
    """
    model, config = load_model(model_dir, data_dir)
    variant = get_variant(config.variant)
    if diversity_lambda and not variant.multi_interest:
        raise ValueError(
            f"diversity_lambda applies to multi-interest variants, not {config.variant}"
        )
    items = data.load_items(data_dir)
    scorer = ModelScorer(model)
    max_len = config.model.max_len
    selection = validation = None
    if alpha is None or merge is None:
        grids = merge_selection.selection_grids(merge, alpha)
        if alpha_grid is not None and alpha is None:
            grids = {g: tuple(alpha_grid) for g in grids}
        validation = data.evaluation_data(data_dir, features.VALIDATION, max_len)
        selection = merge_selection.select_merge(
            scorer,
            validation.histories,
            validation.targets,
            validation.exclude,
            items.item_cluster,
            grids=grids,
            m=max(m_values),
            merged=variant.merged,
            progress=progress,
            users=validation.users,
            prompt_weights=merge_selection.selection_weights(prompt_weight),
        )
        merge, alpha = selection.merge, selection.alpha
        prompt_weight = selection.prompt_weight
        log.info(
            "merge %s, alpha %s, prompt weight %s selected on validation:\n%s",
            merge,
            alpha,
            prompt_weight,
            selection.format_table(),
        )
    elif prompt_weight is None:
        prompt_weight = 1.0
    held_out = validation
    if held_out is None or split != features.VALIDATION:  # read each split once
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
        merge=merge,
        diversity_lambda=diversity_lambda,
        prompt_weight=prompt_weight,
    )
    report = {
        **result.to_json(),
        "variant": config.variant,
        "loss": config.loss,
        "split": split,
        "alpha": alpha_to_json(alpha),
        "alpha_selection": None if selection is None else selection.to_json(),
        "merge": merge,
        "prompt_weight": prompt_weight,
        "table": result.format_table(),
    }
    if hits_path is not None:
        write_hits(
            hits_path, held_out.users, result.hits, model=model_dir, data=data_dir,
            split=split, variant=config.variant, merge=str(merge), alpha=str(alpha),
            prompt_weight=str(prompt_weight),
        )  # fmt: skip
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
