"""Towers of the two-tower model: item embedding/tower, SASRec user tower, intent head, MF.

Conventions (``trainer.config``): item ids are ``item_index + 1`` with ``PAD_ID = 0``; histories
are ``[B, L]`` right-aligned (left padding), ``L <= max_len``; tasks are clusters ``0..K-1`` and
``K`` (NO_TASK) is the unconditioned representation.

``SASRecEncoder`` input path, per history position ``i`` holding item ``s_i``::

    x_i = (E[s_i] * t_task) * sqrt(d) + P[pos_i]      (hadamard; without "* t_task" otherwise)

``pos_i`` counts valid items from the OLDEST one in the window (0, 1, ...), so adding left
padding changes nothing, and the output at position ``i`` equals the output for the history
truncated after ``i``. Padded positions are zero inputs, masked as attention keys, and their
outputs are zeroed. Conditionings (``conditioning``):

* ``none``: the task is ignored.
* ``hadamard`` (Eq. 5): the prompt multiplies the item embedding BEFORE the position
  embedding is added (the prompt gates item content, not order). Prompts are a trainable
  ``[K, d]`` table initialised to ones plus a constant ones row for NO_TASK, so NO_TASK is
  exactly plain SASRec. With ``prompt_position="output"`` the same prompt gates the
  Transformer's (final-LayerNorm) output instead: one causal pass then serves every
  cluster, which makes all-position training as cheap as plain SASRec.
* ``concat`` (Eq. 4): a trainable prompt token ``t_k`` ([K, d], no sqrt(d) scaling, no position
  embedding) is prepended as an extra first token (the Transformer sees ``L + 1`` tokens). For
  NO_TASK the token is masked like padding, so NO_TASK is exactly plain SASRec; this keeps
  mixed-task batches dense.
* ``mmoe``: ``num_experts`` block stacks mixed by per-task gates (``trainer.mmoe.MMoE``); task
  K has its own gate.

Task ids outside ``0..K`` cannot be checked inside a graph: ``tf.gather`` fails on CPU and
returns zeros on GPU. Callers must pass valid ids.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf  # the trainer package imports dnc_env first

from trainer.config import CONDITIONINGS, PAD_ID, PROMPT_POSITIONS, ModelConfig
from trainer.mmoe import BlockStack, MMoE, causal_attention_mask

_serializable = tf.keras.utils.register_keras_serializable(package="dnc")
# The calls have no tensor-dependent Python control flow; skipping AutoGraph conversion saves
# seconds of tracing per model build (Keras otherwise converts every nested layer call).
_no_autograph = tf.autograph.experimental.do_not_convert

Inputs = Union[tf.Tensor, Sequence[tf.Tensor], Dict[str, tf.Tensor]]


@_serializable
class ItemEmbedding(tf.keras.layers.Layer):
    """Item-id embedding table of ``num_items + 1`` rows; row ``PAD_ID`` (0) always looks up zero.

    With ``item_cluster`` the vector of item ``i`` is ``E[i] + C[cluster(i)]``: a
    ``[num_clusters, d]`` table ``C`` (zero-initialised, so training starts from the plain
    table) adds a component shared by the items of a cluster.

    Args:
        num_items: number of real items (ids ``1..num_items``).
        dim: embedding width d.
        embeddings_initializer: Keras initializer of the table.
        item_cluster: optional ``[num_items + 1]`` cluster of each id (``-1`` for PAD_ID).
        num_clusters: K, with ``item_cluster``.
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        embeddings_initializer: Any = "glorot_uniform",
        item_cluster: Optional[Any] = None,
        num_clusters: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_items < 1 or dim < 1:
            raise ValueError(f"num_items ({num_items}) and dim ({dim}) must be >= 1")
        self.num_items, self.dim = num_items, dim
        self.embeddings_initializer = tf.keras.initializers.get(embeddings_initializer)
        self._item_cluster = None
        with tf.name_scope(self.name):  # weights made in __init__ get no scope otherwise
            self.embeddings = self.add_weight(
                name="embeddings",
                shape=[num_items + 1, dim],
                initializer=self.embeddings_initializer,
            )
            if item_cluster is not None:
                item_cluster = np.asarray(item_cluster, np.int32)
                if item_cluster.shape != (num_items + 1,) or item_cluster.max() >= num_clusters:
                    raise ValueError(
                        f"item_cluster must hold {num_items + 1} cluster ids below "
                        f"num_clusters={num_clusters}, got shape {item_cluster.shape} and "
                        f"max {item_cluster.max()}"
                    )
                self._item_cluster = tf.constant(item_cluster)
                self.cluster_embeddings = self.add_weight(
                    name="cluster_embeddings", shape=[num_clusters, dim], initializer="zeros"
                )

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        """Returns ``[..., d]`` embeddings of int ``ids``; zero where ``ids == PAD_ID``."""
        ids = tf.cast(ids, tf.int32)
        vectors = tf.gather(self.embeddings, ids)
        if self._item_cluster is not None:
            clusters = tf.maximum(tf.gather(self._item_cluster, ids), 0)
            vectors += tf.gather(self.cluster_embeddings, clusters)
        return vectors * tf.cast(tf.not_equal(ids, PAD_ID), vectors.dtype)[..., None]

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            num_items=self.num_items,
            dim=self.dim,
            embeddings_initializer=tf.keras.initializers.serialize(self.embeddings_initializer),
        )
        if self._item_cluster is not None:
            config.update(
                item_cluster=self._item_cluster.numpy().tolist(),
                num_clusters=int(self.cluster_embeddings.shape[0]),
            )
        return config


