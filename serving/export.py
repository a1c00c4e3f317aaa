"""``dnc export``: a trained model as a TensorFlow Serving SavedModel with ANN indexes.

Layout (TF Serving's): ``BASE/NAME/<version>/`` with integer versions; ``export_model``
writes version ``1 + the largest existing one`` into a hidden staging directory beside
it and renames it into place, so a model server never sees a partial version.

The SavedModel (``serving.retrieval_module.RetrievalModule``) maps raw item-id strings
through the TFT item vocabulary, runs the user tower conditioned on every cluster and
the intent head, retrieves from one index per cluster (ScaNN or brute force) and merges
the per-cluster lists, by default with the merge (and alpha) selected on validation: the
integer quotas ``M_k ~ M p_k^alpha / sum p^alpha`` or the joint hierarchical-softmax score
(``trainer.score_merge``; ``scores`` are then the joint scores).
Plain variants (``merged=False``: ``sasrec``, ``sasrec-mixed``) are served as in their
evaluation: the global top-M of the unconditioned embedding from one index over all
items (``alpha`` is accepted and ignored). ``mf`` needs user indices and is rejected.

Signatures (B = batch, n = any history length, M = ``default_num_results``):

* ``serving_default``: ``history`` string [B, n] -> ``item_ids`` string [B, M],
  ``scores`` float32 [B, M], ``clusters`` int32 [B, M].
* ``retrieve``: ``history`` string [B, n], ``alpha`` float32 [], ``num_results``
  int32 [] (``<= max_num_results``, else InvalidArgument) -> the same with
  M = ``num_results``.
* ``retrieve_filtered``: as ``retrieve`` plus ``clusters`` int32 [B, C] (only these
  clusters; -1 pads, a row of -1 allows all; unknown cluster: InvalidArgument) and
  ``exclude`` string [B, E] (raw ids removed from the result, ``""`` pads, at most
  ``max_exclude`` per row).
* ``user_embedding``: ``history`` string [B, n], ``cluster`` int32 [B] (K = no task)
  -> ``embedding`` float32 [B, d].
* ``intent``: ``history`` string [B, n] -> ``probabilities`` float32 [B, K].
* ``predict_examples``: ``examples`` string [B] (serialized tf.Example with a bytes
  feature ``history``) -> as ``serving_default``.

Histories are raw ids oldest first, padded with ``""``; unknown ids are ignored. Rows
with fewer unseen items than M are padded with ``""``, ``-inf`` and cluster ``-1``.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from preprocessing import features, fileio
from serving.index_kinds import GLOBAL_LEAVES_FRACTION, INDEX_KINDS, LEAVES_FRACTION
from serving.indexes import index_plan
from serving.model_config import METADATA_DIR, METADATA_FILE
from serving.retrieval_module import RetrievalModule
from trainer import data, merge_selection
from trainer.alpha import alpha_to_json, check_alpha
from trainer.config import get_variant
from trainer.score_merge import check_merge, check_prompt_weight, searches_one_global_index
from trainer.train import ModelScorer, load_model, read_model_json

log = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 512
DEFAULT_MAX_EXCLUDE = 100
_VERSION = re.compile(r"^[0-9]+$")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Everything ``export_model`` needs.

    Attributes:
        model_dir: ``dnc train --output`` (or its ``model`` subdirectory).
        data_dir: the preprocessing output the model was trained on.
        output: ``BASE/NAME``; versions are created below it.
        index: ``scann`` or ``brute-force``.
        max_num_results: largest ``num_results`` of the ``retrieve`` signature.
        default_num_results: M of ``serving_default`` and ``predict_examples``.
        alpha: quota (or intent) exponent; None selects it on the validation split.
        merge: ``quota`` or ``score`` (``trainer.score_merge``); None selects it on the
            validation split together with alpha.
        prompt_weight: the score merge's blend of prompted and unprompted cluster queries
            (``trainer.score_merge``); None selects it on validation with merge and alpha
            (1 when both of those are given).
        max_history: most recent history items excluded from the results (older
            ones may come back); each index returns ``max_num_results + max_history``
            candidates so that the exclusion never leaves a list short.
        max_exclude: most ``exclude`` ids per row of ``retrieve_filtered``; every index
            returns that many more candidates, for the same reason.
        scann_min_size: clusters smaller than this are searched exactly.
        leaves_fraction: share of the ScaNN tree leaves searched in each cluster's index.
        global_leaves_fraction: the same in the one index over all items (``global_index``).
        global_index: when the score merge runs at prompt weight 0 (every cluster searched
            with the unprompted user vector, ranked by that score alone), also build one
            index over all items so that unrestricted requests need one search instead
            of one per cluster (``RetrievalModule``); costs a second copy of the index.
    """

    model_dir: str
    data_dir: str
    output: str
    index: str = "scann"
    max_num_results: int = 200
    default_num_results: int = 50
    alpha: Optional[float] = None
    merge: Optional[str] = None
    prompt_weight: Optional[float] = None
    max_history: int = DEFAULT_MAX_HISTORY
    max_exclude: int = DEFAULT_MAX_EXCLUDE
    scann_min_size: int = 1024
    leaves_fraction: float = LEAVES_FRACTION
    global_leaves_fraction: float = GLOBAL_LEAVES_FRACTION
    global_index: bool = True

    def __post_init__(self) -> None:
        if self.index not in INDEX_KINDS:
            raise ValueError(f"unknown index {self.index!r}; expected one of {INDEX_KINDS}")
        if self.max_num_results < 1:
            raise ValueError(f"max_num_results must be >= 1, got {self.max_num_results}")
        if not 1 <= self.default_num_results <= self.max_num_results:
            raise ValueError(
                f"default_num_results={self.default_num_results} must be in "
                f"[1, max_num_results={self.max_num_results}]"
            )
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if self.max_exclude < 0:
            raise ValueError(f"max_exclude must be >= 0, got {self.max_exclude}")
        for name in ("leaves_fraction", "global_leaves_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.alpha is not None:
            check_alpha(self.alpha)
        if self.merge is not None:
            check_merge(self.merge)
        if self.prompt_weight is not None:
            check_prompt_weight(self.prompt_weight, self.merge)


def load_exported(path: str) -> Any:
    """Loads an exported SavedModel after registering ScaNN's TensorFlow ops.

    Args:
        path: a version directory (``BASE/NAME/<version>``).
    """
    from scann.scann_ops.py import scann_ops  # noqa: F401  (registers the Scann ops)

    return tf.saved_model.load(path)


def next_version(output: str) -> int:
    """1 + the largest integer version under ``output`` (1 when there is none)."""
    if not os.path.isdir(output):
        return 1
    versions = [int(name) for name in os.listdir(output) if _VERSION.match(name)]
    return max(versions, default=0) + 1


def data_fingerprint(data_dir: str) -> str:
    """sha256 over ``items.tsv`` and ``stats.json`` of a preprocessing output."""
    digest = hashlib.sha256()
    for name in (features.ITEMS_FILE, features.STATS_FILE):
        digest.update(name.encode() + b"\0")
        with open(os.path.join(data_dir, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _validation_metrics(model_dir: str) -> Dict[str, Any]:
    """The val_* logs of the best epoch (by the first val_recall) of ``model.json``."""
    raw = read_model_json(model_dir)
    history = raw.get("history") or []
    if not history:
        return {}
    m = raw["config"]["eval_m"][0]
    best = max(range(len(history)), key=lambda i: history[i].get(f"val_recall@{m}", -1.0))
    metrics = {k: v for k, v in history[best].items() if k.startswith("val_")}
    return {"epoch": best + 1, **metrics}


def _select_merge(model, items: data.ItemsTable, cfg: ExportConfig, max_len: int):
    """(merge, alpha, prompt weight) with the best validation Recall@default_num_results."""
    validation = data.evaluation_data(cfg.data_dir, features.VALIDATION, max_len)
    selection = merge_selection.select_merge(
        ModelScorer(model),
        validation.histories,
        validation.targets,
        validation.exclude,
        items.item_cluster,
        grids=merge_selection.selection_grids(cfg.merge, cfg.alpha),
        m=cfg.default_num_results,
        merged=True,
        progress=False,
        users=validation.users,
        prompt_weights=merge_selection.selection_weights(cfg.prompt_weight),
    )
    log.info(
        "merge %s, alpha %s, prompt weight %s selected on validation:\n%s",
        selection.merge,
        selection.alpha,
        selection.prompt_weight,
        selection.format_table(),
    )
    return selection.merge, selection.alpha, selection.prompt_weight


def _item_vocabulary(data_dir: str, items: data.ItemsTable) -> str:
    """The TFT item vocabulary file, checked against ``items.tsv``."""
    transform = tft.TFTransformOutput(os.path.join(data_dir, features.TRANSFORM_DIR))
    path = transform.vocabulary_file_by_name(features.ITEM_CLUSTER_VOCAB)
    with tf.io.gfile.GFile(path) as f:
        vocab = [line.rstrip("\n").split(features.VOCAB_DELIMITER)[0] for line in f]
    if vocab != list(items.item_ids):
        raise ValueError(f"{path} does not match {features.ITEMS_FILE} of {data_dir}")
    return path


def _plans(items: data.ItemsTable, merged: bool, cfg: ExportConfig) -> List[Dict[str, Any]]:
    """Each cluster's index plan (``merged``), else the plan of one index over all items."""
    k = cfg.max_num_results + cfg.max_history + cfg.max_exclude
    if merged:
        sizes = np.bincount(items.item_cluster[1:], minlength=items.num_clusters)
        return [
            index_plan(int(s), k, cfg.index, cfg.scann_min_size, cfg.leaves_fraction) for s in sizes
        ]
    return [
        index_plan(items.num_items, k, cfg.index, cfg.scann_min_size, cfg.global_leaves_fraction)
    ]


def _build_model(model, max_len: int, num_clusters: int) -> None:
    """Calls every tower once so that the deferred checkpoint restore happens."""
    history = tf.ones([1, max_len], tf.int32)
    if model.variant.multi_interest:
        model.interest_embeddings(history)
    else:
        model.user_embedding(history, tf.constant([num_clusters], tf.int32))
    model.intent(history)
    model.candidate_embeddings(tf.constant([1]))


def export(cfg: ExportConfig) -> str:
    """Exports ``cfg.model_dir``; returns the new version directory (see module docstring)."""
    return _write(*build_module(cfg), cfg.output)


def build_module(
    cfg: ExportConfig, per_cluster_k: bool = True
) -> Tuple[RetrievalModule, Dict[str, Any]]:
    """The serving module of ``cfg.model_dir`` and its metadata, not yet written.

    ``per_cluster_k=False`` builds the fixed-k reference path (``RetrievalModule``).
    """
    model, train_config = load_model(cfg.model_dir, cfg.data_dir)
    variant = get_variant(train_config.variant)
    if variant.user_tower == "mf":
        raise ValueError(
            f"variant {variant.name!r} scores by user index and cannot serve raw histories; "
            "export a sequence variant (sasrec, dnc, ...)"
        )
    items = data.load_items(cfg.data_dir)
    max_len = train_config.model.max_len
    _build_model(model, max_len, items.num_clusters)
    vocab_path = _item_vocabulary(cfg.data_dir, items)
    if not variant.merged:
        merge, alpha, weight = "quota", 0.0, 1.0
    elif cfg.alpha is None or cfg.merge is None:
        merge, alpha, weight = _select_merge(model, items, cfg, max_len)
    else:
        weight = 1.0 if cfg.prompt_weight is None else cfg.prompt_weight
        merge, alpha = cfg.merge, float(cfg.alpha)
    plans = _plans(items, variant.merged, cfg)
    global_plan = None
    if cfg.global_index and variant.merged and searches_one_global_index(merge, weight):
        global_plan = _plans(items, False, cfg)[0]
    module = RetrievalModule(
        model,
        vocab_path,
        list(items.item_ids),
        items.item_cluster,
        plans,
        max_num_results=cfg.max_num_results,
        default_num_results=cfg.default_num_results,
        alpha=alpha,
        max_history=cfg.max_history,
        merge=merge,
        max_exclude=cfg.max_exclude,
        per_cluster_k=per_cluster_k,
        prompt_weight=weight,
        global_plan=global_plan,
    )
    if global_plan is not None:
        log.info(
            "score merge at prompt weight 0: unrestricted requests search one %s index over "
            "all %d items (requests restricted to clusters use the per-cluster indexes)",
            global_plan["kind"],
            items.num_items,
        )
    if module.cluster_tables:  # kept only where the score merge's offsets count
        log.info(
            "score merge at prompt weight %s: every request computes the exact in-cluster "
            "log-partitions over all %d items (the cost of a brute-force search, whatever "
            "the index); prompt weight 0 or --merge quota avoid it",
            weight,
            items.num_items,
        )
    metadata = {
        "variant": variant.name,
        "merged": variant.merged,
        "num_clusters": items.num_clusters,
        "num_items": items.num_items,
        "cluster_sizes": np.bincount(items.item_cluster[1:], minlength=items.num_clusters)
        .astype(int)
        .tolist(),
        "embedding_dim": train_config.model.embedding_dim,
        "max_len": max_len,
        "index": {
            "kind": cfg.index,
            "scann_min_size": cfg.scann_min_size,
            "plans": plans,
            "global_plan": global_plan,
        },
        "alpha": alpha_to_json(alpha),
        "alpha_selected_on_validation": variant.merged and cfg.alpha is None,
        "merge": merge,
        "merge_selected_on_validation": variant.merged and cfg.merge is None,
        "prompt_weight": weight,
        "max_num_results": cfg.max_num_results,
        "default_num_results": cfg.default_num_results,
        "max_history": cfg.max_history,
        "max_exclude": cfg.max_exclude,
        "data_fingerprint": data_fingerprint(cfg.data_dir),
        "data_dir": os.path.abspath(cfg.data_dir),
        "model_dir": os.path.abspath(cfg.model_dir),
        "validation_metrics": _validation_metrics(cfg.model_dir),
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    return module, metadata


def _write(module: RetrievalModule, metadata: Dict[str, Any], output: str) -> str:
    os.makedirs(output, exist_ok=True)
    version = next_version(output)
    staging = fileio.staging_path(os.path.join(output, str(version)))
    try:
        tf.saved_model.save(
            module,
            staging,
            signatures=module.signatures(),
            options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]),
        )
        os.makedirs(os.path.join(staging, METADATA_DIR), exist_ok=True)
        while True:
            metadata["version"] = version
            with open(os.path.join(staging, METADATA_DIR, METADATA_FILE), "w") as f:
                json.dump(metadata, f, indent=2, sort_keys=True)
                f.write("\n")
            final = os.path.join(output, str(version))
            try:
                # A directory rename fails on a non-empty target: a concurrent export
                # that took this version makes us move on to the next one.
                if os.path.exists(final):
                    raise FileExistsError(errno.EEXIST, "version exists", final)
                os.rename(staging, final)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                version = next_version(output)
                continue
            return final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_model(
    model_dir: str,
    data_dir: str,
    output: str,
    index: str = "scann",
    max_num_results: int = 200,
    default_num_results: int = 50,
    alpha: Optional[float] = None,
    max_history: Optional[int] = None,
    merge: Optional[str] = None,
    **kwargs: Any,
) -> str:
    """Exports a trained model for TF Serving; returns the new version directory.

    Args:
        model_dir: ``dnc train --output``.
        data_dir: preprocessing output the model was trained on.
        output: ``BASE/NAME``.
        index: ``scann`` or ``brute-force``.
        max_num_results: largest ``num_results`` of ``retrieve``.
        default_num_results: M of ``serving_default``.
        alpha: quota exponent; None selects it on validation (merged variants).
        merge: ``quota`` or ``score``; None selects it on validation (merged variants).
        max_history: recent history items excluded (None: ``DEFAULT_MAX_HISTORY``).
        **kwargs: further ``ExportConfig`` fields (``max_exclude``, ``scann_min_size``,
            ``leaves_fraction``).
    """
    cfg = ExportConfig(
        model_dir=model_dir,
        data_dir=data_dir,
        output=output,
        index=index,
        max_num_results=max_num_results,
        default_num_results=default_num_results,
        alpha=alpha,
        merge=merge,
        max_history=DEFAULT_MAX_HISTORY if max_history is None else max_history,
        **kwargs,
    )
    return export(cfg)
