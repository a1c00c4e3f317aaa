"""The Evaluator's work: validation metrics per variant, the choice, baselines, blessing.

* Every trained variant: ``trainer.evaluate_model`` on the validation split (Recall@M,
  diversity, Recall vs alpha) plus recall per target cluster.
* The variant to serve: ``serving.variant``, or with ``best`` the servable variant with
  the best validation Recall@M (:func:`choose_variant`); a named variant that is not the
  best is reported, with both numbers.
* Popularity baseline: the M most popular training items, the user's history excluded.
* The pushed model and the candidate are scored alike (:func:`compare_with_pushed`):
  when the pushed model was trained on the same data (same ``data_fingerprint``) both
  model directories are evaluated by ``evaluate_model``; otherwise both exported
  SavedModels answer the same validation histories by raw item id.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Dict, Mapping, Optional

import numpy as np

from pipeline.config import BEST, EvaluatorSection, servable
from preprocessing import features
from trainer import data
from trainer.alpha import alpha_from_json

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


def _evaluate(model_dir: str, data_dir: str, section: EvaluatorSection) -> Dict[str, Any]:
    """``evaluate_model`` on validation at ``section.m``, merge and alpha given or selected."""
    from trainer.evaluate_model import evaluate_model

    report = evaluate_model(
        model_dir,
        data_dir,
        m_values=(section.m,),
        alpha=section.alpha,
        merge=section.merge,
        split=features.VALIDATION,
        progress=False,
    )
    report.pop("table", None)
    # The same pass's recall by the held-out item's cluster (no second model load or read).
    report["per_cluster_recall"] = report.pop(f"cluster_recall@{section.m}")
    return report


# --------------------------------------------------------------------------- the choice


def choose_variant(recalls: Mapping[str, float], requested: str, key: str) -> Dict[str, Any]:
    """The variant to bless: ``requested``, or with ``best`` the best servable one.

    Args:
        recalls: variant -> validation Recall@M, in training order (ties: the first).
        requested: ``serving.variant``: a variant name or ``best``.
        key: the metric's name (``recall@50``), for the note.

    Returns:
        ``requested``, ``chosen``, ``best`` (the best servable variant), ``recalls`` of
        the servable variants and ``note``: a sentence when ``chosen`` is not the best
        (both numbers), else None.

    Raises:
        ValueError: no servable variant, or ``requested`` is neither ``best`` nor one
            of them.
    """
    scores = {v: float(r) for v, r in recalls.items() if servable(v)}
    if not scores:
        raise ValueError(f"no servable variant among {sorted(recalls)} (mf cannot be served)")
    best = max(scores, key=lambda v: scores[v])  # max keeps the first of equals
    if requested == BEST:
        chosen = best
    elif requested in scores:
        chosen = requested
    else:
        raise ValueError(
            f"serving.variant {requested!r} is not one of the servable trained variants "
            f"{sorted(scores)}"
        )
    note = None
    if scores[best] > scores[chosen]:
        note = (
            f"{best} scores higher on validation than serving.variant {chosen}: "
            f"{key} {scores[best]:.4f} vs {scores[chosen]:.4f} "
            f"(serving.variant: best would push {best})"
        )
    return {
        "requested": requested,
        "chosen": chosen,
        "best": best,
        "recalls": scores,
        "note": note,
    }


# --------------------------------------------------------------------------- the pushed model


def _metadata(version_dir: str) -> Dict[str, Any]:
    from serving.export import METADATA_DIR, METADATA_FILE

    with open(os.path.join(version_dir, METADATA_DIR, METADATA_FILE), encoding="utf-8") as f:
        return json.load(f)


def exported_recall(version_dir: str, data_dir: str, m: int) -> float:
    """Validation Recall@m of an exported SavedModel, queried by raw item ids.

    Every user's whole validation history goes in (oldest first, ``""`` padding): the
    SavedModel keeps the last ``max_len`` known items itself and excludes its recent
    history, as when serving. The ``retrieve`` signature runs with the exported merge and
    alpha (those selected on validation at export, unless the export was given them).
    """
    import tensorflow as tf

    from serving.export import load_exported

    meta = _metadata(version_dir)
    if m > int(meta.get("max_num_results", m)):
        raise ValueError(
            f"{version_dir} returns at most {meta['max_num_results']} items, not M={m}"
        )
    module = load_exported(version_dir)
    items = data.load_items(data_dir)
    held_out = data.evaluation_data(data_dir, features.VALIDATION, max_len=1)
    ids = np.concatenate([[features.PADDING_ITEM_ID], items.item_ids]).astype(object)
    alpha = alpha_from_json(meta.get("alpha", 0.0))
    hits = 0
    for start in range(0, len(held_out.targets), 256):
        rows = held_out.exclude[start : start + 256]  # the full histories, oldest first
        width = max((len(r) for r in rows), default=1) or 1
        histories = np.full((len(rows), width), "", dtype=object)
        for i, row in enumerate(rows):
            if len(row):
                histories[i, width - len(row) :] = ids[row]
        out = module.signatures["retrieve"](
            history=tf.constant(histories.astype(bytes)),
            alpha=tf.constant(alpha, tf.float32),
            num_results=tf.constant(m, tf.int32),
        )
        got = out["item_ids"].numpy()
        targets = ids[held_out.targets[start : start + 256]].astype(bytes)
        hits += int((got == targets[:, None]).any(axis=1).sum())
    return hits / max(len(held_out.targets), 1)


def compare_with_pushed(
    candidate_dir: str,
    candidate_report: Mapping[str, Any],
    version_dir: str,
    data_dir: str,
    section: EvaluatorSection,
    export_options: Mapping[str, Any],
    evaluated: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Dict[str, Any]:
    """Validation Recall@M of the candidate and of the pushed model, scored alike.

    Both are scored on the same validation users and targets, at the same M, with the
    same history given (each model reads the last ``max_len`` items it was trained with,
    as when serving) and each with its own merge and alpha selected on validation
    (unless ``evaluator`` fixes them):

    * pushed model trained on the same data and its model directory still there: both
      model directories by ``evaluate_model`` (exact scores, the candidate's numbers
      are its row of the variants table);
    * otherwise its model directory cannot score this data's item indices, only its
      SavedModel can (raw ids in): the candidate is then exported as the Pusher would
      (``export_options``) into a scratch directory, and both SavedModels answer the
      same raw-id histories (:func:`exported_recall`).

    Args:
        candidate_dir: the candidate's model directory.
        candidate_report: its ``_evaluate`` report.
        version_dir: the pushed version directory.
        data_dir: this run's Transform output.
        section: M (and alpha, merge).
        export_options: ``export_model`` options of a push.
        evaluated: absolute model directory -> ``_evaluate`` report already computed
            (this run's variants), reused when the pushed model is one of them.

    Returns:
        ``candidate`` and ``baseline`` Recall@M, ``scored_by`` (``model_dir`` or
        ``saved_model``) and the baseline's ``version_dir``.
    """
    from serving.export import data_fingerprint, export_model

    key = f"recall@{section.m}"
    meta = _metadata(version_dir)
    model_dir = meta.get("model_dir", "")
    out: Dict[str, Any] = {"version_dir": version_dir}
    if meta.get("data_fingerprint") == data_fingerprint(data_dir) and os.path.isdir(model_dir):
        baseline = (evaluated or {}).get(os.path.abspath(model_dir))
        if baseline is None:
            baseline = _evaluate(model_dir, data_dir, section)
        out.update(
            candidate=float(candidate_report[key]),
            baseline=float(baseline[key]),
            scored_by="model_dir",
        )
        return out
    log.info("Evaluator: pushed model was trained on other data; comparing SavedModels")
    options = dict(export_options)
    options["max_num_results"] = max(section.m, int(options.get("max_num_results", 200)))
    with tempfile.TemporaryDirectory(prefix="dnc-evaluator-") as scratch:
        exported = export_model(
            candidate_dir, data_dir, output=os.path.join(scratch, "candidate"), **options
        )
        candidate = exported_recall(exported, data_dir, section.m)
    out.update(
        candidate=candidate,
        baseline=exported_recall(version_dir, data_dir, section.m),
        scored_by="saved_model",
    )
    return out


def evaluate_and_bless(
    data_dir: str,
    models: Mapping[str, str],
    requested: str,
    baseline_version_dir: Optional[str],
    section: EvaluatorSection,
    export_options: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Metrics of every variant, the variant chosen to serve and its blessing.

    Args:
        data_dir: the Transform output.
        models: variant -> model directory, in training order.
        requested: ``serving.variant`` (a variant or ``best``).
        baseline_version_dir: the pushed version to compare with (None: none yet).
        section: the evaluator settings.
        export_options: ``export_model`` options of a push (index, alpha, merge).
    """
    key = f"recall@{section.m}"
    variants = {name: _evaluate(path, data_dir, section) for name, path in models.items()}
    selection = choose_variant({v: r[key] for v, r in variants.items()}, requested, key)
    chosen = selection["chosen"]
    if selection["note"]:
        log.warning("Evaluator: %s", selection["note"])
    popularity = popularity_recall(data_dir, section.m)
    comparison = None
    if baseline_version_dir is None:
        new = float(variants[chosen][key])
        blessed = new > popularity
        reason = (
            f"{chosen}, first model: {key} {new:.4f} {'>' if blessed else '<='} "
            f"popularity {popularity:.4f}"
        )
    else:
        comparison = compare_with_pushed(
            models[chosen],
            variants[chosen],
            baseline_version_dir,
            data_dir,
            section,
            export_options or {},
            evaluated={os.path.abspath(p): variants[v] for v, p in models.items()},
        )
        new, baseline = comparison["candidate"], comparison["baseline"]
        blessed = new >= baseline - section.tolerance
        reason = (
            f"{chosen}: {key} {new:.4f} vs pushed {baseline:.4f} (tolerance "
            f"{section.tolerance}, both scored by {comparison['scored_by']}): "
            f"{'within' if blessed else 'drop beyond'} tolerance"
        )
    if selection["note"]:
        reason += f"; note: {selection['note']}"
    log.info("Evaluator: %s -> %s", reason, "BLESSED" if blessed else "NOT BLESSED")
    return {
        "m": section.m,
        "candidate": chosen,
        "selection": selection,
        "variants": variants,
        "popularity": {key: popularity},
        "baseline": None
        if comparison is None
        else {
            "version_dir": baseline_version_dir,
            key: comparison["baseline"],
            "candidate": {key: comparison["candidate"]},
            "scored_by": comparison["scored_by"],
        },
        "blessing": {"blessed": blessed, "reason": reason},
    }
