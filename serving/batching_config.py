"""``--batching_parameters_file``: TF Serving's ``BatchingParameters`` text proto.

The file has TF Serving's format (``tensorflow.serving.BatchingParameters`` of
``session_bundle_config.proto``, protobuf text format), e.g.::

    max_batch_size { value: 32 }
    batch_timeout_micros { value: 2000 }
    max_enqueued_batches { value: 100 }
    num_batch_threads { value: 2 }

It is parsed with ``google.protobuf.text_format`` into that message: the generated class when
``tensorflow_serving.servables.tensorflow.session_bundle_config_pb2`` is importable (the
``tensorflow-serving-api`` wheel does not ship it), else the same message (same field names,
numbers and wrapper types) built at first use in a private descriptor pool, so the syntax,
comments and error messages are protobuf's own. Unknown fields are errors. Fields that
TF Serving has but that have no effect here (``thread_pool_name``, ``allowed_batch_sizes``,
``pad_variable_length_inputs``, ``enable_large_batch_splitting``,
``max_execution_batch_size``) are accepted and reported in
:attr:`BatchingParameters.ignored`.

Nothing is built at import time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Tuple

# TF Serving's defaults (BasicBatchScheduler::Options) for fields the file leaves unset;
# num_batch_threads defaults to the number of CPUs.
DEFAULT_MAX_BATCH_SIZE = 1000
DEFAULT_BATCH_TIMEOUT_MICROS = 0
DEFAULT_MAX_ENQUEUED_BATCHES = 10

_PACKAGE = "tensorflow.serving"
_MESSAGE = "BatchingParameters"
# (name, number, type, label, wrapper type or None): session_bundle_config.proto's fields.
_INT64, _BOOL = 3, 8  # FieldDescriptorProto.Type
_MESSAGE_TYPE = 11
_OPTIONAL, _REPEATED = 1, 3
_FIELDS = (
    ("max_batch_size", 1, _MESSAGE_TYPE, _OPTIONAL, ".google.protobuf.Int64Value"),
    ("batch_timeout_micros", 2, _MESSAGE_TYPE, _OPTIONAL, ".google.protobuf.Int64Value"),
    ("max_enqueued_batches", 3, _MESSAGE_TYPE, _OPTIONAL, ".google.protobuf.Int64Value"),
    ("num_batch_threads", 4, _MESSAGE_TYPE, _OPTIONAL, ".google.protobuf.Int64Value"),
    ("thread_pool_name", 5, _MESSAGE_TYPE, _OPTIONAL, ".google.protobuf.StringValue"),
    ("allowed_batch_sizes", 6, _INT64, _REPEATED, None),
    ("pad_variable_length_inputs", 7, _BOOL, _OPTIONAL, None),
    ("enable_large_batch_splitting", 8, _BOOL, _OPTIONAL, None),
    ("max_execution_batch_size", 9, _MESSAGE_TYPE, _OPTIONAL, ".google.protobuf.Int64Value"),
)
_USED = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """Settings of the request batcher (:mod:`serving.batching`).

    Attributes:
        max_batch_size: most rows (summed over the requests) in one graph call; a request
            with more rows than this runs as a batch of its own.
        batch_timeout_micros: longest time the first request of a batch waits for others
            (0: a batch runs as soon as a batch thread is free, so requests only share a
            call when they arrive while every thread is busy).
        max_enqueued_batches: most batches waiting per queue (one queue per model version,
            signature and scalar inputs); a request that would need one more is answered
            UNAVAILABLE.
        num_batch_threads: threads running batches (graph calls in parallel).
        ignored: fields set in the file that have no effect in this server.
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_timeout_micros: int = DEFAULT_BATCH_TIMEOUT_MICROS
    max_enqueued_batches: int = DEFAULT_MAX_ENQUEUED_BATCHES
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    ignored: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, low in (
            ("max_batch_size", 1),
            ("batch_timeout_micros", 0),
            ("max_enqueued_batches", 1),
            ("num_batch_threads", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    @property
    def batch_timeout_seconds(self) -> float:
        """``batch_timeout_micros`` in seconds."""
        return self.batch_timeout_micros / 1e6


@functools.lru_cache(maxsize=1)
def batching_parameters_class() -> Any:
    """The ``tensorflow.serving.BatchingParameters`` message class (see the module doc)."""
    try:
        from tensorflow_serving.servables.tensorflow import session_bundle_config_pb2
    except ImportError:
        pass
    else:
        return session_bundle_config_pb2.BatchingParameters
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="dnc/batching_parameters.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=[wrappers.name],
    )
    message = file.message_type.add(name=_MESSAGE)
    for name, number, kind, label, type_name in _FIELDS:
        field = message.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{_MESSAGE}"))


def parse_batching_parameters(text: str, source: str = "batching parameters") -> BatchingParameters:
    """Parses a ``BatchingParameters`` text proto.

    Args:
        text: the file's contents.
        source: where it came from (for messages), e.g. the path.

    Returns:
        The parameters, TF Serving's defaults for unset fields.

    Raises:
        ValueError: a syntax error or unknown field (protobuf's message, with line and
            column), or a value out of range.
    """
    from google.protobuf import text_format

    message = batching_parameters_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ValueError(
            f"{source}: not a valid BatchingParameters text proto: {e} "
            "(expected e.g. 'max_batch_size { value: 32 }')"
        ) from e
    values = {}
    for name in _USED:
        if message.HasField(name):
            values[name] = int(getattr(message, name).value)
    ignored = tuple(name for name, *_ in _FIELDS if name not in _USED and _is_set(message, name))
    try:
        return BatchingParameters(**values, ignored=ignored)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _is_set(message: Any, name: str) -> bool:
    value = getattr(message, name)
    if isinstance(value, bool):
        return value
    if hasattr(value, "__len__") and not hasattr(value, "ByteSize"):
        return len(value) > 0
    return message.HasField(name)


def load_batching_parameters(path: str) -> BatchingParameters:
    """Reads and parses ``--batching_parameters_file``.

    Raises:
        ValueError: the file cannot be read or is invalid (the message names the path).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeError) as e:
        raise ValueError(f"cannot read --batching_parameters_file {path}: {e}") from e
    return parse_batching_parameters(text, f"--batching_parameters_file {path}")