@_serializable
class ItemTower(tf.keras.layers.Layer):
    """Candidate tower: item id -> item vector (an item-ID embedding).

    Args:
        num_items: number of real items.
        dim: embedding width d.
        item_embedding: the table to share (SASRec shares the sequence input table with the
            candidates); used when ``share_embeddings`` is True. If None, a table is built and
            exposed as ``item_embedding`` for the user tower to share.
        share_embeddings: False builds a separate table even when ``item_embedding`` is given.
            ``from_config`` always builds its own table (sharing is not serialisable; pass the
            table again when rebuilding, weights come from checkpoints).
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        item_embedding: Optional[ItemEmbedding] = None,
        share_embeddings: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.num_items, self.dim, self.share_embeddings = num_items, dim, share_embeddings
        if share_embeddings and item_embedding is not None:
            check_table(item_embedding, num_items, dim)
            self.item_embedding = item_embedding
        else:
            self.item_embedding = ItemEmbedding(num_items, dim, name="item_embedding")

    def call(self, item_ids: tf.Tensor) -> tf.Tensor:
        """Returns ``[..., d]`` candidate vectors of item ids (zero for PAD_ID)."""
        return self.item_embedding(item_ids)

    def candidates(self) -> tf.Tensor:
        """Returns ``[num_items, d]``: row ``j`` is the vector of item id ``j + 1``."""
        return self.item_embedding(tf.range(1, self.num_items + 1))

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            num_items=self.num_items, dim=self.dim, share_embeddings=self.share_embeddings
        )
        return config


@_serializable
class SASRecEncoder(tf.keras.layers.Layer):
    """SASRec user tower with optional task conditioning (see the module docstring).

    Call with ``history`` [B, L] int, or ``(history, task)`` / ``{"history", "task"}`` with
    ``task`` [B] int in ``0..K`` (omitted: NO_TASK). Returns the final-LayerNorm output at the
    last position, [B, d] (zero for an empty history).

    Args:
        num_items: number of real items (must match ``item_embedding`` when both are given).
        dim: d.
        max_len: longest history L accepted.
        num_blocks: self-attention blocks (per expert for mmoe).
        num_heads: attention heads.
        dropout: dropout on inputs, attention probabilities and feed-forward outputs.
        conditioning: one of ``CONDITIONINGS``.
        num_tasks: K (0 allowed only for ``none``).
        num_experts: experts of ``mmoe``.
        prompt_position: ``input`` or ``output`` (``hadamard`` only; see the module docstring).
        prompt_rank: rank of the per-cluster low-rank adapter added to the output prompt
            (``gate_output``); 0: none. Needs ``hadamard`` with ``prompt_position="output"``.
        item_embedding: shared ``ItemEmbedding`` (not serialised by ``get_config``;
            ``from_config`` builds its own table of ``num_items`` rows).

    Raises:
        ValueError: unknown conditioning, bad sizes, or a mismatching ``item_embedding``.
    """

    def __init__(
        self,
        num_items: Optional[int] = None,
        dim: int = 50,
        max_len: int = 200,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        conditioning: str = "none",
        num_tasks: int = 0,
        num_experts: int = 4,
        item_embedding: Optional[ItemEmbedding] = None,
        prompt_position: str = "input",
        prompt_rank: int = 0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if prompt_rank < 0:
            raise ValueError(f"prompt_rank must be >= 0, got {prompt_rank}")
        if prompt_rank and not (conditioning == "hadamard" and prompt_position == "output"):
            raise ValueError(
                f"prompt_rank {prompt_rank} needs the output Hadamard prompt, got conditioning "
                f"{conditioning!r} with prompt_position {prompt_position!r}"
            )
        self.prompt_rank = prompt_rank
        if prompt_position not in PROMPT_POSITIONS:
            raise ValueError(
                f"unknown prompt_position {prompt_position!r}; expected one of {PROMPT_POSITIONS}"
            )
        self.prompt_position = prompt_position
        if conditioning not in CONDITIONINGS:
            raise ValueError(
                f"unknown conditioning {conditioning!r}; expected one of {CONDITIONINGS}"
            )
        if num_tasks < (0 if conditioning == "none" else 1):
            raise ValueError(f"conditioning {conditioning!r} needs num_tasks >= 1, got {num_tasks}")
        if max_len < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need max_len >= 1 and dropout in [0, 1), got {max_len}, {dropout}")
        if item_embedding is None:
            if num_items is None:
                raise ValueError("give num_items or item_embedding")
            item_embedding = ItemEmbedding(num_items, dim, name="item_embedding")
        check_table(item_embedding, num_items, dim)
        self.num_items, self.dim, self.max_len = item_embedding.num_items, dim, max_len
        self.num_blocks, self.num_heads, self.dropout = num_blocks, num_heads, dropout
        self.conditioning, self.num_tasks, self.num_experts = conditioning, num_tasks, num_experts
        self.item_embedding = item_embedding
        with tf.name_scope(self.name):
            self._add_own_weights()
        self.input_dropout = tf.keras.layers.Dropout(dropout)
        if conditioning == "mmoe":
            self.transformer = MMoE(
                dim, num_tasks, num_experts, num_blocks, num_heads, dropout, name="mmoe"
            )
        else:
            self.transformer = BlockStack(dim, num_blocks, num_heads, dropout, name="blocks")
        self.final_norm = tf.keras.layers.LayerNormalization(epsilon=1e-8)

    def _add_own_weights(self) -> None:
        self.position_embeddings = self.add_weight(
            name="position_embeddings", shape=[self.max_len, self.dim], initializer="glorot_uniform"
        )
        if self.conditioning == "hadamard":
            # Trainable rows for tasks 0..K-1; the NO_TASK row is a constant (see ``prompts``).
            self.task_prompts = self.add_weight(
                name="task_prompts", shape=[self.num_tasks, self.dim], initializer="ones"
            )
            if self.prompt_rank:
                # LoRA-style: A random, B zero, so training starts from the Hadamard prompt.
                self.adapter_down = self.add_weight(
                    name="adapter_down",
                    shape=[self.num_tasks, self.dim, self.prompt_rank],
                    initializer=tf.keras.initializers.RandomNormal(stddev=self.dim**-0.5),
                )
                self.adapter_up = self.add_weight(
                    name="adapter_up",
                    shape=[self.num_tasks, self.prompt_rank, self.dim],
                    initializer="zeros",
                )
        elif self.conditioning == "concat":
            self.prompt_tokens = self.add_weight(
                name="prompt_tokens", shape=[self.num_tasks, self.dim], initializer="glorot_uniform"
            )

    @property
    def prompts(self) -> tf.Tensor:
        """Hadamard prompts ``[K + 1, d]``; the last row (NO_TASK) is the constant ones."""
        if self.conditioning != "hadamard":
            raise ValueError(f"conditioning {self.conditioning!r} has no Hadamard prompts")
        return tf.concat([self.task_prompts, tf.ones([1, self.dim], self.task_prompts.dtype)], 0)

    @property
    def late_prompt(self) -> bool:
        """True if the Hadamard prompt gates the output (one pass serves every task)."""
        return self.conditioning == "hadamard" and self.prompt_position == "output"

    def gate_output(self, h: tf.Tensor, task: tf.Tensor) -> tf.Tensor:
        """``h * t_task (+ (h A_task) B_task)`` for outputs ``h`` [B, ..., d] and tasks of
        shape ``h.shape[:-1]`` (the adapter term only with ``prompt_rank`` > 0; NO_TASK has
        none, so it stays exactly the unprompted output)."""
        task = tf.cast(task, tf.int32)
        gated = h * tf.gather(self.prompts, task)
        if not self.prompt_rank:
            return gated
        # Low-rank per-cluster adapter: project to every cluster's rank-r space at once
        # ([..., K, r]), zero all but the row's own cluster (NO_TASK: all zero), and map back
        # with one [K r, d] matmul; dense ops only (gathering per-row [r, d] matrices and their
        # gradients cost 4x the training throughput).
        down = tf.einsum("...d,kdr->...kr", h, self.adapter_down)
        own = down * tf.one_hot(task, self.num_tasks, dtype=down.dtype)[..., None]
        own = tf.reshape(own, tf.concat([tf.shape(own)[:-2], [-1]], 0))
        up = tf.reshape(self.adapter_up, [self.num_tasks * self.prompt_rank, self.dim])
        return gated + tf.tensordot(own, up, axes=1)

    def _inputs(
        self, history: tf.Tensor, task: Optional[tf.Tensor], training: Optional[bool]
    ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Returns Transformer inputs [B, T, d], their validity [B, T] and the task [B]."""
        history, valid, positions = history_positions(history, self.max_len)
        if task is None:
            task = tf.fill(tf.shape(history)[:1], self.num_tasks)
        task = tf.cast(task, tf.int32)
        if task.shape.rank == 2 and task.shape[1] == 1:
            task = task[:, 0]
        if task.shape.rank != 1:
            raise ValueError(f"task must be [batch], got shape {task.shape}")
        items = self.item_embedding(history)
        if self.conditioning == "hadamard" and not self.late_prompt:
            items = items * tf.gather(self.prompts, task)[:, None, :]
        x = items * math.sqrt(self.dim) + tf.gather(self.position_embeddings, positions)
        if self.conditioning == "concat":
            has_prompt = tf.less(task, self.num_tasks)
            token = tf.gather(self.prompt_tokens, tf.minimum(task, self.num_tasks - 1))
            x = tf.concat([token[:, None, :], x], axis=1)
            valid = tf.concat([has_prompt[:, None], valid], axis=1)
        x = self.input_dropout(x, training=training)
        return x * tf.cast(valid, x.dtype)[..., None], valid, task

    @_no_autograph
    def input_embeddings(
        self, history: tf.Tensor, task: Optional[tf.Tensor] = None, training: Optional[bool] = None
    ) -> tf.Tensor:
        """Returns the Transformer input [B, T, d] (T = L + 1 for concat, else L); 0 on padding."""
        return self._inputs(history, task, training)[0]

    @_no_autograph
    def gate_weights(self, history: tf.Tensor, task: Optional[tf.Tensor] = None) -> tf.Tensor:
        """MMoE gate weights [B, L, E] (rows sum to 1); ValueError for other conditionings."""
        if self.conditioning != "mmoe":
            raise ValueError(f"conditioning {self.conditioning!r} has no MMoE gates")
        x, valid, task = self._inputs(history, task, training=False)
        return self.transformer.gates(x, task, valid)

    def _transform(
        self, history: tf.Tensor, task: Optional[tf.Tensor], training: Optional[bool]
    ) -> Tuple[tf.Tensor, tf.Tensor]:
        x, valid, task = self._inputs(history, task, training)
        mask = causal_attention_mask(valid)
        if self.conditioning == "mmoe":
            return self.transformer(x, task, mask, valid, training=training), valid
        return self.transformer(x, mask, valid, training=training), valid

    @_no_autograph
    def encode_sequence(
        self,
        history: tf.Tensor,
        task: Optional[tf.Tensor] = None,
        training: Optional[bool] = None,
        keep_prompt: bool = False,
    ) -> tf.Tensor:
        """Returns the outputs at every history position, [B, L, d] (zero at padding).

        Position ``i`` sees only positions ``<= i`` (and the concat prompt token). For concat,
        ``keep_prompt=True`` also returns the prompt token's output first ([B, L + 1, d]).
        """
        h, valid = self._transform(history, task, training)
        h = self.final_norm(h) * tf.cast(valid, h.dtype)[..., None]
        if self.conditioning == "concat" and not keep_prompt:
            h = h[:, 1:]
        if self.late_prompt:
            h = self._late(h, history, task)
        return h

    def _late(self, h: tf.Tensor, history: tf.Tensor, task: Optional[tf.Tensor]) -> tf.Tensor:
        """Gates ``h`` ([B, d] or [B, L, d]) by each row's task prompt (output prompts)."""
        if task is None:
            task = tf.fill(tf.shape(history)[:1], self.num_tasks)
        task = tf.cast(task, tf.int32)
        if task.shape.rank == 2 and task.shape[1] == 1:
            task = task[:, 0]
        if h.shape.rank == 3:
            task = tf.broadcast_to(task[:, None], tf.shape(h)[:2])
        return self.gate_output(h, task)

    @_no_autograph
    def call(self, inputs: Inputs, training: Optional[bool] = None) -> tf.Tensor:
        history, task = _split_inputs(inputs)
        h, valid = self._transform(history, task, training)
        # Normalise only the last position ([B, 1, d] keeps the LayerNorm's rank fixed).
        last = self.final_norm(h[:, -1:])[:, 0]
        last = last * tf.cast(valid[:, -1], last.dtype)[:, None]
        return self._late(last, history, task) if self.late_prompt else last

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            num_items=self.num_items,
            dim=self.dim,
            max_len=self.max_len,
            num_blocks=self.num_blocks,
            num_heads=self.num_heads,
            dropout=self.dropout,
            conditioning=self.conditioning,
            num_tasks=self.num_tasks,
            num_experts=self.num_experts,
            prompt_position=self.prompt_position,
            prompt_rank=self.prompt_rank,
        )
        return config


