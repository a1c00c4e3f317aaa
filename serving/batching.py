"""Server-side request batching (``dnc serve --enable_batching``), as TF Serving's.

Concurrent Predict requests (gRPC or REST) for the same model version and signature, with
the same scalar inputs (``alpha``, ``num_results``: one value per graph call), are queued
and run as one graph call: their inputs are concatenated along the batch axis, the
signature is called once and its outputs are cut back into one response per request. The
queueing rules are TF Serving's (:mod:`serving.batch_scheduler`); the settings come from
``--batching_parameters_file`` (:mod:`serving.batching_config`).

Inputs of different widths: for the project's exports (a version with
``assets.extra/dnc_metadata.json``) ``history`` and ``exclude`` rows are padded on the
right with ``""`` and ``clusters`` rows with ``-1``, the padding values of the SavedModel
contract, which the graph drops (``history`` is compacted and right-aligned before the
towers, padding never counts against ``max_exclude``, a row of ``-1`` allows every cluster),
so each request's result is the one it gets alone. Other inputs, and every input of other
SavedModels, are not padded: requests of different shapes go to different batches.

Per-request errors stay per request: each request is validated (dtype, rank, limits,
``num_results``) before it is queued, a request whose inputs disagree on the batch size is
run alone, and when a batched call fails (an invalid value only the graph detects, such as
an unknown cluster id) or its outputs do not have one row per input row, the requests of
that batch are run one by one, so only the bad one gets its INVALID_ARGUMENT. A full queue is
answered UNAVAILABLE (as TF Serving), a request that waits past its deadline
DEADLINE_EXCEEDED.

Each row must be computed independently of the other rows of its batch, as with TF
Serving's batching; the exported retrieval graph is (tests/integration/test_batching.py).
"""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from serving.batch_scheduler import BatchScheduler, QueueFullError, SchedulerStoppedError
from serving.batching_config import BatchingParameters
from serving.errors import Code, ServingError, deadline_exceeded
from serving.limits import Deadline

log = logging.getLogger("dnc.serving")

# Padding values of the export's [B, width] inputs (the SavedModel contract).
PAD_VALUES: Mapping[str, Any] = {"history": b"", "exclude": b"", "clusters": -1}

Inputs = Mapping[str, np.ndarray]
Outputs = Dict[str, np.ndarray]


def _pad_value(name: str, array: np.ndarray, pad: bool) -> Optional[Any]:
    """The value that pads ``array``'s rows, or None when it is not padded."""
    if not pad or array.ndim != 2 or name not in PAD_VALUES:
        return None
    value = PAD_VALUES[name]
    is_string = array.dtype.kind in "OSU"
    return value if isinstance(value, bytes) == is_string else None


def batch_key(inputs: Inputs, pad: bool) -> Optional[Tuple[int, Tuple[Hashable, ...]]]:
    """The rows of one request and what its batch-mates must share with it.

    Args:
        inputs: the request's (validated) input arrays.
        pad: whether the contract's padded inputs may differ in width.

    Returns:
        ``(rows, key)``: the scalar inputs' values and the shapes that cannot be padded;
        None when the request cannot be batched (no batch dimension, zero rows, or inputs
        that disagree on the batch size).
    """
    rows: Optional[int] = None
    parts: List[Hashable] = []
    for name in sorted(inputs):
        array = inputs[name]
        if array.ndim == 0:
            value = array.item() if array.dtype.kind in "OSU" else array.tobytes()
            if not isinstance(value, (bytes, str)):
                return None
            parts.append((name, array.dtype.str, value))
            continue
        if rows is None:
            rows = int(array.shape[0])
        elif array.shape[0] != rows:
            return None
        padded = _pad_value(name, array, pad) is not None
        parts.append((name, "padded" if padded else tuple(array.shape[1:])))
    if not rows:
        return None
    return rows, tuple(parts)


def _padded(array: np.ndarray, width: int, value: Any) -> np.ndarray:
    if array.shape[1] == width:
        return array
    extra = np.full((array.shape[0], width - array.shape[1]), value, dtype=array.dtype)
    return np.concatenate([array, extra], axis=1)


def merge_inputs(requests: Sequence[Inputs], pad: bool) -> Dict[str, np.ndarray]:
    """Concatenates requests of one batch key along the batch axis (padding as documented).

    Scalars are taken from the first request (the key makes them equal).
    """
    merged: Dict[str, np.ndarray] = {}
    for name, first in requests[0].items():
        if first.ndim == 0:
            merged[name] = first
            continue
        arrays = [r[name] for r in requests]
        if first.dtype.kind in "OSU":
            arrays = [a if a.dtype == object else a.astype(object) for a in arrays]
        value = _pad_value(name, first, pad)
        if value is not None:
            width = max(a.shape[1] for a in arrays)
            arrays = [_padded(a, width, value) for a in arrays]
        merged[name] = np.concatenate(arrays, axis=0)
    return merged


