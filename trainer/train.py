"""``dnc train``: the Keras training loop around ``RetrievalModel``.

Keras progress bars, TensorBoard logs (``MODEL_DIR/logs``), a backup every epoch
(``MODEL_DIR/backup``: an interrupted run started again resumes from the last
finished epoch), early stopping on validation Recall@M with the best weights
restored, seeded runs, and any ``tf.distribute`` strategy. The final model
(weights + ``model.json``) appears atomically in ``MODEL_DIR/model``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from preprocessing import features, fileio
from trainer import data, evaluation, multiworker, sequence_data
from trainer.config import ModelConfig, TrainConfig, get_variant
from trainer.model import RetrievalModel
from trainer.samplers import ClusterTable, NegativeSampler

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
WEIGHTS = "weights"
MODEL_JSON = "model.json"
# The merge behind the per-epoch validation recall (early stopping, model selection)
# of merged variants: the serving default (alpha 1, no per-epoch selection).
MONITOR_MERGE = "score"
# The score merge's prompt weights the monitor of merged variants tracks; it keeps the
# best. Validation selects the weight after training (``PROMPT_WEIGHT_GRID``) and on the
# Amazon sets picks 0 or 0.25, whose ranking kept improving after the fully prompted
# merge (weight 1) had peaked: tracking weight 1 alone stopped ``dnc`` four to six epochs
# early there (test R@20 +1.6% / +2.4% with both; docs/divide-and-conquer.md, section 18).
MONITOR_PROMPT_WEIGHTS = (1.0, 0.0)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``train`` produced.

    Attributes:
        model_dir: directory of the final model (``MODEL_DIR/model``).
        history: per-epoch logs (loss, validation recalls, samples/s).
        samples_per_epoch: training samples in one pass over the data.
    """

    model_dir: str
    history: List[Dict[str, float]]
    samples_per_epoch: int


