"""The TFRS retrieval model: towers in, loss out (``compute_loss`` only).

The towers (``trainer.towers``), the negative sampler (run in tf.data, see
``trainer.data``), and the losses (``trainer.losses``) are separate pieces; this
class only wires them for one variant (``trainer.config.VARIANTS``).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer import data, losses, towers
from trainer.config import INTENT_ENCODERS, SOFTMAX_SCOPES, ModelConfig, Variant
from trainer.intent import PooledHistoryEncoder, cluster_mass, cluster_order
from trainer.multi_interest import MultiInterestEncoder
from trainer.shared_negatives import SharedNegativeSampler, in_cluster_loss

# Uniform negatives shared by every position of a batch in the global head of the
# ``implied`` intent (one [S, d] x [d, 1024] matmul a step).
IMPLIED_NEGATIVES = 1024


def user_vector_per_task(
    user_embedding: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], history: tf.Tensor, rows: int
) -> tf.Tensor:
    """[B, rows, d]: ``user_embedding(history, task)`` for tasks 0..rows-1, as one batch of
    ``B * rows`` repeated histories (one tower pass per task)."""
    b = tf.shape(history)[0]
    tasks = tf.tile(tf.range(rows, dtype=tf.int32), [b])
    users = user_embedding(tf.repeat(history, rows, axis=0), tasks)
    return tf.reshape(users, [b, rows, -1])


class RetrievalModel(tfrs.Model):
    """Two-tower model of one variant.

    Args:
        variant: which method (tower, conditioning, sampler).
        model_config: architecture.
        num_items: N (model ids 1..N).
        num_clusters: K (tasks 0..K-1; K = no task).
        num_users: size of the user vocabulary (MF baseline).
        loss: ``bce``, ``sampled-softmax`` or ``softmax`` (full softmax; over the
            target's cluster only for in-cluster variants).
        intent_weight: weight of the intent cross-entropy.
        softmax_scope: ``auto`` (the target's cluster for in-cluster variants, else all
            items), ``cluster`` or ``all``: what the full ``softmax`` normalises over.
        intent_encoder: ``pooled`` (cheap, default), ``pooled-clusters`` (also reads the
            history's clusters), ``tower`` (Transformer, NO_TASK prompt) or ``implied``
            (the cluster masses of a global softmax head on the NO_TASK tower output,
            trained by a sampled softmax over all items: ``implied_intent``).
        intent_recency: initial recency slope of the pooled intent encoders' position
            logits (``PooledHistoryEncoder``).
        shared_negatives: > 0: the sampled softmax scores negatives shared by the batch,
            drawn in the step (``trainer.shared_negatives``: this many per cluster,
            stratified for in-cluster variants, ``K`` times this many uniform for global
            ones), which also train the ``implied`` intent's global head; 0: the
            per-position negatives of the batch (``data.NEGATIVES``).
        implied_negatives: uniform negatives shared by the batch in the ``implied``
            intent's global head (without ``shared_negatives``); at least ``num_items``:
            the head's exact softmax over every item instead.
        item_cluster: [N + 1] cluster of each model item id (``-1`` for PAD_ID); needed by
            the ``softmax`` loss of in-cluster variants, by ``pooled-clusters`` and ``implied``.

    ``compute_loss`` takes per-prefix batches (``data.training_dataset``: ``TARGET`` [B])
    or all-position batches (``sequence_data.sequence_dataset``: ``TARGET`` [B, W] and ``MASK``).
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
        item_cluster: Optional[np.ndarray] = None,
        softmax_scope: str = "auto",
        intent_recency: float = 0.0,
        shared_negatives: int = 0,
        implied_negatives: int = IMPLIED_NEGATIVES,
    ) -> None:
        super().__init__()
        if implied_negatives < 1:
            raise ValueError(f"implied_negatives must be >= 1, got {implied_negatives}")
        self.implied_negatives = int(implied_negatives)
        if intent_encoder not in INTENT_ENCODERS:
            raise ValueError(f"unknown intent_encoder {intent_encoder!r}; {INTENT_ENCODERS}")
        self.variant = variant
        self.model_config = model_config
        self.num_items = num_items
        self.num_clusters = num_clusters
        self.intent_weight = intent_weight
        self.intent_encoder_kind = intent_encoder
        dim = model_config.embedding_dim
        if model_config.cluster_embeddings:
            self.item_embedding = towers.ItemEmbedding(
                num_items, dim, item_cluster=item_cluster, num_clusters=num_clusters
            )
        else:
            self.item_embedding = towers.ItemEmbedding(num_items, dim)
        self.item_tower = towers.build_item_tower(model_config, num_items, self.item_embedding)
        if variant.user_tower == "mf":
            self.user_tower = towers.MFUserTower(num_users, dim)
        elif variant.multi_interest:
            if intent_encoder in ("tower", "implied"):
                raise ValueError(
                    f"the {intent_encoder} intent reads a single-vector tower; "
                    f"{variant.name} has {model_config.num_interests} interests (use pooled)"
                )
            self.user_tower = MultiInterestEncoder(
                variant.user_tower,
                num_items,
                dim,
                model_config.max_len,
                model_config.num_interests,
                model_config.routing_iterations,
                model_config.interest_readout,
                model_config.interest_power,
                item_embedding=self.item_embedding,
                name="user_tower",
            )
        else:
            self.user_tower = towers.build_user_tower(
                model_config, variant.conditioning, num_items, num_clusters, self.item_embedding
            )
        self.intent_pooling = None
        if intent_encoder != "implied":
            self.intent_pooling = PooledHistoryEncoder(model_config.max_len, dim, intent_recency)
        self.intent_head = towers.IntentHead(num_clusters)
        if loss == "bce":
            self.retrieval_loss = losses.SampledBinaryCrossEntropy()
        elif loss == "sampled-softmax":
            self.retrieval_loss = losses.SampledSoftmaxLoss()
        elif loss == "softmax":
            self.retrieval_loss = losses.FullSoftmaxLoss()
        else:
            raise ValueError(f"unknown loss {loss!r}")
        if softmax_scope not in SOFTMAX_SCOPES:
            raise ValueError(f"unknown softmax_scope {softmax_scope!r}; {SOFTMAX_SCOPES}")
        if softmax_scope == "auto":
            softmax_scope = "cluster" if variant.sampler == "in_cluster" else "all"
        self.in_cluster_softmax = loss == "softmax" and softmax_scope == "cluster"
        self._item_cluster = None
        if item_cluster is not None:
            item_cluster = np.asarray(item_cluster, np.int32)
            if item_cluster.shape != (num_items + 1,):
                raise ValueError(
                    f"item_cluster must have {num_items + 1} entries, got {item_cluster.shape}"
                )
            self._item_cluster = tf.constant(item_cluster)
        if self.in_cluster_softmax:
            if self._item_cluster is None:
                raise ValueError("the in-cluster softmax loss needs item_cluster")
            self.cluster_softmax = losses.InClusterSoftmaxLoss(item_cluster, num_clusters)
        self.cluster_embedding = None
        if intent_encoder in ("pooled-clusters", "implied") and self._item_cluster is None:
            raise ValueError(f"the {intent_encoder} intent encoder needs item_cluster")
        if intent_encoder == "implied" and variant.user_tower == "mf":
            raise ValueError("the implied intent needs a sequence tower, not mf")
        if intent_encoder == "implied":
            order, segments = cluster_order(item_cluster, num_clusters)
            self._intent_items = tf.constant(order)
            self._intent_segments = tf.constant(segments)
        if intent_encoder == "pooled-clusters":
            self.cluster_embedding = tf.keras.layers.Embedding(num_clusters, dim)
        self.global_loss = losses.SampledSoftmaxLoss()
        self.full_global_loss = losses.FullSoftmaxLoss()
        self.intent_loss = losses.IntentLoss()
        self.shared_sampler = None
        if shared_negatives:
            self.shared_sampler = self._shared_sampler(loss, item_cluster, int(shared_negatives))
            self._per_sample_loss = self._unreduced_loss(loss)

    @staticmethod
    def _unreduced_loss(loss: str):
        """``(pos, neg, valid, log_q) -> [S]`` per-sample losses of ``loss`` (BCE: no log-Q)."""
        if loss == "bce":
            bce = losses.SampledBinaryCrossEntropy(reduction="none")
            return lambda pos, neg, valid, log_q: bce(pos, neg, valid)
        softmax = losses.SampledSoftmaxLoss(reduction="none")
        return lambda pos, neg, valid, log_q: softmax(pos, neg, valid, log_q)

    def _shared_sampler(self, loss, item_cluster, per_cluster: int) -> SharedNegativeSampler:
        """The batch-shared sampler of ``shared_negatives``, or ValueError."""
        if loss not in ("sampled-softmax", "bce"):
            raise ValueError(
                f"shared negatives need a sampled loss (bce, sampled-softmax), not {loss!r}"
            )
        if item_cluster is None:
            raise ValueError("shared negatives need item_cluster")
        return SharedNegativeSampler(
            item_cluster, self.num_clusters, self.variant.sampler, per_cluster
        )

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
        if self.variant.multi_interest:
            raise ValueError(
                f"{self.variant.name} gives each user several vectors: use interest_embeddings"
            )
        if self.variant.user_tower == "mf":
            if user is None:
                raise ValueError("the mf variant needs user indices")
            return self.user_tower(user)
        return self.user_tower({"history": history, "task": task}, training=training)

    @property
    def shares_tower_pass(self) -> bool:
        """True if ONE unprompted tower pass gives every cluster's user vector: towers
        without a prompt (the vector is the same for every task) and Hadamard prompts on
        the output (each cluster's vector is the pass gated by its prompt)."""
        if self.variant.multi_interest or self.variant.user_tower == "mf":
            return False
        return not self.conditioned or getattr(self.user_tower, "late_prompt", False)

    @property
    def intent_item_order(self) -> np.ndarray:
        """The ``implied`` intent's item ids [N] in the order it scores them (grouped by
        cluster, ``trainer.intent.cluster_order``): the columns of a stored ``E^T``."""
        return self._intent_items.numpy()

    def unprompted_embedding(self, history: tf.Tensor, training: bool = False) -> tf.Tensor:
        """The NO_TASK user vector [B, d] (``user_embedding`` with task K)."""
        return self._unprompted(history, training)

    def cluster_user_embeddings(
        self,
        history: tf.Tensor,
        with_plain: bool = False,
        training: bool = False,
        unprompted: Optional[tf.Tensor] = None,
    ) -> tf.Tensor:
        """Every cluster's user vector [B, K, d] (``with_plain``: [B, K + 1, d], the last
        row the NO_TASK one): row k equals ``user_embedding(history, k)``.

        When ``shares_tower_pass``, the tower runs once (or not at all, given its
        ``unprompted`` output [B, d]) instead of once per cluster.
        """
        rows = self.num_clusters + 1 if with_plain else self.num_clusters
        if self.shares_tower_pass:
            h = self._unprompted(history, training) if unprompted is None else unprompted
            h = tf.repeat(h[:, None, :], rows, axis=1)
            if not self.conditioned:
                return h
            tasks = tf.broadcast_to(tf.range(rows, dtype=tf.int32), tf.shape(h)[:2])
            return self.user_tower.gate_output(h, tasks)
        return user_vector_per_task(
            lambda h, t: self.user_embedding(h, t, training=training), history, rows
        )

    def interest_embeddings(self, history: tf.Tensor, training: bool = False) -> tf.Tensor:
        """The interests [B, I, d] of multi-interest variants (``mind``, ``comirec-sa``)."""
        if not self.variant.multi_interest:
            raise ValueError(f"{self.variant.name} is not a multi-interest variant")
        return self.user_tower(history, training=training)

    def _interest_user(self, history, target, mask=None, training=False) -> tf.Tensor:
        """The interest that scores each target: [B, d] (``target`` [B]) or, all-position
        (``target`` [B, L] with ``mask``), [B, L, d] zero where masked."""
        vectors = self.candidate_embeddings(target)
        if mask is None:
            return self.user_tower.read_out(self.user_tower(history, training=training), vectors)
        interests = self.user_tower.encode_sequence(history, training=training)  # [B, L, I, d]
        user = self.user_tower.read_out(interests, vectors)
        return user * tf.cast(tf.cast(mask, tf.bool), user.dtype)[..., None]

    def intent(
        self,
        history: tf.Tensor,
        training: bool = False,
        item_embeddings_t: Optional[tf.Tensor] = None,
        unprompted: Optional[tf.Tensor] = None,
    ) -> tf.Tensor:
        """p_uk [B, K]: which clusters the user wants next.

        ``item_embeddings_t``: the ``implied`` intent's item embeddings, transposed
        ``[d, N]`` in ``intent_item_order``, when the caller holds them fixed (a serving
        graph; see ``implied_intent``). ``unprompted``: the caller's ``unprompted_embedding`` of
        ``history``, which the ``tower`` and ``implied`` intents then read instead of
        running the tower again. Other intent encoders ignore both.
        """
        # Baselines keep an intent head only for the extra merge column: it must
        # not change what their towers and embeddings learn.
        isolate = tf.identity if self.variant.merged else tf.stop_gradient
        reads_tower = self.intent_encoder_kind == "implied" or (
            self.intent_encoder_kind == "tower" and self.variant.user_tower != "mf"
        )
        if reads_tower and unprompted is None:
            unprompted = self._unprompted(history, training)
        if self.intent_encoder_kind == "implied":
            return self.implied_intent(unprompted, item_embeddings_t)
        if reads_tower:
            rep = isolate(unprompted)
        else:
            rep = self.intent_pooling(history, self._intent_inputs(history, isolate))
        return self.intent_head(rep)

    def _no_task(self, history: tf.Tensor) -> tf.Tensor:
        """The NO_TASK prompt index (K) of every history row [B]."""
        return tf.fill(tf.shape(history)[:1], self.num_clusters)

    def _unprompted(self, history: tf.Tensor, training: bool) -> tf.Tensor:
        """The NO_TASK tower output [B, d] (the plain SASRec representation)."""
        task = self._no_task(history)
        return self.user_tower({"history": history, "task": task}, training=training)

    def _unprompted_sequence(self, history: tf.Tensor, training: bool) -> tf.Tensor:
        """The NO_TASK causal tower output at every position [B, L, d]."""
        return self.user_tower.encode_sequence(history, self._no_task(history), training=training)

    def implied_intent(
        self, unprompted: tf.Tensor, item_embeddings_t: Optional[tf.Tensor] = None
    ) -> tf.Tensor:
        """p(k | u) [B, K] = sum over cluster k's items of ``softmax_i(h . e_i)``, for
        unprompted outputs h [B, d] (the global head's softmax over all items).

        The items are scored in cluster order (``intent_item_order``, see
        ``trainer.intent.cluster_mass``). A serving graph passes their embeddings already
        transposed, ``item_embeddings_t`` [d, N] in that order: on CPU, ``h E^T`` with
        ``transpose_b`` is about 6x slower for one request than ``h`` times a stored
        ``E^T`` (11 vs 1.9 ms at 108K x 100; docs/scale.md).
        """
        if item_embeddings_t is None:
            candidates = self.candidate_embeddings(self._intent_items)
            logits = tf.matmul(unprompted, candidates, transpose_b=True)  # [B, N]
        else:
            logits = tf.matmul(unprompted, item_embeddings_t)
        return cluster_mass(logits, self._intent_segments, self.num_clusters)

    def global_head_loss(
        self,
        unprompted: tf.Tensor,
        target: tf.Tensor,
        negatives: Optional[tf.Tensor] = None,
        shared=None,
    ) -> tf.Tensor:
        """Sampled softmax of unprompted outputs [S, d] over all items: the target [S]
        against ``negatives`` [G] shared by the batch (default: ``implied_negatives``
        uniform draws; accidental hits masked; uniform draws need no log-Q correction;
        ``implied_negatives >= num_items``: the exact softmax over every item), or against
        the step's ``shared`` draw ``(SharedDraw, vectors [G, d])``, log-Q corrected by its
        stratified draw probabilities."""
        positive = tf.reduce_sum(unprompted * self.candidate_embeddings(target), axis=-1)
        if shared is not None:
            draw, vectors = shared
            negative = tf.matmul(unprompted, vectors, transpose_b=True)
            valid = self.shared_sampler.global_valid(draw, target)
            return self.global_loss(positive, negative, valid=valid, log_q=draw.global_log_q)
        if negatives is None and self.implied_negatives >= self.num_items:
            # As many negatives as items: the exact softmax over the whole catalogue.
            candidates = self.candidate_embeddings(tf.range(self.num_items + 1))
            logits = tf.matmul(unprompted, candidates, transpose_b=True)  # [S, N + 1]
            allowed = tf.range(self.num_items + 1)[None, :] > 0
            return self.full_global_loss(logits, target, allowed)
        if negatives is None:
            count = self.implied_negatives
            negatives = tf.random.uniform([count], 1, self.num_items + 1, dtype=tf.int32)
        negative = tf.matmul(unprompted, self.candidate_embeddings(negatives), transpose_b=True)
        valid = tf.not_equal(negatives[None, :], tf.cast(target, tf.int32)[:, None])
        return self.global_loss(positive, negative, valid=valid)

    def _shared_draw(self):
        """This step's ``(SharedDraw, vectors [G, d])``, or None (per-position negatives)."""
        if self.shared_sampler is None:
            return None
        draw = self.shared_sampler.sample()
        return draw, self.candidate_embeddings(draw.ids)

    def _intent_inputs(self, history: tf.Tensor, isolate) -> tf.Tensor:
        """What the pooled intent encoders read at each history position [..., d]."""
        embeddings = isolate(self.item_embedding(history))
        if self.cluster_embedding is not None:
            # PAD_ID's cluster is -1; pooling masks padding, any row will do.
            clusters = tf.maximum(tf.gather(self._item_cluster, history), 0)
            embeddings += self.cluster_embedding(clusters)
        return embeddings

    def candidate_embeddings(self, item_ids: tf.Tensor) -> tf.Tensor:
        """e_i for model item ids of any shape."""
        return self.item_tower(item_ids)

    def sequence_user_embeddings(
        self,
        history: tf.Tensor,
        target_cluster: tf.Tensor,
        mask: tf.Tensor,
        user: Optional[tf.Tensor] = None,
        training: bool = False,
    ) -> tf.Tensor:
        """All-position user embeddings [B, L, d] for histories [B, L].

        Output ``j`` predicts the item after position ``j`` and equals
        ``user_embedding`` of the history cut after ``j`` with that target's task:
        NO_TASK for unconditioned variants (one causal pass), else the target's
        cluster ``target_cluster[b, j]``. For prompt variants the causal tower runs
        once per (row, cluster) pair present among the row's unmasked targets, all
        pairs in one batched call, and each position keeps the output of its own
        target's prompt. Masked positions are zero.
        """
        if self.variant.user_tower == "mf":
            if user is None:
                raise ValueError("the mf variant needs user indices")
            rep = self.user_tower(user)[:, None, :]
            return rep * tf.cast(mask, rep.dtype)[..., None]
        valid = tf.cast(mask, tf.bool)
        if not self.conditioned:
            out = self._unprompted_sequence(history, training)
            return out * tf.cast(valid, out.dtype)[..., None]
        target_cluster = tf.cast(target_cluster, tf.int32)
        if getattr(self.user_tower, "late_prompt", False):
            return self._gated_pass(history, target_cluster, mask, training)[0]
        onehot = tf.equal(
            target_cluster[:, :, None], tf.range(self.num_clusters, dtype=tf.int32)[None, None]
        )  # [B, L, K]
        present = tf.reduce_any(onehot & valid[..., None], axis=1)  # [B, K]
        pairs = tf.cast(tf.where(present), tf.int32)  # [P, 2] (row, cluster)
        rows, tasks = pairs[:, 0], pairs[:, 1]
        out = self.user_tower.encode_sequence(
            tf.gather(history, rows), tasks, training=training
        )  # [P, L, d]
        keep = tf.equal(tf.gather(target_cluster, rows), tasks[:, None]) & tf.gather(valid, rows)
        out = out * tf.cast(keep, out.dtype)[..., None]
        shape = tf.concat([tf.shape(history), tf.shape(out)[2:]], 0)
        return tf.scatter_nd(rows[:, None], out, shape)

    def sequence_intent(self, history: tf.Tensor, training: bool = False) -> tf.Tensor:
        """All-position intent p [B, L, K]: position ``j`` equals ``intent`` of the
        history cut after ``j`` (causal pooling, or the NO_TASK causal tower)."""
        isolate = tf.identity if self.variant.merged else tf.stop_gradient
        if self.intent_encoder_kind == "implied":
            h = self._unprompted_sequence(history, training)
            p = self.implied_intent(tf.reshape(h, [-1, h.shape[-1]]))
            return tf.reshape(p, tf.concat([tf.shape(h)[:2], [self.num_clusters]], 0))
        if self.intent_encoder_kind == "tower" and self.variant.user_tower != "mf":
            rep = isolate(self._unprompted_sequence(history, training))
        else:
            rep = self.intent_pooling.call_all_positions(
                history, self._intent_inputs(history, isolate)
            )
        return self.intent_head(rep)

    def _retrieval_loss(
        self,
        user: tf.Tensor,
        target: tf.Tensor,
        target_cluster: tf.Tensor,
        negatives: Optional[tf.Tensor],
        valid: Optional[tf.Tensor],
        log_q: Optional[tf.Tensor],
        shared=None,
    ) -> tf.Tensor:
        """Mean retrieval loss of samples: user [S, d], target/target_cluster [S],
        negatives/valid/log_q [S, N] (unused by ``softmax`` and with a ``shared`` draw)."""
        if isinstance(self.retrieval_loss, losses.FullSoftmaxLoss):
            candidates = self.candidate_embeddings(tf.range(self.num_items + 1))
            if self.in_cluster_softmax:
                positive = tf.reduce_sum(user * tf.gather(candidates, target), axis=-1)
                return self.cluster_softmax(user, positive, target_cluster, candidates)
            logits = tf.matmul(user, candidates, transpose_b=True)  # [S, N + 1]
            allowed = tf.range(self.num_items + 1)[None, :] > 0
            return self.retrieval_loss(logits, target, allowed)
        positive = self.candidate_embeddings(target)
        positive_logits = tf.reduce_sum(user * positive, axis=-1)
        if shared is not None:
            draw, vectors = shared
            if self.shared_sampler.mode == "in_cluster":
                return in_cluster_loss(
                    self.shared_sampler, self._per_sample_loss, user, positive_logits,
                    target, target_cluster, draw, vectors,
                )  # fmt: skip
            negative_logits = tf.matmul(user, vectors, transpose_b=True)  # [S, G]
            valid = self.shared_sampler.valid(draw, target, target_cluster)
            per_sample = self._per_sample_loss(positive_logits, negative_logits, valid, draw.log_q)
            return tf.reduce_mean(per_sample)
        negative_vectors = self.candidate_embeddings(negatives)
        negative_logits = tf.einsum("bd,bnd->bn", user, negative_vectors)
        if isinstance(self.retrieval_loss, losses.SampledSoftmaxLoss):
            return self.retrieval_loss(positive_logits, negative_logits, valid=valid, log_q=log_q)
        return self.retrieval_loss(positive_logits, negative_logits, valid=valid)

    def compute_loss(self, inputs: Dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        if data.MASK in inputs:
            return self._all_positions_loss(inputs, training)
        history = inputs[data.HISTORY]
        target = inputs[data.TARGET]
        target_cluster = inputs[data.TARGET_CLUSTER]
        if self.conditioned:
            task = target_cluster
        else:
            task = tf.fill(tf.shape(target), self.num_clusters)
        if self.variant.multi_interest:
            user = self._interest_user(history, target, training=training)
        else:
            user = self.user_embedding(history, task, inputs.get(data.USER), training=training)
        draw = self._shared_draw()
        loss = self._retrieval_loss(
            user,
            target,
            target_cluster,
            inputs.get(data.NEGATIVES),
            inputs.get(data.NEGATIVES_VALID),
            inputs.get(data.NEGATIVES_LOG_Q),
            draw,
        )
        if self.intent_weight > 0 and self.intent_encoder_kind == "implied":
            # Plain variants' own global loss already trains this head.
            if self.variant.merged:
                h = user if not self.conditioned else self._unprompted(history, training)
                loss += self.intent_weight * self.global_head_loss(h, target, shared=draw)
        elif self.intent_weight > 0:
            intent = self.intent(history, training=training)
            loss += self.intent_weight * self.intent_loss(intent, target_cluster)
        return loss

    def _all_positions_loss(self, inputs: Dict[str, tf.Tensor], training: bool) -> tf.Tensor:
        """Mean over the unmasked positions of all-position batches ([B, L] targets)."""
        history = inputs[data.HISTORY]
        target = inputs[data.TARGET]
        target_cluster = inputs[data.TARGET_CLUSTER]
        mask = inputs[data.MASK]
        shared = self._shared_tower_pass(history, target_cluster, mask, training)
        if self.variant.multi_interest:
            user = self._interest_user(history, target, mask, training)
        elif shared is None:
            user = self.sequence_user_embeddings(
                history, target_cluster, mask, inputs.get(data.USER), training=training
            )
        else:
            user = shared[0]
        # Only the real (history, target) positions enter the loss.
        where = tf.where(tf.cast(mask, tf.bool))  # [S, 2]

        def pick(x):
            return None if x is None else tf.gather_nd(x, where)

        draw = self._shared_draw()
        loss = self._retrieval_loss(
            pick(user),
            pick(target),
            pick(target_cluster),
            pick(inputs.get(data.NEGATIVES)),
            pick(inputs.get(data.NEGATIVES_VALID)),
            pick(inputs.get(data.NEGATIVES_LOG_Q)),
            draw,
        )
        if self.intent_weight > 0 and self.intent_encoder_kind == "implied":
            if self.variant.merged:
                h = self._unprompted_sequence(history, training) if shared is None else shared[1]
                head = self.global_head_loss(pick(h), pick(target), shared=draw)
                loss += self.intent_weight * head
        elif self.intent_weight > 0:
            if shared is None:
                intent = self.sequence_intent(history, training=training)
            else:
                intent = self.intent_head(shared[1])
            loss += self.intent_weight * self.intent_loss(pick(intent), pick(target_cluster))
        return loss

    def _shared_tower_pass(self, history, target_cluster, mask, training):
        """(user [B, L, d], unconditioned output [B, L, d]) from ONE causal pass, for output
        prompts with the ``tower`` or ``implied`` intent (the intent reads the pass the
        prompts gate); None otherwise."""
        late = getattr(self.user_tower, "late_prompt", False)
        reads_tower = self.intent_encoder_kind in ("tower", "implied")
        if not (late and reads_tower and self.variant.merged):
            return None
        return self._gated_pass(history, target_cluster, mask, training)

    def _gated_pass(self, history, target_cluster, mask, training):
        """Output prompts: ONE causal pass h [B, L, d]; returns (h gated at each position by
        its target's prompt, zero where masked; h)."""
        h = self._unprompted_sequence(history, training)
        valid = tf.cast(tf.cast(mask, tf.bool), h.dtype)[..., None]
        clusters = tf.maximum(tf.cast(target_cluster, tf.int32), 0)
        return self.user_tower.gate_output(h, clusters) * valid, h
