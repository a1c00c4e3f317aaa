"""Multi-interest user towers: MIND (Li et al., CIKM 2019) and ComiRec-SA (Cen et al., KDD 2020).

Both give a user ``I`` interest vectors ``[B, I, d]`` instead of one; training scores the
target with ONE of them (the read-out), retrieval searches with all of them and merges the
lists by score (``trainer.interest_merge``).

* ``CapsuleRouting`` (MIND's behaviour-to-interest routing): behaviour capsules
  ``c_i = S e_i`` (one bilinear map ``S`` shared by the interests), routing logits ``b_ik``
  started from a fixed Gaussian pattern, then for a fixed number of iterations::

      w_ik = softmax_k(b_ik)            (each behaviour splits over the interests)
      u_k  = squash(sum_i w_ik c_i)     (squash(z) = |z|^2 / (1 + |z|^2) * z / |z|)
      b_ik += u_k . c_i                 (all but the last iteration)

  followed by one ReLU layer of width d (MIND's "H layer"). As in ComiRec's reference
  implementation of MIND, the capsules of all but the last iteration are gradient-stopped.
* ``SelfAttentivePooling`` (ComiRec-SA): ``A = softmax_i(W2 tanh(W1 (e_i + p_i)))`` over the
  history positions, one column per interest (``W1``: 4d units, ComiRec's size), and the
  interests are ``V = A^T E`` (attention reads positions, the values are the item embeddings).

Departures from the papers, and why:

* A fixed number of interests (ComiRec's fixed K; MIND's dynamic ``min(K, log2 |history|)``
  is not used): the exported graph then has a static ``[B, I, d]`` query.
* MIND's routing logits start from a pattern drawn once (a non-trainable ``[max_len, I]``
  weight, indexed by position) instead of fresh noise at every call: the same history always
  gives the same interests, so serving is deterministic and the exported graph returns what
  evaluation measured.
* No user-profile features (the data has none).

Positions count valid items from the oldest one in the window (as in ``SASRecEncoder``),
so the interests of a history truncated after position ``j`` equal the all-position output
at ``j``: ``encode_sequence`` computes every prefix's interests in one call (all-position
training), each from the positions ``<= j`` only.

Read-out (``read_out``): ``hard`` (the default) picks the interest closest to the target
(ComiRec's argmax; MIND's label-aware attention at ``p -> inf``, the setting the MIND paper
found best); ``label-aware`` is MIND's ``softmax_k(pow(v_k . e, p))`` with ``power`` p, using
``sign(x) |x|^p`` so that negative products stay defined.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import tensorflow as tf  # the trainer package imports dnc_env first

from trainer.config import INTEREST_READOUTS, MULTI_INTEREST_TOWERS
from trainer.towers import ItemEmbedding, check_table, history_positions

_serializable = tf.keras.utils.register_keras_serializable(package="dnc")
_no_autograph = tf.autograph.experimental.do_not_convert

_MASKED = -1e9


def squash(z: tf.Tensor, eps: float = 1e-9) -> tf.Tensor:
    """Capsule squash over the last axis: ``|z|^2 / (1 + |z|^2) * z / |z|`` (0 stays 0)."""
    norm2 = tf.reduce_sum(tf.square(z), axis=-1, keepdims=True)
    return z * (norm2 / (1.0 + norm2)) / tf.sqrt(norm2 + eps)


def prefix_visibility(valid: tf.Tensor, all_positions: bool) -> tf.Tensor:
    """Which history positions each output reads, ``[B, J, L]`` bool.

    Args:
        valid: ``[B, L]`` True at real items.
        all_positions: True: one output per position ``j`` reading ``i <= j`` (J = L);
            False: one output reading the whole history (J = 1).
    """
    if not all_positions:
        return valid[:, None, :]
    length = tf.shape(valid)[1]
    causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)  # [J, L]: i <= j
    return causal[None] & valid[:, None, :]


@_serializable
class CapsuleRouting(tf.keras.layers.Layer):
    """MIND's behaviour-to-interest dynamic routing (see the module docstring).

    Args:
        num_interests: I.
        dim: d (capsules and output).
        max_len: longest history (rows of the initial routing pattern).
        iterations: routing iterations (MIND: 3).
        seed: seed of the initial routing pattern.
    """

    def __init__(
        self,
        num_interests: int = 4,
        dim: int = 50,
        max_len: int = 200,
        iterations: int = 3,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if min(num_interests, dim, max_len, iterations) < 1:
            raise ValueError(
                "num_interests, dim, max_len and iterations must be >= 1, got "
                f"{num_interests}, {dim}, {max_len}, {iterations}"
            )
        self.num_interests, self.dim, self.max_len = num_interests, dim, max_len
        self.iterations, self.seed = iterations, seed
        with tf.name_scope(self.name):
            self.initial_logits = self.add_weight(
                name="initial_logits",
                shape=[max_len, num_interests],
                initializer=tf.keras.initializers.TruncatedNormal(stddev=1.0, seed=seed),
                trainable=False,
            )
        self.bilinear = tf.keras.layers.Dense(dim, use_bias=False, name="bilinear")
        self.h_layer = tf.keras.layers.Dense(dim, activation="relu", name="h_layer")

    def call(self, items: tf.Tensor, positions: tf.Tensor, sees: tf.Tensor) -> tf.Tensor:
        """Interests ``[B, J, I, d]`` of history embeddings ``[B, L, d]``.

        Args:
            items: item embeddings of the history (0 at padding).
            positions: ``[B, L]`` position of each item (0 = oldest valid).
            sees: ``[B, J, L]`` which positions each of the J outputs reads.
        """
        capsules = self.bilinear(items)  # [B, L, d]
        start = tf.gather(self.initial_logits, positions)  # [B, L, I]
        logits = tf.zeros_like(tf.cast(sees, start.dtype))[..., None] + start[:, None]
        visible = tf.cast(sees, capsules.dtype)[..., None]  # [B, J, L, 1]
        interests = None
        for step in range(self.iterations):
            last = step == self.iterations - 1
            source = capsules if last else tf.stop_gradient(capsules)
            weights = tf.nn.softmax(logits, axis=-1) * visible  # [B, J, L, I]
            interests = squash(tf.einsum("bjik,bid->bjkd", weights, source))
            if not last:
                logits += tf.einsum("bjkd,bid->bjik", interests, source)
        return self.h_layer(interests)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            num_interests=self.num_interests,
            dim=self.dim,
            max_len=self.max_len,
            iterations=self.iterations,
            seed=self.seed,
        )
        return config


@_serializable
class SelfAttentivePooling(tf.keras.layers.Layer):
    """ComiRec-SA's multi-head self-attentive pooling (see the module docstring).

    Args:
        num_interests: I (attention columns).
        dim: d.
        attention_dim: width of the tanh layer (ComiRec: 4d; 0 means 4d).
    """

    def __init__(self, num_interests: int = 4, dim: int = 50, attention_dim: int = 0, **kwargs):
        super().__init__(**kwargs)
        if min(num_interests, dim) < 1 or attention_dim < 0:
            raise ValueError(
                f"need num_interests, dim >= 1 and attention_dim >= 0, got "
                f"{num_interests}, {dim}, {attention_dim}"
            )
        self.num_interests, self.dim = num_interests, dim
        self.attention_dim = attention_dim or 4 * dim
        self.hidden = tf.keras.layers.Dense(self.attention_dim, activation="tanh", name="w1")
        self.heads = tf.keras.layers.Dense(num_interests, name="w2")

    def attention(self, keys: tf.Tensor, sees: tf.Tensor) -> tf.Tensor:
        """Attention weights ``[B, J, L, I]`` (each output's column sums to 1 over what it sees)."""
        logits = self.heads(self.hidden(keys))[:, None]  # [B, 1, L, I]
        mask = sees[..., None]
        logits = tf.where(mask, logits, tf.constant(_MASKED, logits.dtype))
        return tf.nn.softmax(logits, axis=2) * tf.cast(mask, logits.dtype)

    def call(self, keys: tf.Tensor, values: tf.Tensor, sees: tf.Tensor) -> tf.Tensor:
        """Interests ``[B, J, I, d]``: attention over ``keys`` ``[B, L, d]`` (embeddings plus
        positions), pooling ``values`` ``[B, L, d]`` (the item embeddings)."""
        return tf.einsum("bjik,bid->bjkd", self.attention(keys, sees), values)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            num_interests=self.num_interests, dim=self.dim, attention_dim=self.attention_dim
        )
        return config