@_serializable
class IntentHead(tf.keras.layers.Layer):
    """Predicts p_uk, the probability that the next item is in cluster k: ``[B, d] -> [B, K]``.

    Args:
        num_tasks: K.
    """

    def __init__(self, num_tasks: int, **kwargs: Any):
        super().__init__(**kwargs)
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self.dense = tf.keras.layers.Dense(num_tasks, name="logits")

    def logits(self, user: tf.Tensor) -> tf.Tensor:
        """Unnormalised logits [B, K] (use these for a numerically stable cross-entropy)."""
        return self.dense(user)

    def call(self, user: tf.Tensor) -> tf.Tensor:
        """Returns the softmax probabilities [B, K]; rows sum to 1."""
        return tf.nn.softmax(self.dense(user), axis=-1)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(num_tasks=self.num_tasks)
        return config


@_serializable
class MFUserTower(tf.keras.layers.Layer):
    """Matrix-factorisation user tower: ``user_index`` [B] -> [B, d].

    ``user_index`` is the preprocessing index ``0..num_users-1``; ``OOV_INDEX = -1`` (unknown
    user) maps to an extra row that always looks up zero.

    Args:
        num_users: number of users.
        dim: d.
    """

    def __init__(self, num_users: int, dim: int, **kwargs: Any):
        super().__init__(**kwargs)
        if num_users < 1 or dim < 1:
            raise ValueError(f"num_users ({num_users}) and dim ({dim}) must be >= 1")
        self.num_users, self.dim = num_users, dim
        # Row 0 is the OOV row, so the lookup is ItemEmbedding's with ids shifted by one.
        self.table = ItemEmbedding(num_users, dim, name="user_embedding")

    def call(self, user_index: tf.Tensor) -> tf.Tensor:
        return self.table(tf.cast(user_index, tf.int32) + 1)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(num_users=self.num_users, dim=self.dim)
        return config


