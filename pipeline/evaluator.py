"""The Evaluator's work: validation metrics per variant, baselines and the blessing.

* Every trained variant: ``trainer.evaluate_model`` on the validation split (Recall@M,
  diversity, Recall vs alpha) plus recall per target cluster.
* Popularity baseline: the M most popular training items, the user's history excluded.
* The pushed model: when it was trained on the same data (same ``data_fingerprint``)
  its model directory is evaluated exactly like the candidate; otherwise its exported
  SavedModel answers the validation histories by raw item id.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Mapping, Optional

import numpy as np

from pipeline.config import EvaluatorSection
from preprocessing import features
from trainer import data, evaluation

log = logging.getLogger(__name__)


def popularity_recall(data_dir: str, m: int) -> float:
    """Recall@m of recommending the most popular training items not yet seen."""
    counts: Dict[int, int] = {}
    for record in data.read_split(data_dir, features.TRAIN).as_numpy_iterator():
        for item in record["items"]:
            counts[int(item)] = counts.get(int(item), 0) + 1
    ranking = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    held_out = data.evaluation_data(data_dir, features.VALIDATION, max_len=1)
    hits = 0
    for target, seen in zip(held_out.targets, held_out.exclude, strict=True):
        seen_set = set(seen.tolist())
        top = []
        for item in ranking:
            if item not in seen_set:
                top.append(item)
                if len(top) == m:
                    break
        hits += int(int(target) in top)
    return hits / max(len(held_out.targets), 1)


def per_cluster_recall(model_dir: str, data_dir: str, m: int, alpha: float) -> Dict[str, float]:
    """Validation Recall@m grouped by the cluster of the held-out item."""
    from trainer.config import get_variant
    from trainer.train import ModelScorer, load_model

    model, config = load_model(model_dir, data_dir)
    items = data.load_items(data_dir)
    held_out = data.evaluation_data(data_dir, features.VALIDATION, config.model.max_len)
    lists = evaluation.retrieve(
        ModelScorer(model),
        held_out.histories,
        held_out.exclude,
        items.item_cluster,
        m,
        alpha=alpha,
        merged=get_variant(config.variant).merged,
        progress=False,
        users=held_out.users,
    )
    hits = (lists == held_out.targets[:, None]).any(axis=1)
    clusters = items.item_cluster[held_out.targets]
    return {str(int(c)): float(hits[clusters == c].mean()) for c in np.unique(clusters) if c >= 0}


def _evaluate(model_dir: str, data_dir: str, section: EvaluatorSection) -> Dict[str, Any]:
    from trainer.evaluate_model import evaluate_model

    report = evaluate_model(
        model_dir,
        data_dir,
        m_values=(section.m,),
        alpha=section.alpha,
        split=features.VALIDATION,
        progress=False,
    )
    report.pop("table", None)
    alpha = report["alpha"]
    report["per_cluster_recall"] = per_cluster_recall(
        model_dir, data_dir, section.m, float(alpha) if alpha != "inf" else float("inf")
    )
    return report


def exported_recall(version_dir: str, data_dir: str, m: int) -> float:
    """Validation Recall@m of an exported SavedModel, queried by raw item ids."""
    import tensorflow as tf

    from serving.export import load_exported

    module = load_exported(version_dir)
    items = data.load_items(data_dir)
    held_out = data.evaluation_data(data_dir, features.VALIDATION, max_len=50)
    ids = np.concatenate([[features.PADDING_ITEM_ID], items.item_ids]).astype(object)
    hits = 0
    for start in range(0, len(held_out.targets), 256):
        histories = ids[held_out.histories[start : start + 256]].astype(bytes)
        out = module.signatures["retrieve"](
            history=tf.constant(histories),
            alpha=tf.constant(0.0),
            num_results=tf.constant(m, tf.int32),
        )
        got = out["item_ids"].numpy()
        targets = ids[held_out.targets[start : start + 256]].astype(bytes)
        hits += int((got == targets[:, None]).any(axis=1).sum())
    return hits / max(len(held_out.targets), 1)


def baseline_recall(version_dir: str, data_dir: str, section: EvaluatorSection) -> float:
    """Recall@M of the pushed model in ``version_dir`` on ``data_dir``'s validation split."""
    from serving.export import METADATA_DIR, METADATA_FILE, data_fingerprint

    with open(os.path.join(version_dir, METADATA_DIR, METADATA_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    model_dir = meta.get("model_dir", "")
    if meta.get("data_fingerprint") == data_fingerprint(data_dir) and os.path.isdir(model_dir):
        return float(_evaluate(model_dir, data_dir, section)[f"recall@{section.m}"])
    log.info("Evaluator: pushed model was trained on other data; querying its SavedModel")
    return exported_recall(version_dir, data_dir, section.m)


def evaluate_and_bless(
    data_dir: str,
    models: Mapping[str, str],
    candidate: str,
    baseline_version_dir: Optional[str],
    section: EvaluatorSection,
) -> Dict[str, Any]:
    """Metrics of every variant and the blessing decision of ``candidate``."""
    key = f"recall@{section.m}"
    variants = {name: _evaluate(path, data_dir, section) for name, path in models.items()}
    popularity = popularity_recall(data_dir, section.m)
    new = float(variants[candidate][key])
    if baseline_version_dir is None:
        blessed = new > popularity
        reason = (
            f"first model: {key} {new:.4f} {'>' if blessed else '<='} popularity {popularity:.4f}"
        )
        baseline = None
    else:
        baseline = baseline_recall(baseline_version_dir, data_dir, section)
        blessed = new >= baseline - section.tolerance
        reason = (
            f"{key} {new:.4f} vs pushed {baseline:.4f} (tolerance {section.tolerance}): "
            f"{'within' if blessed else 'drop beyond'} tolerance"
        )
    log.info("Evaluator: %s -> %s", reason, "BLESSED" if blessed else "NOT BLESSED")
    return {
        "m": section.m,
        "candidate": candidate,
        "variants": variants,
        "popularity": {key: popularity},
        "baseline": None
        if baseline is None
        else {"version_dir": baseline_version_dir, key: baseline},
        "blessing": {"blessed": blessed, "reason": reason},
    }
