"""A batch scheduler with TF Serving's queueing rules (``SharedBatchScheduler``).

Tasks are submitted under a key (one queue per key). A queue holds batches: new tasks join
its last batch while it has room (``max_batch_size`` rows), else open a new batch; a queue
never holds more than ``max_enqueued_batches`` batches, and a task that would need one more
is refused (:class:`QueueFullError`), so nothing queues without bound. ``num_threads``
threads take the oldest batch that is ready: full, followed by a newer batch, or older than
``batch_timeout`` seconds (0: ready at once, so tasks only share a batch when they arrive
while every thread is busy). A batch keeps taking tasks until a thread takes it.

The scheduler knows nothing about models: ``process(key, payloads)`` runs one batch and
returns one result per payload (an ``Exception`` instance fails that task alone).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent import futures
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

log = logging.getLogger("dnc.serving")

Process = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFullError(Exception):
    """A task was refused: its queue already holds ``max_enqueued_batches`` batches."""


class SchedulerStoppedError(Exception):
    """A task was submitted to (or left in) a stopped scheduler."""


@dataclasses.dataclass
class _Task:
    payload: Any
    size: int
    future: futures.Future


@dataclasses.dataclass
class _Batch:
    key: Hashable
    created: float
    tasks: List[_Task] = dataclasses.field(default_factory=list)
    size: int = 0
    full: bool = False


class BatchScheduler:
    """Queues tasks per key and runs them in batches on a pool of threads.

    Args:
        process: runs one batch (see the module docstring).
        max_batch_size: most rows per batch (a bigger task is a batch of its own).
        batch_timeout: seconds the first task of a batch waits for more.
        max_enqueued_batches: most batches waiting per key.
        num_threads: threads running batches.
        name: thread name prefix.
    """

    def __init__(
        self,
        process: Process,
        max_batch_size: int,
        batch_timeout: float,
        max_enqueued_batches: int,
        num_threads: int,
        name: str = "batch",
    ) -> None:
        if max_batch_size < 1 or max_enqueued_batches < 1 or num_threads < 1:
            raise ValueError("max_batch_size, max_enqueued_batches and num_threads must be >= 1")
        if batch_timeout < 0:
            raise ValueError(f"batch_timeout must be >= 0, got {batch_timeout}")
        self._process = process
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.max_enqueued_batches = max_enqueued_batches
        self.num_threads = num_threads
        self._name = name
        self._cond = threading.Condition()
        self._queues: Dict[Hashable, Deque[_Batch]] = {}
        self._threads: List[threading.Thread] = []
        self._stopping = False
        self.batches_run = 0
        self.tasks_run = 0

    def start(self) -> None:
        """Starts the batch threads (once)."""
        with self._cond:
            if self._threads or self._stopping:
                return
            for i in range(self.num_threads):
                t = threading.Thread(target=self._loop, name=f"{self._name}-{i}", daemon=True)
                self._threads.append(t)
                t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuses new tasks, runs the queued ones, then stops the threads.

        Tasks still queued after ``timeout`` seconds fail with
        :class:`SchedulerStoppedError`.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            threads = list(self._threads)
        end = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        with self._cond:
            left = [task for q in self._queues.values() for b in q for task in b.tasks]
            self._queues.clear()
        for task in left:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(SchedulerStoppedError("the server is stopping"))

    def queued_batches(self, key: Optional[Hashable] = None) -> int:
        """Batches waiting under ``key`` (None: under every key), not yet taken by a thread."""
        with self._cond:
            if key is None:
                return sum(len(q) for q in self._queues.values())
            return len(self._queues.get(key, ()))

    def submit(self, key: Hashable, payload: Any, size: int) -> futures.Future:
        """Queues one task of ``size`` rows; returns its future.

        Raises:
            QueueFullError: the key's queue holds ``max_enqueued_batches`` batches and the
                task fits in none of them.
            SchedulerStoppedError: after :meth:`stop`, or before :meth:`start`.
        """
        task = _Task(payload, size, futures.Future())
        with self._cond:
            if self._stopping or not self._threads:
                raise SchedulerStoppedError("the batch scheduler is not running")
            queue = self._queues.setdefault(key, collections.deque())
            batch = queue[-1] if queue else None
            if batch is None or batch.full or batch.size + size > self.max_batch_size:
                if len(queue) >= self.max_enqueued_batches:
                    raise QueueFullError(
                        f"{len(queue)} batches already waiting (max_enqueued_batches="
                        f"{self.max_enqueued_batches}, max_batch_size={self.max_batch_size})"
                    )
                batch = _Batch(key, time.monotonic())
                queue.append(batch)
            batch.tasks.append(task)
            batch.size += size
            batch.full = batch.size >= self.max_batch_size
            self._cond.notify_all()
        return task.future

    def _take(self) -> Tuple[Optional[_Batch], Optional[float]]:
        """The oldest ready batch (removed from its queue), else the time to wait."""
        now = time.monotonic()
        best: Optional[Tuple[float, Hashable]] = None
        wait: Optional[float] = None
        for key, queue in self._queues.items():
            front = queue[0]
            due = front.created + self.batch_timeout
            if front.full or len(queue) > 1 or due <= now or self._stopping:
                if best is None or front.created < best[0]:
                    best = (front.created, key)
            else:
                wait = due - now if wait is None else min(wait, due - now)
        if best is None:
            return None, wait
        queue = self._queues[best[1]]
        batch = queue.popleft()
        if not queue:
            del self._queues[best[1]]
        return batch, None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    batch, wait = self._take()
                    if batch is not None:
                        break
                    if self._stopping:
                        return
                    self._cond.wait(wait)
            self._run(batch)

    def _run(self, batch: _Batch) -> None:
        live = [t for t in batch.tasks if t.future.set_running_or_notify_cancel()]
        if not live:
            return
        with self._cond:
            self.batches_run += 1
            self.tasks_run += len(live)
        try:
            results = list(self._process(batch.key, [t.payload for t in live]))
            if len(results) != len(live):
                raise RuntimeError(f"process returned {len(results)} results for {len(live)}")
        except BaseException as e:  # noqa: BLE001  (every waiting task must be answered)
            log.exception("batch of %d tasks failed", len(live))
            results = [e] * len(live)
        for task, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                task.future.set_exception(result)
            else:
                task.future.set_result(result)
