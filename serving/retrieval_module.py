"""The exported serving graph: raw item ids in, per-cluster ANN retrieval, quota merge out.

``RetrievalModule`` is a ``tf.Module`` holding everything a request needs:

* the item vocabulary (the TFT ``item_cluster_vocab`` asset in a ``StaticHashTable``:
  raw id -> item_index; unknown ids and ``""`` become padding),
* the trained towers (user tower conditioned on a cluster, intent head),
  or, for multi-interest models (``mind``, ``comirec-sa``), the tower giving I interest
  vectors: each searches the one global index, and the lists are merged by score
  (``trainer.interest_merge.interest_merge_tf``, each item at its best interest's score),
  which is what ``trainer.evaluation`` measures,
* one top-k index per cluster (``tfrs`` ``ScaNN`` or ``BruteForce``) whose identifiers
  are the model item ids (int32, so a search needs no vocabulary lookup), or a single
  index over all items for plain variants,
* the merge: ``quota`` (``trainer.quotas.compute_quotas_tf`` + ``merge_per_cluster_tf``)
  or ``score`` (``trainer.score_merge.score_merge_tf``: the top-M of the union of the
  per-cluster lists by ``alpha * log p_k + s - log Z_k``; the in-cluster log-partition
  ``log Z_k`` is exact, from one matmul per cluster against that cluster's item
  embeddings, kept in the module for this purpose, with the history items left out; at
  prompt weight 0 the offsets are unused and neither the tables nor the matmul are kept).
  At prompt weight 0 every cluster is searched with the same unprompted user vector and
  ranked by that score alone, so the merged list is the catalogue's top-M: an optional
  ``global_plan`` adds one index over all items that answers unrestricted requests with
  one search instead of K (equal lists for exact indexes, tested); requests restricted to
  ``clusters`` still use the per-cluster indexes.

History handling of one request (``history`` [B, n] raw ids, oldest first):

* Unknown ids and ``""`` are dropped; the last ``max_len`` known items, right-aligned,
  feed the towers (the trainer's convention).
* The last ``max_history`` known items are excluded from the results. Each cluster's
  index is asked, at call time, for ``k_c = min(num_results + h_c, cluster size)``
  candidates, where ``h_c`` is the most excluded items (history and ``exclude``) any row
  of the batch has in cluster c: dropping them still leaves ``num_results`` (or the whole
  cluster), and no cluster can contribute more than that to the merge. Under the quota
  merge the quotas are known before any search (from the intent and each cluster's free
  items, its size minus the row's distinct excluded items in it, as evaluation counts
  them), so cluster c is asked only for ``min(max_b(quota_bc + h_bc), size_c)``, and a
  cluster where no row has a slot is not searched at all. The lists are then
  cut to a static ``max_num_results`` for the merge. The result equals the fixed-k path
  (``per_cluster_k=False``: every index returns ``max_num_results + max_history +
  max_exclude``), tested item for item. The capacity of cluster c is the number of
  valid candidates that survive (``cluster size - history items in c`` for an exact
  index); ScaNN slots it could not fill (NaN scores) are not counted.

``retrieve_filtered`` adds two per-request filters (TFRS users' category-restricted
retrieval and exclusion lists): ``clusters`` keeps only the given clusters (their
candidates stay, the others' are dropped before the merge: with the score merge the result
is the unrestricted ranking cut to those clusters; the quota merge shares the M slots among
them) and ``exclude`` removes up to ``max_exclude`` more items per row, which is why every
index returns ``max_exclude`` more candidates. Excluded items are dropped from the lists
only: they stay in the score merge's log-partition, so no other item's score changes. A
separate signature, not optional inputs of ``retrieve``, because TF Serving's Predict API
requires every input of a signature: existing ``retrieve`` requests stay valid.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from preprocessing import features, transform
from serving.indexes import build_indexes
from trainer.config import PAD_ID
from trainer.interest_merge import interest_merge_tf
from trainer.quotas import cluster_capacity_tf, compute_quotas_tf, merge_per_cluster_tf
from trainer.score_merge import (
    blend_queries_tf,
    check_merge,
    check_prompt_weight,
    log_partition_tf,
    score_merge_tf,
)


def right_align(ids: tf.Tensor, width: int) -> tf.Tensor:
    """The last ``width`` non-pad entries of each row of ``ids`` [B, n], right-aligned.

    Returns [B, width] int32 with ``PAD_ID`` on the left.
    """
    ids = tf.cast(ids, tf.int32)
    valid = tf.not_equal(ids, PAD_ID)
    from_end = tf.cumsum(tf.cast(valid, tf.int32), axis=1, reverse=True)  # 1 = last item
    keep = valid & (from_end <= width)
    where = tf.where(keep)  # [n_kept, 2] (row, col)
    columns = width - tf.gather_nd(from_end, where)
    indices = tf.stack([tf.cast(where[:, 0], tf.int32), columns], axis=1)
    shape = tf.stack([tf.shape(ids)[0], width])
    return tf.scatter_nd(indices, tf.gather_nd(ids, where), shape)


def stack_lists(found: Sequence[Tuple[tf.Tensor, tf.Tensor]]) -> Tuple[tf.Tensor, tf.Tensor]:
    """Per-index (scores, ids) [B, k_c] -> [B, L, max k_c], padded with -inf / PAD_ID."""
    longest = tf.reduce_max(tf.stack([tf.shape(ids)[1] for _, ids in found]))

    def padded(t: tf.Tensor, value) -> tf.Tensor:
        return tf.pad(t, [[0, 0], [0, longest - tf.shape(t)[1]]], constant_values=value)

    scores = tf.stack([padded(s, -np.inf) for s, _ in found], axis=1)
    ids = tf.stack([padded(i, PAD_ID) for _, i in found], axis=1)
    return scores, ids


class RetrievalModule(tf.Module):
    """Serving graph of one trained model (see the module docstring).

    Args:
        model: a trained ``trainer.model.RetrievalModel`` (not ``mf``), built.
        vocab_path: the TFT ``item_cluster_vocab`` file (line = item_index).
        item_ids: raw id of each item_index.
        item_cluster: cluster of each model id, ``[N + 1]`` (index 0 = pad).
        plans: index plan of each cluster (merged) or one plan (plain).
        max_num_results: largest ``num_results`` accepted.
        default_num_results: M of ``serving_default``.
        alpha: default quota exponent.
        max_history: history items excluded from the results (the most recent ones).
        merge: ``quota`` or ``score`` (see the module docstring); plain variants ignore it.
        max_exclude: most ``exclude`` ids per row of ``retrieve_filtered``; the plans' k
            must include it (``max_num_results + max_history + max_exclude``).
        per_cluster_k: ask each index for the candidates the request can use (see the
            module docstring); False returns every plan's fixed k (the reference path).
        prompt_weight: score merge: each cluster is searched with the blend
            ``(1 - w) u_K + w u_k`` of the unprompted and prompted user vectors and the
            offsets are weighted by ``w`` (``trainer.score_merge``); 1 = the full score merge.
    """

    def __init__(
        self,
        model,
        vocab_path: str,
        item_ids: Sequence[str],
        item_cluster: np.ndarray,
        plans: List[Dict[str, object]],
        max_num_results: int,
        default_num_results: int,
        alpha: float,
        max_history: int,
        merge: str = "quota",
        max_exclude: int = 0,
        per_cluster_k: bool = True,
        prompt_weight: float = 1.0,
        global_plan: Optional[Dict[str, object]] = None,
    ) -> None:
        super().__init__(name="dnc_retrieval")
        self.prompt_weight = check_prompt_weight(prompt_weight, merge)
        if max_exclude < 0:
            raise ValueError(f"max_exclude must be >= 0, got {max_exclude}")
        self.max_exclude = int(max_exclude)
        self.per_cluster_k = bool(per_cluster_k)
        self.merge = check_merge(merge)
        self.model = model
        self.merged = bool(model.variant.merged)
        self.multi_interest = bool(model.variant.multi_interest)
        self.num_clusters = int(model.num_clusters)
        self.max_len = int(model.model_config.max_len)
        self.max_num_results = int(max_num_results)
        self.default_num_results = int(default_num_results)
        self.default_alpha = float(alpha)
        self.max_history = int(max_history)
        self.item_table = transform.item_index_table(vocab_path)
        ids = np.asarray([features.PADDING_ITEM_ID, *item_ids], dtype=object).astype(bytes)
        self.output_ids = tf.Variable(ids, trainable=False, name="output_item_ids")
        self.item_cluster = tf.Variable(
            np.asarray(item_cluster, np.int32), trainable=False, name="item_cluster"
        )
        embeddings = model.candidate_embeddings(tf.range(model.num_items + 1)).numpy()
        # The implied intent scores every item: keep E^T so that the request's matmul
        # reads a stored operand instead of transposing (model.implied_intent).
        self.implied_items_t: Optional[tf.Variable] = None
        if getattr(model, "intent_encoder_kind", None) == "implied":
            ordered = embeddings[model.intent_item_order]  # the intent's cluster order
            self.implied_items_t = tf.Variable(
                np.ascontiguousarray(ordered.T), trainable=False, name="implied_items_t"
            )
        cluster = np.asarray(item_cluster)
        if self.merged:
            groups = [np.flatnonzero(cluster == c) for c in range(self.num_clusters)]
        else:
            groups = [np.arange(1, len(cluster))]
        if len(groups) != len(plans):
            raise ValueError(f"{len(plans)} index plans for {len(groups)} indexes")
        self.num_items = len(cluster) - 1
        if global_plan is not None and not (
            self.merged and merge == "score" and self.prompt_weight == 0.0
        ):
            raise ValueError(
                "a global index serves only a divide-and-conquer model under the score "
                f"merge at prompt weight 0, not merge={merge!r}, prompt weight "
                f"{self.prompt_weight}, merged={self.merged}"
            )
        jobs = [
            (plan, rows, f"index_{c}")
            for c, (plan, rows) in enumerate(zip(plans, groups, strict=True))
        ]
        if global_plan is not None:
            jobs.append((global_plan, np.arange(1, len(cluster)), "index_all"))
        built = build_indexes(jobs, embeddings)
        self.indexes = built[: len(groups)]
        self.global_index = built[len(groups)] if global_plan is not None else None
        self.k_max = max(int(p["k"]) for p in plans)
        self.index_sizes = [int(rows.size) for rows in groups]
        # Static width of the per-cluster lists the merge reads: no cluster contributes
        # more than num_results <= max_num_results items.
        self.width = min(self.k_max, self.max_num_results) if self.per_cluster_k else self.k_max
        # The exact log-partitions cost one matmul against every item, as much as brute
        # force over the catalogue: at prompt weight 0 the offsets are weighted by 0 (the
        # merge is the unprompted global ranking), so neither the tables nor the matmul
        # are kept.
        self.cluster_tables: List[Optional[tf.Variable]] = []
        if self.merged and self.merge == "score" and self.prompt_weight > 0:
            position = np.zeros(len(cluster), np.int32)
            for c, rows in enumerate(groups):
                position[rows] = np.arange(rows.size, dtype=np.int32)
                table = None
                if rows.size:
                    table = tf.Variable(embeddings[rows], trainable=False, name=f"items_{c}")
                self.cluster_tables.append(table)
            self.position_in_cluster = tf.Variable(position, trainable=False, name="position")

    # ------------------------------------------------------------------ building blocks

    def model_ids(self, raw: tf.Tensor) -> tf.Tensor:
        """Model item ids (``item_index + 1``) of raw ids; unknown ids and ``""`` -> PAD_ID."""
        index = self.item_table.lookup(raw)
        oov = tf.constant(features.OOV_INDEX, tf.int64)
        ids = tf.where(tf.equal(raw, features.PADDING_ITEM_ID), oov, index)
        return tf.cast(ids, tf.int32) + 1

    def _tower_history(self, history: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        ids = self.model_ids(history)
        return right_align(ids, self.max_len), right_align(ids, self.max_history)

    def _user(self, tower: tf.Tensor, task: tf.Tensor) -> tf.Tensor:
        """e_uk [B, d]; for multi-interest models the interests [B, I, d] (``task`` unused)."""
        if self.multi_interest:
            return self.model.interest_embeddings(tower, training=False)
        return self.model.user_embedding(tower, task, training=False)

    def _global_candidates(self, index, query, blocked, k, width):
        """(scores, ids) [B, width] of one index over all items: one query row [B, d], or
        the union of the interests' lists by score for multi-interest queries [B, I, d]."""
        if query.shape.rank == 2:
            scores, ids = self._search(index, query, k)
            scores, ids = self._drop_blocked(scores[:, None], ids[:, None], blocked, width)
            return scores[:, 0], ids[:, 0]
        interests = tf.shape(query)[1]
        scores, ids = self._search(index, tf.reshape(query, [-1, query.shape[-1]]), k)
        shape = [-1, interests, tf.shape(ids)[1]]  # rows of the flat batch: b-major
        scores, ids = self._drop_blocked(
            tf.reshape(scores, shape), tf.reshape(ids, shape), blocked, width
        )
        return interest_merge_tf(scores, ids, width)

    def _request_k(self, size: int, blocked_here: tf.Tensor, num_results: tf.Tensor):
        """Candidates to ask an index of ``size`` items for: ``num_results`` plus the most
        excluded items any row has in it (``blocked_here`` [B]), at least 1, at most size."""
        if not self.per_cluster_k:
            return None
        most = tf.reduce_max(tf.concat([blocked_here, [0]], axis=0))
        return tf.clip_by_value(num_results + most, 1, size)

    def _search(self, index, query: tf.Tensor, k=None) -> Tuple[tf.Tensor, tf.Tensor]:
        """(scores, model ids) [B, k] of one index (``k`` candidates asked; None: the
        plan's); an absent index (empty cluster) gives [B, 0]."""
        if index is None:
            b = tf.shape(query)[0]
            return tf.zeros([b, 0], tf.float32), tf.zeros([b, 0], tf.int32)
        scores, ids = index(query, k=k)
        return scores, tf.cast(ids, tf.int32)

    def _cluster_candidates(self, users: tf.Tensor, blocked: tf.Tensor, counts, num_results):
        """(scores, ids) [B, K, width] of every cluster's index, searched with its own
        query ``users[:, c]``; the exclusion and ordering run once over all lists."""
        found = [
            self._search(
                self.indexes[c],
                users[:, c],
                self._request_k(self.index_sizes[c], counts[:, c], num_results),
            )
            for c in range(self.num_clusters)
        ]
        return self._drop_blocked(*stack_lists(found), blocked)

    def _drop_blocked(self, scores, ids, blocked: tf.Tensor, width=None):
        """Lists ``scores``, ``ids`` [B, L, k] -> [B, L, width]: items of the sorted
        ``blocked`` [B, E] and empty slots (NaN scores, PAD_ID) -> -inf / PAD_ID, valid
        candidates first, by score. One pass for all L lists of a row."""
        width = self.width if width is None else width
        shape = tf.shape(ids)
        flat = tf.reshape(ids, [shape[0], -1])
        pos = tf.searchsorted(blocked, flat)
        hit = tf.gather(blocked, tf.minimum(pos, tf.shape(blocked)[1] - 1), batch_dims=1)
        hit = tf.reshape(hit, shape)
        valid = ~tf.math.is_nan(scores) & tf.not_equal(ids, PAD_ID) & tf.not_equal(hit, ids)
        scores = tf.where(valid, scores, -np.inf)
        order = tf.argsort(scores, axis=-1, direction="DESCENDING", stable=True)
        scores = tf.gather(scores, order, batch_dims=2)[:, :, :width]
        ids = tf.gather(tf.where(valid, ids, PAD_ID), order, batch_dims=2)[:, :, :width]
        pad = [[0, 0], [0, 0], [0, width - tf.shape(scores)[2]]]
        scores = tf.pad(scores, pad, constant_values=-np.inf)
        ids = tf.pad(ids, pad, constant_values=PAD_ID)
        return tf.ensure_shape(scores, [None, None, width]), tf.ensure_shape(
            ids, [None, None, width]
        )

    def _blocked_per_cluster(self, blocked: tf.Tensor) -> tf.Tensor:
        """[B, K] number of ``blocked`` model ids [B, E] in each cluster (PAD_ID: none)."""
        cluster = tf.gather(self.item_cluster, blocked)  # PAD_ID -> -1 -> a zero row
        return tf.reduce_sum(tf.one_hot(cluster, self.num_clusters, dtype=tf.int32), axis=1)

    def _cluster_queries(self, tower: tf.Tensor, unprompted: Optional[tf.Tensor]) -> tf.Tensor:
        """[B, K, d] query of each cluster index: the prompted user vectors, blended with
        the unprompted one (task K) when ``prompt_weight < 1``. ``unprompted``: the
        request's one tower pass when the model's clusters share it (else None)."""
        k = self.num_clusters
        with_plain = self.prompt_weight != 1.0
        users = self.model.cluster_user_embeddings(
            tower, with_plain=with_plain, unprompted=unprompted
        )
        if not with_plain:
            return users
        return blend_queries_tf(users[:, :k], users[:, k], self.prompt_weight)

    def _log_partition(self, users: tf.Tensor, seen: tf.Tensor) -> tf.Tensor:
        """[B, K] exact in-cluster log-partitions of users [B, K, d], seen ids left out."""
        b = tf.shape(users)[0]
        seen_cluster = tf.gather(self.item_cluster, seen)  # PAD_ID -> -1
        seen_position = tf.gather(self.position_in_cluster, seen)
        out = []
        for c, table in enumerate(self.cluster_tables):
            if table is None:
                out.append(tf.fill([b], tf.constant(-np.inf, tf.float32)))
                continue
            scores = tf.matmul(users[:, c], table, transpose_b=True)  # [B, n_c]
            hit = tf.where(tf.equal(seen_cluster, c) & tf.not_equal(seen, PAD_ID))
            where = tf.stack([hit[:, 0], tf.cast(tf.gather_nd(seen_position, hit), tf.int64)], 1)
            scores = tf.tensor_scatter_nd_update(
                scores, where, tf.fill(tf.shape(hit)[:1], tf.constant(-np.inf, tf.float32))
            )
            out.append(log_partition_tf(scores, tf.zeros_like(scores, tf.bool)))
        return tf.stack(out, axis=1)

    def _finish(self, ids, scores, clusters, num_results) -> Dict[str, tf.Tensor]:
        width = tf.shape(ids)[1]
        pad = [[0, 0], [0, tf.maximum(num_results - width, 0)]]
        ids = tf.pad(ids[:, :num_results], pad, constant_values=PAD_ID)
        scores = tf.pad(scores[:, :num_results], pad, constant_values=-np.inf)
        clusters = tf.pad(tf.cast(clusters[:, :num_results], tf.int32), pad, constant_values=-1)
        return {
            "item_ids": tf.gather(self.output_ids, ids),
            "scores": scores,
            "clusters": clusters,
        }

    def _allowed(self, clusters: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """[B, K] bool of ``clusters`` [B, C] (-1 = padding; a row of padding allows all)."""
        clusters = tf.cast(clusters, tf.int32)
        checks = [
            tf.debugging.assert_equal(
                tf.shape(clusters)[0], rows, message="clusters must have one row per history"
            ),
            tf.debugging.assert_greater_equal(
                clusters, -1, message="clusters must be cluster ids in [0, K) or -1 (padding)"
            ),
            tf.debugging.assert_less(
                clusters,
                self.num_clusters,
                message=f"clusters must be cluster ids < K={self.num_clusters} or -1 (padding)",
            ),
        ]
        with tf.control_dependencies(checks):
            hot = tf.one_hot(clusters, self.num_clusters, on_value=True, off_value=False)
        allowed = tf.reduce_any(hot, axis=1)
        return allowed | ~tf.reduce_any(allowed, axis=1, keepdims=True)

    def _excluded(self, exclude: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """Model ids [B, E] of the raw ``exclude`` ids (``""`` and unknown ids -> PAD_ID)."""
        exclude = tf.convert_to_tensor(exclude, tf.string)
        given = tf.reduce_sum(tf.cast(exclude != features.PADDING_ITEM_ID, tf.int32), axis=1)
        checks = [
            tf.debugging.assert_equal(
                tf.shape(exclude)[0], rows, message="exclude must have one row per history"
            ),
            tf.debugging.assert_less_equal(
                given,
                self.max_exclude,
                message=f"exclude holds more than max_exclude={self.max_exclude} ids in a row",
            ),
        ]
        with tf.control_dependencies(checks):
            return self.model_ids(exclude)

    def serve(
        self,
        history: tf.Tensor,
        alpha: tf.Tensor,
        num_results: tf.Tensor,
        clusters: Optional[tf.Tensor] = None,
        exclude: Optional[tf.Tensor] = None,
    ):
        """Top ``num_results`` unseen items of every history row (see the module docstring).

        ``clusters`` restricts each row's result to those clusters (the merged ranking
        cut to them); ``exclude`` removes those items from it, like history items, but
        without changing any score.
        """
        history = tf.convert_to_tensor(history, tf.string)
        num_results = tf.cast(num_results, tf.int32)
        alpha = tf.cast(alpha, tf.float32)
        checks = [
            tf.debugging.assert_less_equal(
                num_results,
                self.max_num_results,
                message=f"num_results must be <= max_num_results={self.max_num_results}",
            ),
            tf.debugging.assert_non_negative(num_results, message="num_results must be >= 0"),
            tf.debugging.assert_non_negative(alpha, message="alpha must be >= 0 (inf allowed)"),
        ]
        with tf.control_dependencies(checks):
            num_results = tf.identity(num_results)
        tower, seen = self._tower_history(history)
        b = tf.shape(tower)[0]
        blocked = seen if exclude is None else tf.concat([seen, self._excluded(exclude, b)], 1)
        seen, blocked = tf.sort(seen, axis=-1), tf.sort(blocked, axis=-1)
        allowed = None if clusters is None else self._allowed(clusters, b)
        counts = self._blocked_per_cluster(blocked)
        if not self.merged:
            return self._serve_one_index(
                self.indexes[0], self.index_sizes[0], tower, blocked, counts, num_results, allowed
            )
        if self.global_index is not None and allowed is None:
            return self._serve_one_index(
                self.global_index, self.num_items, tower, blocked, counts, num_results, None
            )
        k = self.num_clusters
        # One tower pass serves every cluster's query and the intent where it can.
        shared = self.model.unprompted_embedding(tower) if self.model.shares_tower_pass else None
        users = self._cluster_queries(tower, shared)
        p = self._intent(tower, shared)
        if self.merge == "quota" and self.per_cluster_k:
            return self._serve_quotas_first(users, p, blocked, num_results, alpha, allowed)
        scores, ids = self._cluster_candidates(users, blocked, counts, num_results)
        if allowed is not None:
            scores = tf.where(allowed[:, :, None], scores, -np.inf)
            ids = tf.where(allowed[:, :, None], ids, PAD_ID)
        if self.merge == "score":
            log_z = (
                self._log_partition(users, seen)
                if self.cluster_tables
                else tf.zeros([b, k], tf.float32)  # prompt weight 0: the offsets are unused
            )
            merged = score_merge_tf(scores, ids, log_z, p, alpha, num_results, self.prompt_weight)
            return self._finish(*merged, num_results)
        if allowed is not None:
            p = p * tf.cast(allowed, p.dtype)
        capacity = tf.reduce_sum(tf.cast(ids != PAD_ID, tf.int32), axis=-1)
        quotas = compute_quotas_tf(p, num_results, alpha, capacity)
        out_ids, out_scores, out_clusters = merge_per_cluster_tf(scores, ids, quotas)
        return self._finish(out_ids, out_scores, out_clusters, num_results)

    def _serve_quotas_first(self, users, p, blocked, num_results, alpha, allowed):
        """Quota merge with the quotas fixed before any search (``_first_quotas``); each
        cluster is searched for its ``k_c`` candidates or, with no slot, not at all."""
        p, free, quotas, k = self._first_quotas(p, blocked, num_results, alpha, allowed)
        found = [
            self._search_if_asked(self.indexes[c], users[:, c], k[c])
            for c in range(self.num_clusters)
        ]
        scores, ids = self._drop_blocked(*stack_lists(found), blocked)
        merged = self._merge_quotas(scores, ids, p, free, quotas, num_results, alpha)
        return self._finish(*merged, num_results)

    def _first_quotas(self, p, blocked, num_results, alpha, allowed):
        """(p, free, quotas, k): the quotas [B, K] from the intent ``p`` (zero outside
        ``allowed``) and each cluster's free items ``free`` [B, K] (its size minus the
        row's distinct excluded items in it, as ``trainer.quotas.cluster_capacity``
        counts them in evaluation), and the candidates ``k`` [K] to ask each index for:
        ``min(max_b(quota_bc + excluded_bc), size_c)``, 0 where no row has a slot."""
        sizes = tf.constant(self.index_sizes, tf.int32)
        free = cluster_capacity_tf(blocked, self.item_cluster, sizes)  # [B, K]
        excluded = sizes[None, :] - free
        if allowed is not None:
            p = p * tf.cast(allowed, p.dtype)
            free = tf.where(allowed, free, 0)
        quotas = compute_quotas_tf(p, num_results, alpha, free)
        none = tf.zeros_like(quotas[:1])  # the maxima of an empty batch are 0
        wanted = tf.reduce_max(tf.concat([quotas + excluded, none], 0), 0)
        asked = tf.reduce_max(tf.concat([quotas, none], 0), 0) > 0
        return p, free, quotas, tf.where(asked, tf.minimum(wanted, sizes), 0)

    def _merge_quotas(self, scores, ids, p, free, quotas, num_results, alpha):
        """``merge_per_cluster_tf`` of the lists [B, K, width] with ``quotas``; should an
        index return fewer valid candidates than its quota (ScaNN slots it could not
        fill), the quotas are recomputed with those capacities, as the fixed-k path does."""
        valid = tf.reduce_sum(tf.cast(ids != PAD_ID, tf.int32), axis=-1)
        quotas = tf.cond(
            tf.reduce_any(valid < quotas),
            lambda: compute_quotas_tf(p, num_results, alpha, tf.minimum(free, valid)),
            lambda: quotas,
        )
        return merge_per_cluster_tf(scores, ids, quotas)

    def _search_if_asked(self, index, query: tf.Tensor, k: tf.Tensor):
        """``_search`` for ``k`` > 0 candidates; k = 0 skips the index ([B, 0] lists)."""
        if index is None:
            return self._search(None, query)
        return tf.cond(
            k > 0, lambda: self._search(index, query, k), lambda: self._search(None, query)
        )

    def _serve_one_index(self, index, size, tower, blocked, counts, num_results, allowed):
        """Top items of one index over ``size`` items, searched with the unprompted user
        vector (or a multi-interest model's interests): the plain variants' index, and the
        global index of the score merge at prompt weight 0. ``allowed`` [B, K] (or None)
        cuts the list to those clusters after the search."""
        query = self._user(tower, tf.fill([tf.shape(tower)[0]], self.num_clusters))
        # A cluster filter cuts the list after the search: keep the plan's k.
        k, width = None, self.k_max
        if allowed is None:
            k = self._request_k(size, tf.reduce_sum(counts, 1), num_results)
            width = self.width
        scores, ids = self._global_candidates(index, query, blocked, k, width)
        clusters = tf.where(ids == PAD_ID, -1, tf.gather(self.item_cluster, ids))
        if allowed is not None:
            keep = tf.gather(allowed, tf.maximum(clusters, 0), batch_dims=1) & (ids != PAD_ID)
            order = tf.argsort(tf.cast(keep, tf.int32), axis=-1, direction="DESCENDING",
                               stable=True)  # fmt: skip
            scores = tf.gather(tf.where(keep, scores, -np.inf), order, batch_dims=1)
            ids = tf.gather(tf.where(keep, ids, PAD_ID), order, batch_dims=1)
            clusters = tf.gather(tf.where(keep, clusters, -1), order, batch_dims=1)
        return self._finish(ids, scores, clusters, num_results)

    # ------------------------------------------------------------------ signatures

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="history")])
    def serving_default(self, history):
        """``history`` [B, n] -> top ``default_num_results`` with the default alpha."""
        return self.serve(history, self.default_alpha, self.default_num_results)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.string, name="history"),
            tf.TensorSpec([], tf.float32, name="alpha"),
            tf.TensorSpec([], tf.int32, name="num_results"),
        ]
    )
    def retrieve(self, history, alpha, num_results):
        """``history`` [B, n], ``alpha``, ``num_results`` -> top ``num_results``."""
        return self.serve(history, alpha, num_results)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.string, name="history"),
            tf.TensorSpec([], tf.float32, name="alpha"),
            tf.TensorSpec([], tf.int32, name="num_results"),
            tf.TensorSpec([None, None], tf.int32, name="clusters"),
            tf.TensorSpec([None, None], tf.string, name="exclude"),
        ]
    )
    def retrieve_filtered(self, history, alpha, num_results, clusters, exclude):
        """``retrieve`` restricted to ``clusters`` [B, C] (-1 pads; a row of -1 allows all),
        without the raw ids ``exclude`` [B, E] (``""`` pads; at most ``max_exclude``)."""
        return self.serve(history, alpha, num_results, clusters, exclude)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.string, name="history"),
            tf.TensorSpec([None], tf.int32, name="cluster"),
        ]
    )
    def user_embedding(self, history, cluster):
        """e_uk [B, d] for ``cluster`` [B] (K = unconditioned); multi-interest models
        return their interests [B, I, d] whatever the cluster."""
        tower, _ = self._tower_history(history)
        checks = [
            tf.debugging.assert_non_negative(cluster, message="cluster must be in [0, K]"),
            tf.debugging.assert_less_equal(
                cluster, self.num_clusters, message=f"cluster must be <= K={self.num_clusters}"
            ),
        ]
        with tf.control_dependencies(checks):
            cluster = tf.identity(cluster)
        return {"embedding": self._user(tower, cluster)}

    def _intent(self, tower: tf.Tensor, unprompted: Optional[tf.Tensor] = None) -> tf.Tensor:
        """p_uk [B, K] of model-id histories (the implied intent against E^T);
        ``unprompted``: their tower pass, if the caller has it."""
        return self.model.intent(
            tower, training=False, item_embeddings_t=self.implied_items_t, unprompted=unprompted
        )

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="history")])
    def intent(self, history):
        """p_uk [B, K]."""
        tower, _ = self._tower_history(history)
        return {"probabilities": self._intent(tower)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def predict_examples(self, examples):
        """Serialized ``tf.Example`` with a bytes list ``history`` -> as ``serving_default``."""
        spec = {"history": tf.io.VarLenFeature(tf.string)}
        parsed = tf.io.parse_example(examples, spec)["history"]
        history = tf.sparse.to_dense(parsed, default_value=features.PADDING_ITEM_ID)
        return self.serve(history, self.default_alpha, self.default_num_results)

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        """The SavedModel signatures, by name."""
        return {
            "serving_default": self.serving_default.get_concrete_function(),
            "retrieve": self.retrieve.get_concrete_function(),
            "retrieve_filtered": self.retrieve_filtered.get_concrete_function(),
            "user_embedding": self.user_embedding.get_concrete_function(),
            "intent": self.intent.get_concrete_function(),
            "predict_examples": self.predict_examples.get_concrete_function(),
        }