class ModelScorer:
    """Adapts ``RetrievalModel`` to ``trainer.evaluation.Scorer`` (exact scoring).

    The ``mf`` variant scores by user index, so evaluation passes ``users``.

    Args:
        model: the trained model.
    """

    def __init__(self, model: RetrievalModel):
        self.model = model
        self.num_tasks = model.num_clusters
        self._user = tf.function(
            lambda h, t, u: model.user_embedding(h, t, u, training=False), reduce_retracing=True
        )
        self._intent = tf.function(lambda h: model.intent(h, training=False), reduce_retracing=True)
        self._clusters = {
            plain: tf.function(
                lambda h, plain=plain: model.cluster_user_embeddings(h, with_plain=plain),
                reduce_retracing=True,
            )
            for plain in (False, True)
        }
        self.num_interests = 0
        if model.variant.multi_interest:
            self.num_interests = model.model_config.num_interests
            self._interests = tf.function(
                lambda h: model.interest_embeddings(h, training=False), reduce_retracing=True
            )

    def item_embeddings(self) -> np.ndarray:
        ids = tf.range(self.model.num_items + 1)
        return self.model.candidate_embeddings(ids).numpy()

    def user_embeddings(
        self, history: np.ndarray, task: np.ndarray, users: Optional[np.ndarray] = None
    ) -> np.ndarray:
        if users is None:
            users = np.zeros(len(history), np.int32)
        return self._user(
            tf.constant(history, tf.int32),
            tf.constant(task, tf.int32),
            tf.constant(users, tf.int32),
        ).numpy()

    def cluster_user_embeddings(
        self, history: np.ndarray, with_plain: bool, users: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """``[B, K, d]`` user vectors of every cluster (``with_plain``: ``[B, K + 1, d]``),
        one tower pass per row where the model allows (``shares_tower_pass``).
        ``users`` is unused: conditioned towers read histories only."""
        del users
        return self._clusters[with_plain](tf.constant(history, tf.int32)).numpy()

    def intent(self, history: np.ndarray) -> Optional[np.ndarray]:
        return self._intent(tf.constant(history, tf.int32)).numpy()

    def interest_embeddings(self, history: np.ndarray) -> Optional[np.ndarray]:
        """``[B, I, d]`` interests of multi-interest variants, None for the others."""
        if not self.num_interests:
            return None
        return self._interests(tf.constant(history, tf.int32)).numpy()


# The early-stopping monitor: the mean validation recall over the ``eval_m`` list sizes.
# One list size alone stalls on a 2,000-user sample (on the ML-1M-sized set R@20 read
# 0.5035 four epochs running while R@50 rose 0.709 -> 0.732, and training stopped there).
MONITOR = "val_recall"


def mean_recall(recall: Dict[int, float]) -> float:
    """The monitor's value: the mean of Recall@M over the list sizes M."""
    if not recall:
        raise ValueError("mean_recall needs at least one list size")
    return float(np.mean(list(recall.values())))


class ValidationRecall(tf.keras.callbacks.Callback):
    """Adds validation Recall@M (the serving merge path), their mean (``MONITOR``) and
    samples/s to the epoch logs.

    Args:
        eval_data: validation users.
        item_cluster: cluster of each model item id.
        m_values: list sizes.
        merged: evaluate through the per-cluster merge.
        merge: which merge (``quota`` or ``score``, alpha 1: no selection per epoch).
        prompt_weights: the score merge's prompt weights to evaluate; the monitor keeps the
            best (``val_prompt_weight`` logs which).
        samples_per_step: targets predicted per step (for throughput): the batch size, or
            for all-position training the batch size times the mean targets per window.
    """

    def __init__(
        self,
        eval_data: data.EvaluationData,
        item_cluster: np.ndarray,
        m_values: Tuple[int, ...],
        merged: bool,
        samples_per_step: float,
        merge: str = "quota",
        prompt_weights: Tuple[float, ...] = (1.0,),
    ):
        super().__init__()
        self.merge = merge
        self.prompt_weights = tuple(prompt_weights)
        self.eval_data = eval_data
        self.item_cluster = item_cluster
        self.m_values = m_values
        self.merged = merged
        self.samples_per_step = samples_per_step
        self._start = 0.0
        self._steps = 0
        self._scorer: Optional[ModelScorer] = None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._start = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        self._steps += 1

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        elapsed = time.perf_counter() - self._start
        logs = logs if logs is not None else {}
        logs["samples_per_second"] = self._steps * self.samples_per_step / max(elapsed, 1e-9)
        if self._scorer is None or self._scorer.model is not self.model:
            self._scorer = ModelScorer(self.model)  # traced once, not every epoch
        weights = self.prompt_weights if self.merged and self.merge == "score" else (1.0,)
        results = dict(zip(weights, self._evaluate(weights), strict=True))  # one tower pass
        best = max(weights, key=lambda w: mean_recall(results[w].recall))
        result = results[best]
        for m in self.m_values:
            logs[f"val_recall@{m}"] = result.recall[m]
            logs[f"val_within_cluster_recall@{m}"] = result.within_cluster_recall[m]
        logs[MONITOR] = mean_recall(result.recall)
        if len(weights) > 1:
            logs["val_prompt_weight"] = best
        if result.intent_top1 is not None:
            logs["val_intent_top1"] = result.intent_top1

    def _evaluate(self, weights: Tuple[float, ...]) -> Tuple[evaluation.EvaluationResult, ...]:
        return evaluation.evaluate_weights(
            self._scorer,
            self.eval_data.histories,
            self.eval_data.targets,
            self.eval_data.exclude,
            self.item_cluster,
            m_values=self.m_values,
            merged=self.merged,
            progress=False,
            users=self.eval_data.users,
            merge=self.merge,
            prompt_weights=weights,
        )


def build_model(config: TrainConfig, items: data.ItemsTable) -> RetrievalModel:
    """The model of ``config``'s variant, sized for ``items``."""
    return RetrievalModel(
        get_variant(config.variant),
        config.model,
        num_items=items.num_items,
        num_clusters=items.num_clusters,
        num_users=items.num_users,
        loss=config.loss,
        intent_weight=config.intent_weight,
        intent_encoder=config.intent_encoder,
        item_cluster=items.item_cluster,
        softmax_scope=config.softmax_scope,
        intent_recency=config.intent_recency,
        shared_negatives=config.shared_negatives,
        implied_negatives=config.implied_negatives,
    )


def input_sampler(config: TrainConfig, items: data.ItemsTable) -> Optional[NegativeSampler]:
    """The sampler that draws ``config``'s negatives in the input pipeline, or None where
    the loss needs none (full ``softmax``) or the model draws them (``shared_negatives``)."""
    if config.loss == "softmax" or config.shared_negatives:
        return None
    return NegativeSampler(
        ClusterTable(items.item_cluster[1:], items.num_clusters),
        mode=get_variant(config.variant).sampler,
        ratio=config.mixed_ratio,
        seed=config.seed,
    )


def make_dataset(
    config: TrainConfig, items: data.ItemsTable, split: Optional[data.TrainSplit] = None
) -> tf.data.Dataset:
    """The endless training batches of ``config``, with the variant's negatives.

    Per-prefix (``data.training_dataset``) or all-position
    (``sequence_data.sequence_dataset``)
    batches after ``config.training``; the full ``softmax`` loss needs no negatives.
    ``split`` is the training split already read (None: read it from ``config.data``).
    """
    kwargs = dict(
        sampler=input_sampler(config, items),
        num_negatives=config.num_negatives,
        shuffle_buffer=config.shuffle_buffer,
        seed=config.seed,
        split=split,
    )
    if config.training == "all-positions":
        return sequence_data.sequence_dataset(
            config.data,
            config.model.max_len,
            config.batch_size,
            buckets=length_buckets(config),
            **kwargs,
        )
    return data.training_dataset(config.data, config.model.max_len, config.batch_size, **kwargs)


def length_buckets(config: TrainConfig) -> Optional[sequence_data.LengthBuckets]:
    """The length buckets of all-position training (None: fixed-size batches)."""
    if config.training != "all-positions" or config.length_buckets == 0:
        return None
    return sequence_data.LengthBuckets.for_budget(
        config.model.max_len, config.batch_size, config.length_buckets
    )


def early_stopping_start(min_steps: int, steps_per_epoch: int) -> int:
    """The first epoch (0-based) that early stopping watches: after ``min_steps`` steps."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return math.ceil(min_steps / steps_per_epoch)


class ReduceLROnPlateauFrom(tf.keras.callbacks.ReduceLROnPlateau):
    """Keras ``ReduceLROnPlateau`` that, like ``EarlyStopping(start_from_epoch=...)``,
    ignores the epochs before ``start_from_epoch`` (0-based): early stalls of small data
    sets must not cut the rate (``TrainConfig.min_steps``)."""

    def __init__(self, start_from_epoch: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_from_epoch = start_from_epoch

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, float]] = None) -> None:
        if epoch >= self.start_from_epoch:
            super().on_epoch_end(epoch, logs)
        elif logs is not None:  # the parent logs the rate every epoch: keep history square
            logs["lr"] = float(tf.keras.backend.get_value(self.model.optimizer.learning_rate))


def _callbacks(
    config: TrainConfig,
    items: data.ItemsTable,
    samples_per_step: Optional[float],
    steps_per_epoch: int,
) -> List[tf.keras.callbacks.Callback]:
    validation = data.evaluation_data(
        config.data,
        features.VALIDATION,
        config.model.max_len,
        max_users=config.eval_users,
        seed=config.seed,
    )
    start = early_stopping_start(config.min_steps, steps_per_epoch)
    decay: List[tf.keras.callbacks.Callback] = []
    if config.lr_decay < 1.0:
        decay.append(
            ReduceLROnPlateauFrom(
                start, monitor=MONITOR, mode="max", factor=config.lr_decay, patience=1, verbose=1
            )
        )
    return [
        ValidationRecall(
            validation,
            items.item_cluster,
            config.eval_m,
            get_variant(config.variant).merged,
            config.batch_size if samples_per_step is None else samples_per_step,
            merge=MONITOR_MERGE,
            prompt_weights=MONITOR_PROMPT_WEIGHTS,
        ),
        tf.keras.callbacks.BackupAndRestore(os.path.join(config.output, "backup")),
        tf.keras.callbacks.EarlyStopping(
            monitor=MONITOR,
            mode="max",
            patience=config.patience,
            restore_best_weights=True,
            start_from_epoch=start,
        ),
        *decay,
        tf.keras.callbacks.TensorBoard(os.path.join(config.output, "logs"), write_graph=False),
    ]


def train(
    config: TrainConfig,
    strategy: Optional[tf.distribute.Strategy] = None,
    verbose: Any = "auto",
    extra_callbacks: Optional[List[tf.keras.callbacks.Callback]] = None,
) -> TrainResult:
    """Trains ``config.variant`` on ``config.data`` and saves it under ``config.output``."""
    tf.keras.utils.set_random_seed(config.seed)
    items = data.load_items(config.data)
    # One read of the training records: the counts below and every epoch use it.
    split = data.load_train_split(config.data)
    if config.training == "all-positions":
        # batch_size counts sequence windows; samples/s counts predicted targets. Every
        # target is in exactly one window, so the sequence lengths give both.
        lengths = sequence_data.window_lengths(config.data, config.model.max_len, split)
        samples, units, noun = int(lengths.sum()), len(lengths), "windows"
        buckets = length_buckets(config)
        steps = (
            math.ceil(units / config.batch_size)
            if buckets is None
            else buckets.steps_per_epoch(lengths)
        )
        samples_per_step = samples / steps  # on average over an epoch
    else:
        samples = data.count_training_samples(config.data, split)
        units, noun = samples, "samples"
        steps = math.ceil(samples / config.batch_size)
        samples_per_step = float(config.batch_size)
    if units < config.batch_size:
        raise ValueError(
            f"{config.data} has {units} training {noun}, fewer than one batch "
            f"({config.batch_size}); lower --batch-size"
        )
    steps = config.steps_per_epoch or steps
    strategy = strategy or tf.distribute.get_strategy()
    dataset = make_dataset(config, items, split).with_options(_distribute_options())
    with strategy.scope():
        model = build_model(config, items)
        model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    log.info(
        "training %s: %d samples/epoch, %d steps of %d, strategy %s",
        config.variant,
        samples,
        steps,
        config.batch_size,
        type(strategy).__name__,
    )
    callbacks = _callbacks(config, items, samples_per_step, steps) + list(extra_callbacks or [])
    fit = model.fit(
        dataset, epochs=config.epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=verbose
    )
    history = [
        {key: float(values[i]) for key, values in fit.history.items()}
        for i in range(len(fit.history.get("loss", [])))
    ]
    model_dir = save_model(model, config, history, strategy)
    return TrainResult(model_dir=model_dir, history=history, samples_per_epoch=samples)


def _distribute_options() -> tf.data.Options:
    """Multi-worker input: every worker builds the same seeded batches and keeps its share.

    The training data is in memory (not files), so it is sharded by element (``DATA``);
    single-process strategies ignore the setting.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def save_model(
    model: RetrievalModel,
    config: TrainConfig,
    history: List[Dict[str, float]],
    strategy: Optional[tf.distribute.Strategy] = None,
) -> str:
    """Writes weights + ``model.json`` to ``config.output/model`` atomically.

    Under a multi-worker strategy every worker saves (saving may take part in
    collectives), but only the chief publishes ``config.output/model``; the others
    write to a temporary directory that is removed (``trainer.multiworker.write_dir``).

    Returns:
        ``config.output/model`` (on every worker: where the chief put the model).
    """
    final = os.path.join(config.output, MODEL_SUBDIR)
    strategy = strategy or tf.distribute.get_strategy()
    chief = multiworker.is_chief(strategy)
    staging = fileio.staging_path(final) if chief else multiworker.write_dir(final, strategy)
    os.makedirs(staging)
    try:
        model.save_weights(os.path.join(staging, WEIGHTS))
        with open(os.path.join(staging, MODEL_JSON), "w", encoding="utf-8") as f:
            json.dump(
                {"config": dataclasses.asdict(config), "history": history}, f, indent=2, default=str
            )
        if chief:
            fileio.publish_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not chief:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def config_from_json(raw: Dict[str, Any]) -> TrainConfig:
    """Rebuilds a TrainConfig from ``dataclasses.asdict`` output (``model.json``).

    Also loads the files of older versions: a field they lack takes its dataclass
    default (what training used before the field existed, not a regime of
    ``trainer.config.make_train_config``); a field no longer known is ignored, with a
    warning.
    """

    def known(cls: type, values: Dict[str, Any], where: str) -> Dict[str, Any]:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            log.warning("model.json: ignoring unknown %s fields %s", where, unknown)
        return {k: v for k, v in values.items() if k in names}

    raw = known(TrainConfig, dict(raw), "config")
    raw["model"] = ModelConfig(**known(ModelConfig, dict(raw.get("model") or {}), "model"))
    if "eval_m" in raw:
        raw["eval_m"] = tuple(raw["eval_m"])
    return TrainConfig(**raw)


def resolve_model_dir(model_dir: str) -> str:
    """``MODEL_DIR/model`` when ``model_dir`` is a ``dnc train --output``, else itself."""
    nested = os.path.join(model_dir, MODEL_SUBDIR)
    return nested if os.path.isdir(nested) else model_dir


def read_model_json(model_dir: str) -> Dict[str, Any]:
    """The ``model.json`` of a trained model (``config`` and the epochs' ``history``).

    Args:
        model_dir: the ``--output`` of ``dnc train`` or its ``model`` subdirectory.

    Raises:
        ValueError: no ``model.json`` there.
    """
    model_dir = resolve_model_dir(model_dir)
    path = os.path.join(model_dir, MODEL_JSON)
    if not os.path.exists(path):
        raise ValueError(f"{model_dir} holds no trained model ({MODEL_JSON} missing)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_model(
    model_dir: str, data_dir: Optional[str] = None
) -> Tuple[RetrievalModel, TrainConfig]:
    """Rebuilds a trained model from ``MODEL_DIR`` (or ``MODEL_DIR/model``).

    Args:
        model_dir: the ``--output`` of ``dnc train`` or its ``model`` subdirectory.
        data_dir: preprocessing output to size the model from (default: the one
            it was trained on).
    """
    model_dir = resolve_model_dir(model_dir)
    config = config_from_json(read_model_json(model_dir)["config"])
    items = data.load_items(data_dir or config.data)
    model = build_model(config, items)
    model.load_weights(os.path.join(model_dir, WEIGHTS)).expect_partial()
    return model, config
