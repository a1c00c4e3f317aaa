"""Typed, frozen configuration of training and evaluation, and the variant table.

Conventions shared by every trainer module:

* Item ids inside the model are ``item_index + 1`` (``item_index`` from
  ``items.tsv``); ``PAD_ID = 0`` pads sequences. Embedding tables have
  ``num_items + 1`` rows.
* Histories are ``[batch, max_len]`` int32, right-aligned: the most recent
  item is in the last column, padding on the left.
* Tasks are cluster ids ``0..K-1``; task ``K`` (``NO_TASK``) means "no prompt",
  the unconditioned representation used by the intent head.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, Optional, Tuple

from trainer.sizing import sized_defaults

log = logging.getLogger(__name__)

PAD_ID = 0

CONDITIONINGS = ("none", "concat", "hadamard", "mmoe")
PROMPT_POSITIONS = ("input", "output")
SAMPLERS = ("global", "in_cluster", "mixed")
LOSSES = ("bce", "sampled-softmax", "softmax")
SOFTMAX_SCOPES = ("auto", "cluster", "all")
TRAININGS = ("prefix", "all-positions")
INTENT_ENCODERS = ("pooled", "pooled-clusters", "tower", "implied")
MULTI_INTEREST_TOWERS = ("mind", "comirec-sa")
INTEREST_READOUTS = ("hard", "label-aware")


@dataclasses.dataclass(frozen=True)
class Variant:
    """What distinguishes one compared method from another.

    Attributes:
        name: the ``--variant`` name.
        user_tower: ``sasrec``, ``mf``, or a multi-interest tower (``mind``, ``comirec-sa``).
        conditioning: how the task prompt enters the user tower (CONDITIONINGS).
        sampler: where negatives come from (SAMPLERS).
        merged: evaluated by the per-cluster divide-and-conquer merge (else global top-M).
    """

    name: str
    user_tower: str
    conditioning: str
    sampler: str
    merged: bool

    @property
    def multi_interest(self) -> bool:
        """True for towers that give each user several interest vectors."""
        return self.user_tower in MULTI_INTEREST_TOWERS


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("mf", "mf", "none", "global", merged=False),
        Variant("sasrec", "sasrec", "none", "global", merged=False),
        Variant("sasrec-mixed", "sasrec", "none", "mixed", merged=False),
        Variant("dnc-naive", "sasrec", "none", "in_cluster", merged=True),
        Variant("dnc-concat", "sasrec", "concat", "in_cluster", merged=True),
        Variant("dnc", "sasrec", "hadamard", "in_cluster", merged=True),
        Variant("dnc-mmoe", "sasrec", "mmoe", "in_cluster", merged=True),
        # Multi-interest baselines (trainer.multi_interest): I user vectors, merged by score.
        Variant("mind", "mind", "none", "global", merged=False),
        Variant("comirec-sa", "comirec-sa", "none", "global", merged=False),
    )
}


def get_variant(name: str) -> Variant:
    """Looks up a variant by its ``--variant`` name."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {tuple(VARIANTS)}")
    return VARIANTS[name]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (SASRec paper defaults).

    Attributes:
        embedding_dim: d.
        max_len: history length n fed to the Transformer.
        num_blocks: self-attention blocks.
        num_heads: attention heads.
        dropout: dropout rate.
        num_experts: experts of the MMoE variant.
        share_item_embeddings: the item tower reuses the sequence input
            embeddings (SASRec's choice; fewer parameters, and every item seen
            as a history element also trains its candidate vector).
        prompt_position: where the Hadamard prompt of ``dnc`` gates: ``input`` (Eq. 5:
            every history embedding, so each cluster needs its own Transformer pass) or
            ``output`` (the Transformer's output: one pass serves every cluster, the
            cost of plain SASRec).
        prompt_rank: rank r of a per-cluster low-rank adapter added to ``dnc``'s output
            prompt, ``h * t_k + (h A_k) B_k`` (A_k: d x r, B_k: r x d, B zero at the start):
            a Hadamard prompt can only rescale h per dimension, the adapter can also rotate
            it inside each cluster. 0: the Hadamard prompt alone (the paper's Eq. 5).
        num_interests: interest vectors of the multi-interest variants (``mind``,
            ``comirec-sa``; both papers use 4).
        routing_iterations: MIND's dynamic-routing iterations (the paper's 3).
        interest_readout: the multi-interest read-out in training (INTEREST_READOUTS):
            ``hard`` scores the target with its closest interest (ComiRec; MIND's label-aware
            attention at p -> inf, its best setting), ``label-aware`` with MIND's
            ``softmax_k(pow(v_k . e, p))`` mix of the interests.
        interest_power: p of the ``label-aware`` read-out (>= 0).
        cluster_embeddings: every item vector (history input and candidate alike) is the
            item's own embedding plus a learned embedding of its cluster, so items of a
            cluster share a component (``towers.ItemEmbedding``).
    """

    embedding_dim: int = 50
    max_len: int = 200
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    num_experts: int = 4
    share_item_embeddings: bool = True
    prompt_position: str = "input"
    prompt_rank: int = 0
    num_interests: int = 4
    routing_iterations: int = 3
    interest_readout: str = "hard"
    interest_power: float = 2.0
    cluster_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.prompt_position not in PROMPT_POSITIONS:
            raise ValueError(
                f"unknown prompt_position {self.prompt_position!r}; expected one of "
                f"{PROMPT_POSITIONS}"
            )
        if self.interest_readout not in INTEREST_READOUTS:
            raise ValueError(
                f"unknown interest_readout {self.interest_readout!r}; expected one of "
                f"{INTEREST_READOUTS}"
            )
        if self.prompt_rank < 0:
            raise ValueError(f"prompt_rank must be >= 0, got {self.prompt_rank}")
        if self.prompt_rank and self.prompt_position != "output":
            raise ValueError(
                f"prompt_rank {self.prompt_rank} needs prompt_position 'output', got "
                f"{self.prompt_position!r}"
            )
        if not 0 <= self.interest_power < math.inf:
            raise ValueError(
                f"interest_power must be a finite number >= 0, got {self.interest_power}"
            )
        for name in ("embedding_dim", "max_len", "num_blocks", "num_heads", "num_experts",
                     "num_interests", "routing_iterations"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"embedding_dim {self.embedding_dim} is not divisible by num_heads {self.num_heads}"
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything ``dnc train`` needs.

    Attributes:
        data: preprocessing output directory.
        output: model directory (checkpoints, logs, final weights).
        variant: ``--variant`` name.
        model: architecture.
        loss: ``bce`` (the paper), ``sampled-softmax`` (positive + sampled negatives,
            log-Q corrected) or ``softmax`` (full softmax: over all items for global
            variants, over the target's cluster only for in-cluster (``dnc-*``) variants).
        softmax_scope: what the full ``softmax`` normalises over: ``auto`` (as above),
            ``cluster`` (the target's cluster) or ``all`` (every item, also for
            ``dnc-*``: the prompted tower then learns against the whole catalogue while
            serving still retrieves per cluster).
        training: ``prefix`` (one sample per (history prefix, next item), the paper's
            unit) or ``all-positions`` (SASRec-style: one causal pass per training
            sequence window gives an output at every position, each predicting the next
            item; ``batch_size`` then counts sequences, see ``trainer.sequence_data``).
        length_buckets: all-position training only: group windows into this many length
            buckets, ``batch_size * max_len`` positions a batch, each batch trimmed to its
            longest window (``trainer.sequence_data.LengthBuckets``); 0 keeps fixed
            ``[batch_size, max_len]`` batches.
        num_negatives: negatives per positive (per-position negatives, drawn in tf.data).
        shared_negatives: > 0: the sampled loss (softmax or BCE) scores negatives shared
            by each batch instead, drawn in the training step: this many per cluster,
            stratified, for in-cluster variants (each target sees its cluster's draws),
            ``K`` times this many uniform ones for global variants
            (``trainer.shared_negatives``: one gather and one matmul a step instead of a
            gather per position); 0: off.
        implied_negatives: uniform negatives shared by each batch in the global head of the
            ``implied`` intent (per-position negatives only; with ``shared_negatives`` the
            head reuses the shared draws); at least the number of items: the head's exact
            softmax over the whole catalogue instead of a sample.
        mixed_ratio: share of in-cluster negatives for the ``mixed`` sampler.
        intent_weight: weight of the intent cross-entropy in the loss.
        intent_encoder: what the intent head reads: ``pooled`` (a position-weighted
            pooling of the history embeddings; adds little to a training step),
            ``pooled-clusters`` (the same pooling over item embeddings plus a learned
            embedding of each history item's cluster, so the intent does not depend on
            item embeddings separating clusters, which an in-cluster loss never asks
            for), ``tower`` (the Transformer with the identity prompt; a second pass
            unless the prompt gates the output) or ``implied`` (no separate head: a
            global retrieval head on the unprompted tower output, trained by a sampled
            softmax over all items, gives ``p(k | u)`` = the softmax mass of cluster
            k's items; ``intent_weight`` weighs that head's loss).
        intent_recency: initial slope of the pooled intent encoders' position logits
            (the item s steps back starts at ``-intent_recency * s``; 0: a plain mean).
            All-position training takes few, large steps, sometimes too few for
            zero-initialised logits to learn that recent items matter most.
        epochs: maximum epochs.
        batch_size: samples per step.
        learning_rate: Adam learning rate.
        lr_decay: factor the learning rate is multiplied by after each epoch without
            validation improvement (Keras ``ReduceLROnPlateau`` on the early-stopping
            monitor, from the epoch early stopping starts watching); 1.0: a constant rate.
        shuffle_buffer: tf.data shuffle buffer: of samples (per-prefix training) or of
            window indices (all-position training, where the default draws every
            window of up to 100,000 in a uniformly random order each epoch).
        steps_per_epoch: cap on steps per epoch (None: one pass over the samples).
        eval_m: list sizes M for validation recall (their mean drives early stopping).
        eval_users: validation users used each epoch (None: all).
        patience: epochs without validation improvement before stopping.
        min_steps: optimizer steps before early stopping starts watching: on small data
            sets an epoch is a few steps, and the validation recall can stall for
            several of them early in training (LastFM: 9 steps an epoch).
        seed: global seed (weights, shuffling, negatives).
    """

    data: str
    output: str
    variant: str = "dnc"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: str = "bce"
    softmax_scope: str = "auto"
    training: str = "prefix"
    length_buckets: int = 5
    num_negatives: int = 1
    shared_negatives: int = 0
    implied_negatives: int = 1024
    mixed_ratio: float = 0.5
    intent_weight: float = 0.1
    intent_encoder: str = "pooled"
    intent_recency: float = 0.0
    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 1e-3
    lr_decay: float = 1.0
    shuffle_buffer: int = 100_000
    steps_per_epoch: Optional[int] = None
    eval_m: Tuple[int, ...] = (20, 50)
    eval_users: Optional[int] = 2000
    patience: int = 3
    min_steps: int = 1000
    seed: int = 42

    def __post_init__(self) -> None:
        get_variant(self.variant)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {LOSSES}")
        if self.softmax_scope not in SOFTMAX_SCOPES:
            raise ValueError(
                f"unknown softmax_scope {self.softmax_scope!r}; expected one of {SOFTMAX_SCOPES}"
            )
        if self.training not in TRAININGS:
            raise ValueError(f"unknown training {self.training!r}; expected one of {TRAININGS}")
        for name in ("num_negatives", "epochs", "batch_size", "shuffle_buffer", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.implied_negatives < 1:
            raise ValueError(f"implied_negatives must be >= 1, got {self.implied_negatives}")
        if self.shared_negatives < 0:
            raise ValueError(f"shared_negatives must be >= 0, got {self.shared_negatives}")
        if self.shared_negatives and self.loss == "softmax":
            raise ValueError("shared_negatives needs a sampled loss (bce, sampled-softmax)")
        if self.shared_negatives and get_variant(self.variant).sampler == "mixed":
            raise ValueError(f"shared_negatives has no mixed sampler ({self.variant})")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {self.min_steps}")
        if self.length_buckets < 0:
            raise ValueError(f"length_buckets must be >= 0, got {self.length_buckets}")
        if not 0.0 <= self.mixed_ratio <= 1.0:
            raise ValueError(f"mixed_ratio must be in [0, 1], got {self.mixed_ratio}")
        if self.intent_encoder not in INTENT_ENCODERS:
            raise ValueError(
                f"unknown intent_encoder {self.intent_encoder!r}; expected one of {INTENT_ENCODERS}"
            )
        if self.intent_recency < 0:
            raise ValueError(f"intent_recency must be >= 0, got {self.intent_recency}")
        if self.intent_weight < 0:
            raise ValueError(f"intent_weight must be >= 0, got {self.intent_weight}")
        if not self.eval_m or min(self.eval_m) < 1:
            raise ValueError(f"eval_m must be positive list sizes, got {self.eval_m}")


# ----------------------------------------------------------------------------- regimes

PRESETS = ("default", "paper")

# The paper's setting (Sec. 4.1): per-prefix samples, BCE with one negative, the SASRec
# hyper-parameters (d = 50, n = 200, 2 blocks, 1 head, dropout 0.2, Adam 1e-3, batch 128).
_PAPER: Dict[str, Any] = {
    "training": "prefix",
    "loss": "bce",
    "num_negatives": 1,
    "length_buckets": 0,
    "intent_encoder": "pooled",
    "intent_recency": 0.0,
    "intent_weight": 0.1,
    "epochs": 20,
    "batch_size": 128,
    "learning_rate": 1e-3,
    "model": ModelConfig(),
}

# The best regime measured (docs/divide-and-conquer.md): all-position training (SASRec-style,
# every position predicts its next item) on fixed windows of 50 with a log-Q corrected
# sampled softmax, in the target's cluster for the in-cluster variants; dnc's prompt gates
# the Transformer's output (one pass for every cluster: as fast as sasrec; the paper's
# input gating is 1.7x slower on long sequences for a difference within one point of R@50).
_DEFAULT: Dict[str, Any] = {
    "training": "all-positions",
    "loss": "sampled-softmax",
    "num_negatives": 128,
    "length_buckets": 0,
    "intent_encoder": "pooled-clusters",
    "intent_recency": 1.0,
    "intent_weight": 1.0,
    # A cap, not a budget: early stopping ends the run (Beauty: 14 epochs). On LastFM (14
    # steps an epoch) 30 epochs stopped every model short of convergence (sasrec test
    # R@50 0.147 at 30 vs 0.195 at up to 100, docs/divide-and-conquer.md section 9).
    "epochs": 100,
    "batch_size": 128,
    "learning_rate": 1e-3,
    "model": ModelConfig(max_len=50, prompt_position="output"),
}
# Per-variant departures from _DEFAULT. dnc's intent is the cluster mass of a global
# sampled-softmax head on its own unprompted (plain SASRec) output: above pooled-clusters on
# validation on Amazon Beauty, Amazon Toys and LastFM (docs/divide-and-conquer.md, section 6).
# Its retrieval loss is the exact softmax over the target's cluster, one matmul per cluster
# (losses.InClusterSoftmaxLoss): no sampled negatives to draw or gather, 2x sasrec's targets/s
# on the ML-1M-sized set and above the sampled one on Beauty validation (section 10).
# Its embeddings are 100-wide: the point selected on validation in dnc's grid on both
# Amazon Beauty and Amazon Toys (for sasrec, 100 won on Beauty and 50 on Toys: kept at 50).
# On small and on large data the width and learning rate of dnc and sasrec follow the data
# size (trainer.sizing: d=50 below 100K interactions, rate 3e-3 decayed on plateaus from 500K;
# d=50 and dropout 0.5 where users hold fewer than 20 interactions on average).
# The plain (unmerged) variants keep a cheap stop-gradient intent head, only for the extra
# merge column of their reports.
_PLAIN_INTENT: Dict[str, Any] = {
    "intent_encoder": "pooled", "intent_recency": 0.0, "intent_weight": 0.1,
}  # fmt: skip
_DEFAULT_BY_VARIANT: Dict[str, Dict[str, Any]] = {
    "dnc": {
        "intent_encoder": "implied",
        "loss": "softmax",
        "model": dataclasses.replace(_DEFAULT["model"], embedding_dim=100),
    },
    **{v: _PLAIN_INTENT for v in ("mf", "sasrec", "sasrec-mixed", "mind", "comirec-sa")},
}


def regime(variant: str, preset: str = "default") -> Dict[str, Any]:
    """The ``TrainConfig`` field values of a variant's named regime.

    Args:
        variant: a ``--variant`` name.
        preset: ``default`` (the best setting measured on validation) or ``paper``
            (the paper's own setting).

    Returns:
        Field name -> value (``model`` is a ``ModelConfig``); fields not named keep the
        ``TrainConfig`` defaults.
    """
    get_variant(variant)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    if preset == "paper":
        return dict(_PAPER)
    return {**_DEFAULT, **_DEFAULT_BY_VARIANT.get(variant, {})}


def make_train_config(
    data: str,
    output: str,
    variant: str = "dnc",
    preset: str = "default",
    model_overrides: Optional[Dict[str, Any]] = None,
    **overrides: Any,
) -> TrainConfig:
    """``TrainConfig`` of ``variant`` under ``preset``, with explicit overrides on top.

    This is what ``dnc train``, the pipeline's Trainer and the benchmarks build their
    configs with, so that "no flags" means the same regime everywhere.

    Args:
        data, output: as in ``TrainConfig``.
        variant: the ``--variant`` name.
        preset: see :func:`regime`.
        model_overrides: ``ModelConfig`` fields to change (``embedding_dim=64``, ...).
        **overrides: other ``TrainConfig`` fields; ``None`` values are ignored
            (= not given).
    """
    values = regime(variant, preset)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    model = values.get("model", ModelConfig())
    given = {**overrides, **(model_overrides or {})}
    sized = {k: v for k, v in sized_defaults(variant, preset, data).items() if given.get(k) is None}
    if sized:
        log.info("%s: defaults sized by %s: %s (flags override)", variant, data, sized)
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        model = dataclasses.replace(model, **{k: v for k, v in sized.items() if k in model_fields})
        values.update({k: v for k, v in sized.items() if k not in model_fields})
    if model_overrides:
        model = dataclasses.replace(
            model, **{k: v for k, v in model_overrides.items() if v is not None}
        )
    values["model"] = model
    return TrainConfig(data=data, output=output, variant=variant, **values)
