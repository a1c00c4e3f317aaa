"""A tiny SavedModel with the serving contract's signatures, and a request builder,
for server tests."""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional

import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2


class TinyModel(tf.Module):
    """serving_default reverses the history; retrieve asserts num_results <= 10."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self._version = version

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="history")])
    def serve(self, history):
        batch = tf.shape(history)[:1]
        return {
            "item_ids": tf.reverse(history, axis=[1]),
            "version": tf.fill(batch, tf.constant(self._version, tf.int64)),
        }

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.string, name="history"),
            tf.TensorSpec([], tf.float32, name="alpha"),
            tf.TensorSpec([], tf.int32, name="num_results"),
        ]
    )
    def retrieve(self, history, alpha, num_results):
        check = tf.debugging.assert_less_equal(num_results, 10, message="num_results must be <= 10")
        with tf.control_dependencies([check]):
            ranks = tf.range(num_results)
        ids = tf.strings.join([f"v{self._version}_", tf.strings.as_string(ranks)])
        return {
            "item_ids": ids[tf.newaxis, :],
            "scores": (alpha * tf.cast(ranks, tf.float32))[tf.newaxis, :],
            "clusters": (ranks % 3)[tf.newaxis, :],
        }


def save_templates(root: str) -> Dict[int, str]:
    """Saves versions 1 and 2 of :class:`TinyModel` under ``root``; returns their paths."""
    paths = {}
    for version in (1, 2):
        module = TinyModel(version)
        path = os.path.join(root, f"v{version}")
        tf.saved_model.save(
            module, path, signatures={"serving_default": module.serve, "retrieve": module.retrieve}
        )
        paths[version] = path
    return paths


def install(
    templates: Dict[int, str], base: str, version: int, as_version: Optional[int] = None
) -> str:
    """Copies a template into base/<version> atomically (temp dir + rename)."""
    os.makedirs(base, exist_ok=True)
    target = os.path.join(base, str(as_version or version))
    tmp = os.path.join(base, f".tmp-{as_version or version}")
    shutil.copytree(templates[version], tmp)
    os.rename(tmp, target)
    return target


def make_request(
    name: str = "m", signature: str = "", version: Optional[int] = None, **inputs: Any
) -> Any:
    """A ``PredictRequest``; inputs are arrays or ready-made ``TensorProto``s."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(
            value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
        )
    return request
