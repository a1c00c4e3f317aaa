"""Warm-up of a loaded version before it serves (as TensorFlow Serving's model warmup).

The first call of each signature of a freshly loaded SavedModel pays for graph optimization
and kernel instantiation: about 1.7 s for ``serving_default`` of a trained dnc model on an idle
2-core machine and more than 5 s when concurrent requests pile up behind it. Without a
warm-up, every hot swap and every restart would stall the first requests that long.

:func:`warm_up` runs before a version becomes AVAILABLE:

* if the version has ``assets.extra/tf_serving_warmup_requests`` (TF Serving's file: a
  TFRecord of ``tensorflow.serving.PredictionLog``), its predict requests are replayed (at
  most :data:`MAX_RECORDS`) and a failing one fails the load, as in TF Serving;
* otherwise every signature is called once with a minimal guessed input (strings ``""``,
  numbers ``1``, unknown dimensions 1); errors of these guesses are only logged.

TensorFlow is imported lazily.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

log = logging.getLogger("dnc.serving")

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_RECORDS = 1000  # TF Serving's limit

Request = Tuple[str, Dict[str, np.ndarray]]


class WarmupError(Exception):
    """A recorded warm-up request failed: the version must not serve."""


def write_warmup_requests(version_dir: str, requests: Sequence[Tuple[str, Mapping]]) -> str:
    """Writes ``(signature name, inputs)`` pairs as TF Serving's warm-up file.

    Returns:
        The file's path.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in requests:
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            record = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(record.SerializeToString())
    return path


def read_warmup_requests(version_dir: str) -> List[Request]:
    """The predict requests of a version's warm-up file ([] if it has none).

    Raises:
        WarmupError: for an unreadable file or record.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    if not os.path.isfile(path):
        return []
    out: List[Request] = []
    try:
        for raw in tf.data.TFRecordDataset(path).take(MAX_RECORDS):
            record = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
            if record.WhichOneof("log_type") != "predict_log":
                log.warning("%s: skipping a %s record", path, record.WhichOneof("log_type"))
                continue
            request = record.predict_log.request
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            out.append((request.model_spec.signature_name, inputs))
    except Exception as e:  # a corrupt file: the version is not served
        raise WarmupError(f"cannot read {WARMUP_FILE}: {type(e).__name__}: {e}") from e
    return out


def guessed_requests(signatures: Mapping[str, Any]) -> List[Request]:
    """One minimal request per signature (``SignatureInfo`` by name)."""
    out: List[Request] = []
    for name, info in sorted(signatures.items()):
        inputs = {}
        for key, spec in info.inputs.items():
            if spec.shape.rank is None:
                break
            shape = [1 if d is None else d for d in spec.shape.as_list()]
            if spec.dtype.name == "string":
                inputs[key] = np.full(shape, b"", dtype=object)
            elif spec.dtype.is_integer or spec.dtype.is_floating:
                inputs[key] = np.ones(shape, dtype=spec.dtype.as_numpy_dtype)
            else:
                break
        else:
            out.append((name, inputs))
    return out


def _call(signatures: Mapping[str, Any], name: str, inputs: Mapping[str, np.ndarray]) -> None:
    import tensorflow as tf

    info = signatures[name or "serving_default"]
    info.fn(**{k: tf.constant(v, dtype=info.inputs[k].dtype) for k, v in inputs.items()})


def warm_up(loaded: Any) -> int:
    """Calls the signatures of a ``LoadedVersion`` once before it serves.

    Returns:
        The number of warm-up calls that succeeded.

    Raises:
        WarmupError: when a request of the version's warm-up file fails.
    """
    recorded = read_warmup_requests(loaded.path)
    done = 0
    for name, inputs in recorded:
        try:
            _call(loaded.signatures, name, inputs)
        except Exception as e:
            raise WarmupError(
                f"warm-up request for signature {name or 'serving_default'!r} failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        done += 1
    if recorded:
        return done
    for name, inputs in guessed_requests(loaded.signatures):
        try:
            _call(loaded.signatures, name, inputs)
            done += 1
        except Exception as e:  # noqa: BLE001  (a guessed input may be invalid for the model)
            log.warning("model %s: warm-up of %s failed, serving it cold: %s", loaded.name, name, e)
    return done
