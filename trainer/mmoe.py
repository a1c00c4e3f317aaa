"""Causal self-attention block stacks (SASRec) and the MMoE mixture of such stacks.

These are the Transformer parts of the user tower (``trainer.towers.SASRecEncoder``):

* ``TransformerBlock``: one SASRec block, pre-LayerNorm as in the SASRec reference code:
  ``q = LN(x); x = q + MHA(q, x, x)``, then ``f = LN(x); x = f + FFN(f)`` with the point-wise
  feed-forward ``Dense(d, relu) -> dropout -> Dense(d) -> dropout``; padded rows are zeroed.
* ``BlockStack``: ``num_blocks`` such blocks.
* ``MMoE``: the paper's MMoE baseline: ``num_experts`` block stacks over the same input
  embeddings, mixed per position by a per-task softmax gate.

Every layer takes the attention mask built once per batch by ``causal_attention_mask``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import tensorflow as tf  # the trainer package imports dnc_env first

_serializable = tf.keras.utils.register_keras_serializable(package="dnc")
# The calls have no tensor-dependent Python control flow; skipping AutoGraph conversion saves
# seconds of tracing per model build (Keras otherwise converts every nested layer call).
_no_autograph = tf.autograph.experimental.do_not_convert


def causal_attention_mask(valid: tf.Tensor) -> tf.Tensor:
    """Builds the ``[B, T, T]`` boolean attention mask of causal attention over valid keys.

    Query ``i`` may attend key ``j`` iff ``j <= i`` and key ``j`` is valid (not padding). Each
    query may also attend itself, so that padded queries (whose outputs are zeroed anyway) never
    see an all-masked row.

    Args:
        valid: ``[B, T]`` bool, True where the position holds a real token.

    Returns:
        ``[B, T, T]`` bool mask for ``tf.keras.layers.MultiHeadAttention``.
    """
    length = tf.shape(valid)[1]
    causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
    eye = tf.eye(length, dtype=tf.bool)
    return tf.logical_and(causal[None], tf.logical_or(valid[:, None, :], eye[None]))


@_serializable
class TransformerBlock(tf.keras.layers.Layer):
    """One SASRec self-attention block (pre-LayerNorm, residuals, point-wise feed-forward).

    Args:
        dim: model width d (the feed-forward inner width is d too, as in SASRec).
        num_heads: attention heads; ``dim`` must be divisible by it.
        dropout: rate on attention probabilities and on both feed-forward outputs.
    """

    def __init__(self, dim: int, num_heads: int = 1, dropout: float = 0.2, **kwargs: Any):
        super().__init__(**kwargs)
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be a positive multiple of num_heads {num_heads}")
        self.dim, self.num_heads, self.dropout = dim, num_heads, dropout
        self.attention_norm = tf.keras.layers.LayerNormalization(epsilon=1e-8)
        self.attention = tf.keras.layers.MultiHeadAttention(
            num_heads=num_heads, key_dim=dim // num_heads, dropout=dropout
        )
        self.forward_norm = tf.keras.layers.LayerNormalization(epsilon=1e-8)
        self.forward_inner = tf.keras.layers.Dense(dim, activation="relu")
        self.forward_outer = tf.keras.layers.Dense(dim)
        self.forward_dropout = tf.keras.layers.Dropout(dropout)

    @_no_autograph
    def call(
        self,
        x: tf.Tensor,
        attention_mask: tf.Tensor,
        valid: tf.Tensor,
        training: Optional[bool] = None,
    ) -> tf.Tensor:
        """Maps ``x`` [B, T, d] to [B, T, d]; rows where ``valid`` [B, T] is False are zero."""
        q = self.attention_norm(x)
        x = q + self.attention(q, x, x, attention_mask=attention_mask, training=training)
        f = self.forward_norm(x)
        h = self.forward_dropout(self.forward_inner(f), training=training)
        x = f + self.forward_dropout(self.forward_outer(h), training=training)
        return x * tf.cast(valid, x.dtype)[..., None]

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(dim=self.dim, num_heads=self.num_heads, dropout=self.dropout)
        return config


@_serializable
class BlockStack(tf.keras.layers.Layer):
    """``num_blocks`` ``TransformerBlock``s applied in sequence (no final LayerNorm).

    Args:
        dim: model width d.
        num_blocks: number of blocks.
        num_heads: attention heads per block.
        dropout: dropout rate of every block.
    """

    def __init__(
        self, dim: int, num_blocks: int = 2, num_heads: int = 1, dropout: float = 0.2, **kwargs: Any
    ):
        super().__init__(**kwargs)
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.dim, self.num_blocks, self.num_heads, self.dropout = (
            dim,
            num_blocks,
            num_heads,
            dropout,
        )
        self.blocks = [TransformerBlock(dim, num_heads, dropout) for _ in range(num_blocks)]

    @_no_autograph
    def call(
        self,
        x: tf.Tensor,
        attention_mask: tf.Tensor,
        valid: tf.Tensor,
        training: Optional[bool] = None,
    ) -> tf.Tensor:
        """Maps ``x`` [B, T, d] to [B, T, d] through every block."""
        for block in self.blocks:
            x = block(x, attention_mask, valid, training=training)
        return x

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            dim=self.dim,
            num_blocks=self.num_blocks,
            num_heads=self.num_heads,
            dropout=self.dropout,
        )
        return config


@_serializable
class MMoE(tf.keras.layers.Layer):
    """Multi-gate mixture of self-attention experts (the paper's MMoE baseline).

    Each of the ``num_experts`` experts is a full ``BlockStack`` over the same input
    embeddings. Task ``k`` in ``0..num_tasks`` (``num_tasks`` = NO_TASK has its own gate) mixes
    the expert outputs at position ``i`` with ``softmax(m_i W_k + b_k)``, where ``m_i`` is the
    causal mean of the valid input embeddings at positions ``<= i`` (so the gate is
    input-dependent as in MMoE, keeps causality and ignores padding). ``W`` is ``[K+1, d, E]``.

    Args:
        dim: model width d.
        num_tasks: K; gates exist for tasks ``0..K``.
        num_experts: E.
        num_blocks: blocks per expert.
        num_heads: attention heads.
        dropout: dropout rate of the experts.
    """

    def __init__(
        self,
        dim: int,
        num_tasks: int,
        num_experts: int = 4,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if num_tasks < 1 or num_experts < 1:
            raise ValueError(
                f"num_tasks ({num_tasks}) and num_experts ({num_experts}) must be >= 1"
            )
        self.dim, self.num_tasks, self.num_experts = dim, num_tasks, num_experts
        self.num_blocks, self.num_heads, self.dropout = num_blocks, num_heads, dropout
        self.experts = [
            BlockStack(dim, num_blocks, num_heads, dropout, name=f"expert_{e}")
            for e in range(num_experts)
        ]
        with tf.name_scope(self.name):  # weights made in __init__ get no scope otherwise
            self.gate_kernel = self.add_weight(
                name="gate_kernel",
                shape=[num_tasks + 1, dim, num_experts],
                initializer="glorot_uniform",
            )
            self.gate_bias = self.add_weight(
                name="gate_bias", shape=[num_tasks + 1, num_experts], initializer="zeros"
            )

    @_no_autograph
    def gates(self, x: tf.Tensor, task: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
        """Returns the gate weights ``[B, T, E]`` (each row sums to 1).

        Args:
            x: input embeddings [B, T, d].
            task: [B] int32 in ``0..K``.
            valid: [B, T] bool.
        """
        mask = tf.cast(valid, x.dtype)[..., None]
        count = tf.maximum(tf.cumsum(mask, axis=1), 1.0)
        mean = tf.cumsum(x * mask, axis=1) / count
        kernel = tf.gather(tf.cast(self.gate_kernel, x.dtype), task)  # [B, d, E]
        bias = tf.gather(tf.cast(self.gate_bias, x.dtype), task)  # [B, E]
        return tf.nn.softmax(tf.einsum("btd,bde->bte", mean, kernel) + bias[:, None, :], axis=-1)

    @_no_autograph
    def call(
        self,
        x: tf.Tensor,
        task: tf.Tensor,
        attention_mask: tf.Tensor,
        valid: tf.Tensor,
        training: Optional[bool] = None,
    ) -> tf.Tensor:
        """Maps ``x`` [B, T, d] to the gate-weighted sum of expert outputs [B, T, d]."""
        gates = self.gates(x, task, valid)
        outputs = tf.stack(
            [expert(x, attention_mask, valid, training=training) for expert in self.experts],
            axis=-1,
        )  # [B, T, d, E]
        return tf.einsum("btde,bte->btd", outputs, gates)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            dim=self.dim,
            num_tasks=self.num_tasks,
            num_experts=self.num_experts,
            num_blocks=self.num_blocks,
            num_heads=self.num_heads,
            dropout=self.dropout,
        )
        return config