def split_outputs(outputs: Outputs, sizes: Sequence[int]) -> Optional[List[Outputs]]:
    """Cuts batched outputs into one dict per request (None: an output is not [rows, ...])."""
    total = sum(sizes)
    if any(v.ndim == 0 or v.shape[0] != total for v in outputs.values()):
        return None
    bounds = np.cumsum([0, *sizes])
    return [
        {k: v[start:end] for k, v in outputs.items()}
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _rows(inputs: Inputs) -> int:
    return next(int(a.shape[0]) for a in inputs.values() if a.ndim > 0)


class RequestBatcher:
    """Batches the signature calls of :class:`~serving.loaded_version.LoadedVersion`.

    Args:
        params: the batching settings.
    """

    def __init__(self, params: BatchingParameters) -> None:
        self.params = params
        self._scheduler = BatchScheduler(
            self._process,
            max_batch_size=params.max_batch_size,
            batch_timeout=params.batch_timeout_seconds,
            max_enqueued_batches=params.max_enqueued_batches,
            num_threads=params.num_batch_threads,
            name="batch",
        )

    @property
    def batches_run(self) -> int:
        """Batches run so far (each one or more graph calls)."""
        return self._scheduler.batches_run

    def stats(self) -> Dict[str, float]:
        """Batches and requests run so far, and the mean requests per batch."""
        batches, tasks = self._scheduler.batches_run, self._scheduler.tasks_run
        return {
            "batches": batches,
            "requests": tasks,
            "requests_per_batch": round(tasks / batches, 2) if batches else 0.0,
        }

    def queued_batches(self) -> int:
        """Batches waiting for a batch thread, over every queue."""
        return self._scheduler.queued_batches()

    def start(self) -> None:
        """Starts the batch threads."""
        self._scheduler.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Runs what is queued (up to ``timeout`` s) and stops; later requests: UNAVAILABLE."""
        self._scheduler.stop(timeout)

    def run(self, loaded: Any, sig: Any, inputs: Inputs, deadline: Optional[Deadline]) -> Outputs:
        """Runs one validated request through a batch; returns all its outputs.

        Args:
            loaded: the ``LoadedVersion`` (its ``invoke`` makes the graph calls).
            sig: the ``SignatureInfo`` to call.
            inputs: the request's validated input arrays.
            deadline: how long the request may wait (None: no limit).

        Raises:
            ServingError: the request's own error, UNAVAILABLE when its queue is full or
                batching has stopped, DEADLINE_EXCEEDED when it waited too long.
        """
        plan = batch_key(inputs, loaded.is_export)
        if plan is None:
            return loaded.invoke(sig, inputs)
        rows, parts = plan
        where = f"model {loaded.name!r} version {loaded.version} signature {sig.name!r}"
        try:
            future = self._scheduler.submit((loaded, sig.name, parts), dict(inputs), rows)
        except QueueFullError as e:
            raise ServingError(
                Code.UNAVAILABLE,
                f"the batch queue of {where} is full: {e}; retry later, or raise "
                "max_enqueued_batches in --batching_parameters_file",
            ) from e
        except SchedulerStoppedError as e:
            raise ServingError(Code.UNAVAILABLE, f"request batching: {e}") from e
        try:
            return future.result(None if deadline is None else max(0.0, deadline.remaining()))
        except futures.TimeoutError:
            future.cancel()
            raise deadline_exceeded(
                f"deadline exceeded waiting for a batch of {where}: {deadline.source} "
                f"allowed {max(deadline.budget, 0):.3f}s"
            ) from None
        except SchedulerStoppedError as e:
            raise ServingError(Code.UNAVAILABLE, f"request batching: {e}") from e

    def _process(self, key: Hashable, payloads: Sequence[Inputs]) -> List[Any]:
        loaded, name, _ = key
        sig = loaded.signatures[name]
        if len(payloads) == 1:
            return [self._alone(loaded, sig, payloads[0])]
        try:
            outputs = loaded.invoke(sig, merge_inputs(payloads, loaded.is_export))
        except ServingError as e:
            log.info(
                "a batch of %d requests for %s v%d %s failed (%s: %s); running them one by one",
                len(payloads), loaded.name, loaded.version, name, e.code.value, e.message,
            )  # fmt: skip
            return [self._alone(loaded, sig, p) for p in payloads]
        parts = split_outputs(outputs, [_rows(p) for p in payloads])
        if parts is None:
            log.debug("outputs of %s are not one row per input row: unbatched", name)
            return [self._alone(loaded, sig, p) for p in payloads]
        return parts

    @staticmethod
    def _alone(loaded: Any, sig: Any, inputs: Inputs) -> Any:
        try:
            return loaded.invoke(sig, inputs)
        except ServingError as e:
            return e