def build_user_tower(
    model_config: ModelConfig,
    conditioning: str,
    num_items: int,
    num_tasks: int,
    item_embedding: Optional[ItemEmbedding] = None,
) -> SASRecEncoder:
    """Builds the SASRec user tower of a ``ModelConfig``, sharing ``item_embedding`` if given."""
    return SASRecEncoder(
        num_items=num_items,
        dim=model_config.embedding_dim,
        max_len=model_config.max_len,
        num_blocks=model_config.num_blocks,
        num_heads=model_config.num_heads,
        dropout=model_config.dropout,
        conditioning=conditioning,
        num_tasks=num_tasks,
        num_experts=model_config.num_experts,
        item_embedding=item_embedding,
        prompt_position=model_config.prompt_position,
        prompt_rank=model_config.prompt_rank if conditioning == "hadamard" else 0,
        name="user_tower",
    )


def build_item_tower(
    model_config: ModelConfig, num_items: int, item_embedding: Optional[ItemEmbedding] = None
) -> ItemTower:
    """Builds the item tower; shares ``item_embedding`` if ``share_item_embeddings`` is set."""
    return ItemTower(
        num_items,
        model_config.embedding_dim,
        item_embedding=item_embedding,
        share_embeddings=model_config.share_item_embeddings,
        name="item_tower",
    )