@_serializable
class MultiInterestEncoder(tf.keras.layers.Layer):
    """User tower of ``mind`` / ``comirec-sa``: history ``[B, L]`` -> interests ``[B, I, d]``.

    Args:
        kind: ``mind`` or ``comirec-sa``.
        num_items: real items (must match ``item_embedding`` when both are given).
        dim: d.
        max_len: longest history accepted.
        num_interests: I (both papers: 4).
        routing_iterations: MIND's routing iterations (3).
        readout: ``hard`` (the closest interest) or ``label-aware`` (INTEREST_READOUTS).
        power: p of the ``label-aware`` read-out.
        item_embedding: shared ``ItemEmbedding`` (not serialised; ``from_config`` builds one).
    """

    def __init__(
        self,
        kind: str = "comirec-sa",
        num_items: Optional[int] = None,
        dim: int = 50,
        max_len: int = 200,
        num_interests: int = 4,
        routing_iterations: int = 3,
        readout: str = "hard",
        power: float = 2.0,
        item_embedding: Optional[ItemEmbedding] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if kind not in MULTI_INTEREST_TOWERS:
            raise ValueError(f"unknown multi-interest tower {kind!r}; {MULTI_INTEREST_TOWERS}")
        if readout not in INTEREST_READOUTS:
            raise ValueError(f"unknown readout {readout!r}; expected one of {INTEREST_READOUTS}")
        if not 0 <= power < math.inf:
            raise ValueError(f"power must be a finite number >= 0, got {power}")
        if item_embedding is None:
            if num_items is None:
                raise ValueError("give num_items or item_embedding")
            item_embedding = ItemEmbedding(num_items, dim, name="item_embedding")
        check_table(item_embedding, num_items, dim)
        self.kind, self.num_items, self.dim = kind, item_embedding.num_items, dim
        self.max_len, self.num_interests = max_len, num_interests
        self.routing_iterations, self.readout = routing_iterations, readout
        self.power = float(power)
        self.item_embedding = item_embedding
        if kind == "mind":
            self.extractor = CapsuleRouting(
                num_interests, dim, max_len, routing_iterations, name="routing"
            )
        else:
            with tf.name_scope(self.name):
                self.position_embeddings = self.add_weight(
                    name="position_embeddings", shape=[max_len, dim], initializer="glorot_uniform"
                )
            self.extractor = SelfAttentivePooling(num_interests, dim, name="self_attention")

    def _interests(self, history: tf.Tensor, all_positions: bool) -> tf.Tensor:
        history, valid, positions = history_positions(history, self.max_len)
        items = self.item_embedding(history)
        sees = prefix_visibility(valid, all_positions)
        if self.kind == "mind":
            return self.extractor(items, positions, sees)
        keys = (
            items
            + tf.gather(self.position_embeddings, positions)
            * tf.cast(valid, items.dtype)[..., None]
        )
        return self.extractor(keys, items, sees)

    @_no_autograph
    def call(self, history: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        """Interests of whole histories, ``[B, I, d]``."""
        return self._interests(history, all_positions=False)[:, 0]

    @_no_autograph
    def encode_sequence(self, history: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        """Interests of every prefix, ``[B, L, I, d]``: row ``j`` reads positions ``<= j``."""
        return self._interests(history, all_positions=True)

    def read_out(self, interests: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
        """The user vector ``[..., d]`` that scores ``target`` ``[..., d]``, read out of
        ``interests`` ``[..., I, d]``."""
        dots = tf.einsum("...kd,...d->...k", interests, target)
        if self.readout == "hard":
            weights = tf.one_hot(tf.argmax(dots, axis=-1), self.num_interests, dtype=dots.dtype)
        else:
            sharpened = tf.sign(dots) * tf.pow(tf.abs(dots), self.power)
            weights = tf.nn.softmax(sharpened, axis=-1)
        return tf.einsum("...k,...kd->...d", weights, interests)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            kind=self.kind,
            num_items=self.num_items,
            dim=self.dim,
            max_len=self.max_len,
            num_interests=self.num_interests,
            routing_iterations=self.routing_iterations,
            readout=self.readout,
            power=self.power,
        )
        return config
