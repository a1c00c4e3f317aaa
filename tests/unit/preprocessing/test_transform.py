"""The TFT preprocessing_fn on a few records, analysed and applied by a real Beam run."""

import json
import os
import tempfile

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam

from preprocessing import features, transform

RECORDS = [
    {
        features.USER_ID: "u1",
        features.SPLIT: features.TEST,
        features.ITEM_IDS: ["a", "b", "a", "c"],
        features.ITEM_CLUSTERS: [0, 1, 0, 1],
        features.TIMESTAMPS: [1, 2, 3, 4],
    },
    {
        features.USER_ID: "u2",
        features.SPLIT: features.TEST,
        features.ITEM_IDS: ["c", "a", "d"],
        features.ITEM_CLUSTERS: [1, 0, 2],
        features.TIMESTAMPS: [5, 6, 7],
    },
]


@pytest.fixture(scope="module")
def transformed(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tft"))
    rows_file = os.path.join(out, "rows.jsonl")
    with beam.Pipeline() as p, tft_beam.Context(temp_dir=tempfile.mkdtemp()):
        data = p | beam.Create(RECORDS)
        (rows, _), transform_fn = (
            data,
            transform.raw_metadata(),
        ) | tft_beam.AnalyzeAndTransformDataset(transform.preprocessing_fn)
        _ = transform_fn | tft_beam.WriteTransformFn(out)
        _ = (
            rows
            | beam.Map(
                lambda r: json.dumps(
                    {k: np.asarray(v).tolist() for k, v in r.items()}, default=bytes.decode
                )
            )
            | beam.io.WriteToText(rows_file, shard_name_template="")
        )
    with open(rows_file) as f:
        results = [json.loads(line) for line in f]
    return out, results


def test_vocabulary_orders_items_by_frequency_and_carries_clusters(transformed):
    out, _ = transformed
    output = tft.TFTransformOutput(out)
    with open(output.vocabulary_file_by_name(features.ITEM_CLUSTER_VOCAB)) as f:
        lines = [line.rstrip("\n").split(features.VOCAB_DELIMITER) for line in f]
    # a:3, c:2, then b and d once each (ties: TFT orders by token, descending).
    assert lines == [["a", "0"], ["c", "1"], ["d", "2"], ["b", "1"]]


def test_transformed_indices_match_the_vocabulary(transformed):
    _, rows = transformed
    by_len = {int(r[features.SEQUENCE_LENGTH]): r for r in rows}
    np.testing.assert_array_equal(by_len[4][features.ITEM_INDICES], [0, 3, 0, 1])
    np.testing.assert_array_equal(by_len[4][features.CLUSTER_INDICES], [0, 1, 0, 1])
    np.testing.assert_array_equal(by_len[3][features.ITEM_INDICES], [1, 0, 2])
    np.testing.assert_array_equal(by_len[3][features.CLUSTER_INDICES], [1, 0, 2])


def test_serving_layer_maps_unknown_items_to_oov(transformed):
    out, _ = transformed
    layer = tft.TFTransformOutput(out).transform_features_layer()
    raw = {
        features.USER_ID: tf.constant(["u1"]),
        features.SPLIT: tf.constant([features.TEST]),
        features.ITEM_IDS: tf.sparse.from_dense(tf.constant([["d", "unknown", "a"]])),
        features.ITEM_CLUSTERS: tf.sparse.from_dense(tf.constant([[9, 9, 9]], tf.int64)),
        features.TIMESTAMPS: tf.sparse.from_dense(tf.constant([[1, 2, 3]], tf.int64)),
    }
    result = layer(raw)
    items = tf.sparse.to_dense(result[features.ITEM_INDICES]).numpy()
    clusters = tf.sparse.to_dense(result[features.CLUSTER_INDICES]).numpy()
    np.testing.assert_array_equal(items, [[2, features.OOV_INDEX, 0]])
    # The cluster comes from the vocabulary, not from the (wrong) raw input.
    np.testing.assert_array_equal(clusters, [[2, features.OOV_INDEX, 0]])
