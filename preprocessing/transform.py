"""The TensorFlow Transform preprocessing_fn and its raw schema.

The item vocabulary is a single analyzer output whose tokens are
``item_id<TAB>cluster_id`` (see ``features.ITEM_CLUSTER_VOCAB``): the line
number is the item index and the second column the cluster. Both lookups read
the same asset, so the trainer and the exported serving graph apply exactly the
mapping computed here; unknown items map to ``features.OOV_INDEX``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from preprocessing import features

RAW_FEATURE_SPEC = {
    features.USER_ID: tf.io.FixedLenFeature([], tf.string),
    features.SPLIT: tf.io.FixedLenFeature([], tf.string),
    features.ITEM_IDS: tf.io.VarLenFeature(tf.string),
    features.ITEM_CLUSTERS: tf.io.VarLenFeature(tf.int64),
    features.TIMESTAMPS: tf.io.VarLenFeature(tf.int64),
}


def raw_metadata() -> dataset_metadata.DatasetMetadata:
    """The DatasetMetadata of the raw per-user records."""
    return dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(RAW_FEATURE_SPEC))


def _map_values(fn, x):
    if isinstance(x, tf.SparseTensor):
        return tf.sparse.map_values(fn, x)
    return fn(x)


def item_index_table(vocab_path) -> tf.lookup.StaticHashTable:
    """Raw item id -> item index (the vocabulary's line number), unknown -> OOV_INDEX.

    Used by the transform graph and by the serving module, so both read the
    item vocabulary asset the same way.
    """
    initializer = tf.lookup.TextFileInitializer(
        vocab_path,
        key_dtype=tf.string,
        key_index=0,
        value_dtype=tf.int64,
        value_index=tf.lookup.TextFileIndex.LINE_NUMBER,
        delimiter=features.VOCAB_DELIMITER,
    )
    return tf.lookup.StaticHashTable(initializer, default_value=features.OOV_INDEX)


def item_index_lookup(x, vocab_path) -> Tuple[tf.Tensor, tf.Tensor]:
    """``lookup_fn`` for tft.apply_vocabulary: item id -> line number of the vocab."""
    table = item_index_table(vocab_path)
    return table.lookup(x), table.size()


def item_cluster_lookup(x, vocab_path) -> Tuple[tf.Tensor, tf.Tensor]:
    """``lookup_fn`` for tft.apply_vocabulary: item id -> cluster (second column).

    The value is read as the whole line and the cluster cut from it, because
    TFT's placeholder asset during analysis has a single column.
    """
    initializer = tf.lookup.TextFileInitializer(
        vocab_path,
        key_dtype=tf.string,
        key_index=0,
        value_dtype=tf.string,
        value_index=tf.lookup.TextFileIndex.WHOLE_LINE,
        delimiter=features.VOCAB_DELIMITER,
    )
    default = f"{features.VOCAB_DELIMITER}{features.OOV_INDEX}"
    table = tf.lookup.StaticHashTable(initializer, default_value=default)

    def to_cluster(lines: tf.Tensor) -> tf.Tensor:
        column = tf.strings.regex_replace(lines, f"^.*{features.VOCAB_DELIMITER}", "")
        return tf.strings.to_number(column, out_type=tf.int64)

    return _map_values(to_cluster, table.lookup(x)), table.size()


def preprocessing_fn(inputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Maps raw per-user records to indices (TFT preprocessing_fn)."""
    items = inputs[features.ITEM_IDS]
    clusters = inputs[features.ITEM_CLUSTERS]
    tokens = tf.SparseTensor(
        items.indices,
        tf.strings.join(
            [items.values, tf.strings.as_string(clusters.values)],
            separator=features.VOCAB_DELIMITER,
        ),
        items.dense_shape,
    )
    vocab = tft.vocabulary(tokens, vocab_filename=features.ITEM_CLUSTER_VOCAB)
    tft.vocabulary(
        tf.sparse.map_values(tf.strings.as_string, clusters), vocab_filename=features.CLUSTER_VOCAB
    )
    user_index = tft.compute_and_apply_vocabulary(
        inputs[features.USER_ID],
        vocab_filename=features.USER_VOCAB,
        default_value=features.OOV_INDEX,
    )
    lengths = tf.reshape(
        tf.sparse.reduce_sum(tf.sparse.map_values(tf.ones_like, clusters), axis=1), [-1]
    )
    return {
        features.USER_INDEX: user_index,
        features.SPLIT: inputs[features.SPLIT],
        features.ITEM_INDICES: tft.apply_vocabulary(items, vocab, lookup_fn=item_index_lookup),
        features.CLUSTER_INDICES: tft.apply_vocabulary(items, vocab, lookup_fn=item_cluster_lookup),
        features.TIMESTAMPS: inputs[features.TIMESTAMPS],
        features.SEQUENCE_LENGTH: lengths,
    }
