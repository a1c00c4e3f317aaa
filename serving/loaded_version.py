"""One loaded version of a model: its signatures, input validation and inference.

Inputs are checked against the signature (dtype, rank, static dimensions) and the request
limits (:mod:`serving.limits`) before any tensor is built; errors raised by the model become
:class:`~serving.errors.ServingError` statuses with messages free of graph internals.

TensorFlow is imported lazily so that importing this module has no side effects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from serving.errors import Code, ServingError, invalid, not_found
from serving.limits import (
    Deadline,
    RequestLimits,
    check_history_lengths,
    check_num_results,
    clean_tf_message,
)
from serving.model_config import METADATA_DIR, METADATA_FILE

log = logging.getLogger("dnc.serving")

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    """A callable signature with its input and output specs (``tf.TensorSpec``)."""

    name: str
    fn: Any
    inputs: Mapping[str, Any]
    outputs: Mapping[str, Any]


def _signature_infos(obj: Any) -> Dict[str, SignatureInfo]:
    import tensorflow as tf

    infos: Dict[str, SignatureInfo] = {}
    signatures = getattr(obj, "signatures", None) or {}
    for name, fn in signatures.items():
        _, kwargs = fn.structured_input_signature
        inputs = {k: v for k, v in kwargs.items() if isinstance(v, tf.TensorSpec)}
        outputs = {k: tf.TensorSpec(v.shape, v.dtype, k) for k, v in fn.structured_outputs.items()}
        infos[name] = SignatureInfo(name, fn, inputs, outputs)
    return infos


def check_input(spec: Any, name: str, array: np.ndarray) -> None:
    """Checks an input array against its ``tf.TensorSpec`` (dtype, rank, static dims).

    Raises:
        ServingError: INVALID_ARGUMENT on mismatch.
    """
    import tensorflow as tf

    if array.dtype.kind in "OSU":
        dtype = tf.string
    else:
        try:
            dtype = tf.as_dtype(array.dtype)
        except TypeError as e:
            raise invalid(f"input {name!r}: unsupported dtype {array.dtype}") from e
    if dtype != spec.dtype:
        raise invalid(f"input {name!r}: expects dtype {spec.dtype.name}, got {dtype.name}")
    rank = spec.shape.rank
    if rank is not None and array.ndim != rank:
        raise invalid(
            f"input {name!r}: expects rank {rank} (shape {spec.shape}), "
            f"got rank {array.ndim} (shape {list(array.shape)})"
        )
    if not spec.shape.is_compatible_with(array.shape):
        raise invalid(
            f"input {name!r}: shape {list(array.shape)} is not compatible with {spec.shape}"
        )


class LoadedVersion:
    """One loaded version of a model; immutable and safe to call from many threads.

    Args:
        name: the model name.
        version: the version number.
        path: the version directory.
        obj: the loaded SavedModel.
        batcher: a ``serving.batching.RequestBatcher`` that :meth:`run` sends validated
            requests through (None: every request is its own graph call).
    """

    def __init__(
        self, name: str, version: int, path: str, obj: Any, batcher: Optional[Any] = None
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.obj = obj
        self.signatures = _signature_infos(obj)
        self.max_num_results = _max_num_results(name, path)
        # A dnc export: its history/exclude/clusters inputs follow the contract's padding.
        self.is_export = os.path.isfile(os.path.join(path, METADATA_DIR, METADATA_FILE))
        self.batcher = batcher
        self._runs = 0
        self._runs_lock = threading.Lock()

    @property
    def runs(self) -> int:
        """How many times a signature of this version has been called (a batch of
        requests is one call)."""
        return self._runs

    def signature(self, signature_name: str) -> SignatureInfo:
        """Returns a signature by name ("" means ``serving_default``).

        Raises:
            ServingError: NOT_FOUND for an unknown signature.
        """
        key = signature_name or DEFAULT_SIGNATURE
        info = self.signatures.get(key)
        if info is None:
            raise not_found(
                f"model {self.name!r} version {self.version} has no signature {key!r} "
                f"(available: {sorted(self.signatures)})"
            )
        return info

    def run(
        self,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Sequence[str] = (),
        limits: Optional[RequestLimits] = None,
        deadline: Optional[Deadline] = None,
    ) -> Dict[str, np.ndarray]:
        """Validates ``inputs`` against the signature and the limits, calls it.

        Args:
            signature_name: "" for ``serving_default``.
            inputs: input arrays by name.
            output_filter: outputs to return (empty: all).
            limits: resource bounds (default: :class:`RequestLimits`'s defaults).
            deadline: checked before and after the call (a running call is not interrupted:
                TensorFlow cannot cancel it, but a late answer is replaced by the error).

        Returns:
            numpy outputs by name.

        Raises:
            ServingError: INVALID_ARGUMENT for bad inputs, exceeded bounds or model-raised
                argument errors, NOT_FOUND for an unknown signature, DEADLINE_EXCEEDED,
                UNAVAILABLE when the batch queue is full (with a batcher), INTERNAL for
                other failures.
        """
        limits = limits or RequestLimits()
        sig = self.signature(signature_name)
        missing = sorted(set(sig.inputs) - set(inputs))
        if missing:
            raise invalid(f"missing input(s) {missing} for signature {sig.name!r}")
        unknown = sorted(set(inputs) - set(sig.inputs))
        if unknown:
            raise invalid(
                f"unknown input(s) {unknown} for signature {sig.name!r} "
                f"(expects {sorted(sig.inputs)})"
            )
        bad_filter = sorted(set(output_filter) - set(sig.outputs))
        if bad_filter:
            raise invalid(f"output_filter names unknown output(s) {bad_filter}")
        total = 0
        for key, array in inputs.items():
            check_input(sig.inputs[key], key, array)
            total += int(array.size)
        if total > limits.max_elements:
            raise invalid(
                f"request has {total} elements, more than the limit of {limits.max_elements} "
                "(--max_request_elements)"
            )
        check_history_lengths(inputs, limits.max_history_length)
        check_num_results(inputs, self.max_num_results)
        if deadline is not None:
            deadline.check("before running the model")
        if self.batcher is not None:
            result = self.batcher.run(self, sig, inputs, deadline)
        else:
            result = self.invoke(sig, inputs)
        if deadline is not None:
            deadline.check("while running the model")
        wanted = set(output_filter) or set(result)
        return {k: v for k, v in result.items() if k in wanted}

    def invoke(self, sig: SignatureInfo, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Calls a signature once on validated inputs (see :meth:`run`); all its outputs.

        Raises:
            ServingError: INVALID_ARGUMENT for model-raised argument errors,
                RESOURCE_EXHAUSTED, INTERNAL for other failures.
        """
        import tensorflow as tf

        with self._runs_lock:
            self._runs += 1
        try:
            tensors = {k: tf.constant(v, dtype=sig.inputs[k].dtype) for k, v in inputs.items()}
            result = sig.fn(**tensors)
        except (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
            raise invalid(f"rejected by the model: {clean_tf_message(e.message)}") from e
        except (TypeError, ValueError, UnicodeError) as e:
            raise invalid(f"inputs rejected by signature {sig.name!r}: {e}") from e
        except tf.errors.ResourceExhaustedError as e:
            raise ServingError(
                Code.RESOURCE_EXHAUSTED, f"out of resources: {clean_tf_message(e.message)}"
            ) from e
        except tf.errors.OpError as e:
            log.exception("model %s v%d failed", self.name, self.version)
            raise ServingError(
                Code.INTERNAL, f"{type(e).__name__}: {clean_tf_message(e.message)}"
            ) from e
        return {k: v.numpy() for k, v in result.items()}


def _max_num_results(name: str, path: str) -> Optional[int]:
    """The ``max_num_results`` recorded in an export's metadata (None if absent)."""
    metadata_path = os.path.join(path, METADATA_DIR, METADATA_FILE)
    if not os.path.isfile(metadata_path):
        return None
    try:
        with open(metadata_path, encoding="utf-8") as f:
            value = json.load(f).get("max_num_results")
    except (OSError, ValueError, AttributeError) as e:
        log.warning("model %s: ignoring unreadable %s: %s", name, metadata_path, e)
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        log.warning("model %s: ignoring max_num_results=%r in %s", name, value, metadata_path)
        return None
    return value