def history_positions(history: tf.Tensor, max_len: int) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Checks a ``[B, L]`` history against ``max_len``; returns it as int32, its validity
    (non-padding) and each item's position counted from the oldest valid one (0, 1, ...).

    Raises:
        ValueError: not rank 2, or longer than ``max_len``.
    """
    history = tf.cast(history, tf.int32)
    if history.shape.rank != 2:
        raise ValueError(f"history must be [batch, length], got shape {history.shape}")
    if history.shape[1] is not None and history.shape[1] > max_len:
        raise ValueError(f"history length {history.shape[1]} exceeds max_len {max_len}")
    valid = tf.not_equal(history, PAD_ID)
    positions = tf.maximum(tf.cumsum(tf.cast(valid, tf.int32), axis=1) - 1, 0)
    return history, valid, positions


def check_table(table: ItemEmbedding, num_items: Optional[int], dim: int) -> None:
    if table.dim != dim or (num_items is not None and table.num_items != num_items):
        raise ValueError(
            f"item_embedding has {table.num_items} items x {table.dim} dims; "
            f"expected {num_items} x {dim}"
        )


def _split_inputs(inputs: Inputs) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
    if isinstance(inputs, dict):
        return inputs["history"], inputs.get("task")
    if isinstance(inputs, (list, tuple)):
        if len(inputs) not in (1, 2):
            raise ValueError(f"expected (history, task), got {len(inputs)} inputs")
        return inputs[0], (inputs[1] if len(inputs) == 2 else None)
    return inputs, None
