"""The TFRS retrieval model: towers in, loss out (``compute_loss`` only).

The towers (``trainer.towers``), the negative sampler (run in tf.data, see
``trainer.data``), and the losses (``trainer.losses``) are separate pieces; this
class only wires them for one variant (``trainer.config.VARIANTS``).
"""

from __future__ import annotations

from typing import Dict, Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer import data, losses, towers
from trainer.config import INTENT_ENCODERS, ModelConfig, Variant
from trainer.intent import PooledHistoryEncoder


class RetrievalModel(tfrs.Model):
    """Two-tower model of one variant.

    Args:
        variant: which method (tower, conditioning, sampler).
        model_config: architecture.
        num_items: N (model ids 1..N).
        num_clusters: K (tasks 0..K-1; K = no task).
        num_users: size of the user vocabulary (MF baseline).
        loss: ``bce`` or ``sampled-softmax``.
        intent_weight: weight of the intent cross-entropy.
        intent_encoder: ``pooled`` (cheap, default) or ``tower`` (Transformer, NO_TASK prompt).
    """

    def __init__(
        self,
        variant: Variant,
        model_config: ModelConfig,
        num_items: int,
        num_clusters: int,
        num_users: int,
        loss: str = "bce",
        intent_weight: float = 0.1,
        intent_encoder: str = "pooled",
    ) -> None:
        super().__init__()
        if intent_encoder not in INTENT_ENCODERS:
            raise ValueError(f"unknown intent_encoder {intent_encoder!r}; {INTENT_ENCODERS}")
        self.variant = variant
        self.model_config = model_config
        self.num_items = num_items
        self.num_clusters = num_clusters
        self.intent_weight = intent_weight
        self.intent_encoder_kind = intent_encoder
        dim = model_config.embedding_dim
        self.item_embedding = towers.ItemEmbedding(num_items, dim)
        self.item_tower = towers.build_item_tower(model_config, num_items, self.item_embedding)
        if variant.user_tower == "mf":
            self.user_tower = towers.MFUserTower(num_users, dim)
        else:
            self.user_tower = towers.build_user_tower(
                model_config, variant.conditioning, num_items, num_clusters, self.item_embedding
            )
        self.intent_pooling = PooledHistoryEncoder(model_config.max_len, dim)
        self.intent_head = towers.IntentHead(num_clusters)
        if loss == "bce":
            self.retrieval_loss = losses.SampledBinaryCrossEntropy()
        elif loss == "sampled-softmax":
            self.retrieval_loss = losses.SampledSoftmaxLoss()
        else:
            raise ValueError(f"unknown loss {loss!r}")
        self.intent_loss = losses.IntentLoss()

    @property
    def conditioned(self) -> bool:
        """True if the user tower takes a task prompt."""
        return self.variant.conditioning != "none"

    def user_embedding(
        self,
        history: tf.Tensor,
        task: tf.Tensor,
        user: Optional[tf.Tensor] = None,
        training: bool = False,
    ) -> tf.Tensor:
        """e_uk [B, d] for histories [B, L] and tasks [B] (K = no task)."""
        if self.variant.user_tower == "mf":
            if user is None:
                raise ValueError("the mf variant needs user indices")
            return self.user_tower(user)
        return self.user_tower({"history": history, "task": task}, training=training)

    def intent(self, history: tf.Tensor, training: bool = False) -> tf.Tensor:
        """p_uk [B, K]: which clusters the user wants next."""
        # Baselines keep an intent head only for the extra merge column: it must
        # not change what their towers and embeddings learn.
        isolate = tf.identity if self.variant.merged else tf.stop_gradient
        if self.intent_encoder_kind == "tower" and self.variant.user_tower != "mf":
            task = tf.fill(tf.shape(history)[:1], self.num_clusters)
            rep = isolate(self.user_tower({"history": history, "task": task}, training=training))
        else:
            embeddings = isolate(self.item_embedding(history))
            rep = self.intent_pooling(history, embeddings)
        return self.intent_head(rep)

    def candidate_embeddings(self, item_ids: tf.Tensor) -> tf.Tensor:
        """e_i for model item ids of any shape."""
        return self.item_tower(item_ids)

    def compute_loss(self, inputs: Dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        history = inputs[data.HISTORY]
        target = inputs[data.TARGET]
        target_cluster = inputs[data.TARGET_CLUSTER]
        if self.conditioned:
            task = target_cluster
        else:
            task = tf.fill(tf.shape(target), self.num_clusters)
        user = self.user_embedding(history, task, inputs.get(data.USER), training=training)
        positive = self.candidate_embeddings(target)
        negatives = self.candidate_embeddings(inputs[data.NEGATIVES])
        positive_logits = tf.reduce_sum(user * positive, axis=-1)
        negative_logits = tf.einsum("bd,bnd->bn", user, negatives)
        valid = inputs[data.NEGATIVES_VALID]
        if isinstance(self.retrieval_loss, losses.SampledSoftmaxLoss):
            loss = self.retrieval_loss(
                positive_logits, negative_logits, valid=valid, log_q=inputs[data.NEGATIVES_LOG_Q]
            )
        else:
            loss = self.retrieval_loss(positive_logits, negative_logits, valid=valid)
        if self.intent_weight > 0:
            intent = self.intent(history, training=training)
            loss += self.intent_weight * self.intent_loss(intent, target_cluster)
        return loss
