"""Per-request resource bounds of the server and their checks.

Bounds (``dnc serve`` flags): request size in bytes (gRPC message / REST body), total input
elements, history length per row, the exported model's ``max_num_results``, and a
per-request deadline (the server's ``--request_timeout_seconds``, tightened by a gRPC
client's own deadline). Each exceeded bound is a :class:`~serving.errors.ServingError` with a
message naming the value and the limit.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Mapping, Optional

import numpy as np

from serving.errors import deadline_exceeded, invalid

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_REQUEST_ELEMENTS = 4_000_000
DEFAULT_MAX_HISTORY_LENGTH = 2048
DEFAULT_REQUEST_TIMEOUT_SECONDS = 30.0

HISTORY_INPUT = "history"  # string [B, n]: n is the history length of every row
EXAMPLES_INPUT = "examples"  # string [B]: serialized tf.Example with a bytes list `history`
NUM_RESULTS_INPUT = "num_results"


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """The resource bounds applied to every request.

    Attributes:
        max_request_bytes: largest gRPC message / REST body.
        max_elements: largest total number of input elements.
        max_history_length: largest history length (``history`` columns, or items in one
            serialized example's ``history`` feature).
        timeout_seconds: longest time the server spends on a request (<= 0: no server-side
            limit; a gRPC client's deadline still applies).
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_elements: int = DEFAULT_MAX_REQUEST_ELEMENTS
    max_history_length: int = DEFAULT_MAX_HISTORY_LENGTH
    timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_elements", "max_history_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if math.isnan(self.timeout_seconds):
            raise ValueError("timeout_seconds must be a number (<= 0 disables it), got nan")

    def deadline(self, client_remaining: Optional[float] = None) -> Deadline:
        """Starts the clock of one request.

        Args:
            client_remaining: seconds left of the client's own deadline (None: none).
        """
        server = self.timeout_seconds if self.timeout_seconds > 0 else None
        if client_remaining is not None and (server is None or client_remaining <= server):
            return Deadline(client_remaining, "the client's deadline")
        if server is not None:
            return Deadline(server, "the server's --request_timeout_seconds")
        return Deadline(None)


class Deadline:
    """The time by which one request must be answered.

    Args:
        budget: seconds from now (None: no deadline).
        source: which bound set it (for messages).
    """

    def __init__(self, budget: Optional[float], source: str = "") -> None:
        self.budget = budget
        self.source = source
        self._end = None if budget is None else time.monotonic() + budget

    def remaining(self) -> Optional[float]:
        """Seconds left (negative once passed), or None without a deadline."""
        return None if self._end is None else self._end - time.monotonic()

    def check(self, stage: str) -> None:
        """Raises DEADLINE_EXCEEDED if the deadline has passed.

        Args:
            stage: where the request was (for the message), e.g. "before running the model".

        Raises:
            ServingError: DEADLINE_EXCEEDED.
        """
        left = self.remaining()
        if left is not None and left <= 0:
            raise deadline_exceeded(
                f"deadline exceeded {stage}: {self.source} allowed {max(self.budget, 0):.3f}s"
            )


def check_history_lengths(inputs: Mapping[str, np.ndarray], limit: int) -> None:
    """Rejects histories longer than ``limit`` items.

    ``history`` is checked by its last dimension (padding counts: it is what the model
    processes); each serialized example of ``examples`` by its ``history`` feature.

    Raises:
        ServingError: INVALID_ARGUMENT naming the length and the limit.
    """
    history = inputs.get(HISTORY_INPUT)
    if history is not None and history.ndim >= 2 and history.shape[-1] > limit:
        raise invalid(
            f"input {HISTORY_INPUT!r} has rows of length {history.shape[-1]}, more than "
            f"the limit of {limit} (--max_history_length)"
        )
    examples = inputs.get(EXAMPLES_INPUT)
    if examples is not None and examples.dtype.kind in "OS":
        from google.protobuf.message import DecodeError
        from tensorflow.core.example import example_pb2

        for i, serialized in enumerate(examples.reshape(-1)):
            if not isinstance(serialized, bytes):
                continue
            try:
                example = example_pb2.Example.FromString(serialized)
            except DecodeError as e:
                raise invalid(f"{EXAMPLES_INPUT}[{i}] is not a serialized tf.Example: {e}") from e
            feature = example.features.feature.get(HISTORY_INPUT)
            length = 0 if feature is None else len(feature.bytes_list.value)
            if length > limit:
                raise invalid(
                    f"{EXAMPLES_INPUT}[{i}] has a history of length {length}, more than the "
                    f"limit of {limit} (--max_history_length)"
                )


def check_num_results(inputs: Mapping[str, np.ndarray], maximum: Optional[int]) -> None:
    """Checks a scalar integer ``num_results`` against ``[0, maximum]`` before running.

    Args:
        inputs: the request's input arrays.
        maximum: the model's ``max_num_results`` (None: unknown, only the sign is checked;
            the model's own check still applies).

    Raises:
        ServingError: INVALID_ARGUMENT naming the value and the limit.
    """
    value = inputs.get(NUM_RESULTS_INPUT)
    if value is None or value.ndim != 0 or value.dtype.kind not in "iu":
        return
    n = int(value)
    if n < 0:
        raise invalid(f"num_results must be >= 0, got {n}")
    if maximum is not None and n > maximum:
        raise invalid(f"num_results {n} exceeds this model's max_num_results {maximum}")


_TF_NOISE = (
    re.compile(r"\{\{function_node [^}]*\}\}\s*"),
    re.compile(r"\s*\[\[\{\{.*?\}\}\]\]"),
    re.compile(r"\s*\[Op:[^\]]*\]"),
    re.compile(r"Graph execution error:\s*"),
    re.compile(r"Detected at node .*?\n(<stack traces unavailable>\n)?"),
)


def clean_tf_message(message: str) -> str:
    """Strips graph node names, op names and stack-trace headers from a TF error message."""
    for pattern in _TF_NOISE:
        message = pattern.sub("", message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines) or "the model rejected the inputs"
