"""Fault injection for crash-safety tests (a test hook; never set it in production).

``DNC_FAULT_KILL_AT=<node>:<point>`` makes the local runner send SIGKILL to its
own process while it runs the node ``<node>`` (e.g. ``Transform``,
``Trainer.dnc``). No cleanup runs, exactly as with ``kill -9`` or a lost machine.
Points:

``before_run``
    The execution is recorded RUNNING in ML Metadata; nothing is written yet.
``mid_write``
    The component has written its first new file: anywhere under its execution
    directory, or (Pusher) in the serving path, e.g. inside the hidden staging
    directory of a model version. A watcher thread polls for it; a component
    that returns before the watcher sees a file is killed when it returns.
``after_run``
    The component returned: its outputs are complete on disk (Pusher: the new
    version is renamed into place), but ML Metadata does not record the
    execution COMPLETE yet.

``tests/integration/test_pipeline_faults.py`` kills every component at these
points and checks that the next run resumes to the same artifacts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Iterator, Optional, Sequence, Set, Tuple

log = logging.getLogger(__name__)

ENV = "DNC_FAULT_KILL_AT"
POINTS = ("before_run", "mid_write", "after_run")
POLL_SECONDS = 0.005


def kill_target(node_ids: Sequence[str]) -> Optional[Tuple[str, str]]:
    """The ``(node, point)`` of ``DNC_FAULT_KILL_AT``, or None when it is unset.

    Raises:
        ValueError: the value is not ``<node>:<point>`` with a node of ``node_ids``
            and a point of ``POINTS``.
    """
    value = os.environ.get(ENV, "")
    if not value:
        return None
    node, sep, point = value.rpartition(":")
    if not sep or point not in POINTS or node not in node_ids:
        raise ValueError(
            f"{ENV}={value!r}: expected <node>:<point>, node one of {list(node_ids)}, "
            f"point one of {list(POINTS)}"
        )
    return node, point


def _kill(node: str, point: str) -> None:
    log.warning("%s: fault injection: SIGKILL at %s (%s)", node, point, ENV)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def checkpoint(target: Optional[Tuple[str, str]], node: str, point: str) -> None:
    """Kills this process if ``(node, point)`` is the target."""
    if target == (node, point):
        _kill(node, point)


def _files(paths: Sequence[str]) -> Set[str]:
    found: Set[str] = set()
    for path in paths:
        for parent, _, names in os.walk(path):
            found.update(os.path.join(parent, name) for name in names)
    return found


@contextlib.contextmanager
def watch_writes(
    target: Optional[Tuple[str, str]], node: str, paths: Sequence[str]
) -> Iterator[None]:
    """While the body runs, kills this process at the first new file under ``paths``
    if ``(node, "mid_write")`` is the target; if none appeared, kills it on return."""
    if target != (node, "mid_write"):
        yield
        return
    before = _files(paths)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if _files(paths) - before:
                _kill(node, "mid_write")
            stop.wait(POLL_SECONDS)

    thread = threading.Thread(target=watch, name="dnc-fault-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    _kill(node, "mid_write")
