"""Multi-worker training: ``TF_CONFIG``, the chief's write paths and a loopback launcher.

``dnc train --strategy multiworker`` builds a ``tf.distribute.MultiWorkerMirroredStrategy``
from ``TF_CONFIG`` (one process per worker, synchronous all-reduce over gRPC). Every
worker runs the same command; all of them save (saving may take part in collectives),
but only the chief writes ``MODEL_DIR/model``: the others write to a temporary
directory that is removed (TensorFlow's documented pattern).

The launcher starts N such workers on loopback, each with its ``TF_CONFIG``::

    python -m trainer.multiworker --workers 2 -- --data DIR --output MODEL_DIR --variant dnc

Everything after ``--`` is ``dnc train``'s arguments (``--strategy multiworker`` is
added). Worker 0 is the chief; each output line is prefixed with ``[worker i]``; the exit
code is the first failing worker's (the others are then stopped), 0 if all succeeded.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence

TF_CONFIG = "TF_CONFIG"
HOST = "127.0.0.1"
# Worker types that take part in training (an "evaluator" task does not).
_TRAINING_TYPES = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class WorkerTask:
    """This process's place in a ``TF_CONFIG`` cluster.

    Attributes:
        task_type: ``chief`` or ``worker``.
        task_id: index within its type.
        num_workers: training processes in the cluster (chief + workers).
    """

    task_type: str
    task_id: int
    num_workers: int

    @property
    def is_chief(self) -> bool:
        """The chief is the ``chief`` task, or worker 0 when the cluster has no chief."""
        return self.task_type == "chief" or (self.task_type == "worker" and self.task_id == 0)


def parse_tf_config(raw: Optional[str]) -> WorkerTask:
    """Parses and checks a ``TF_CONFIG`` value for multi-worker training.

    Args:
        raw: the JSON text of ``TF_CONFIG`` (None: unset).

    Raises:
        ValueError: unset, not JSON, no ``cluster``/``task``, or a task that is not in
            the cluster.
    """
    if not raw:
        raise ValueError(
            f"--strategy multiworker needs {TF_CONFIG} (JSON with 'cluster' and 'task'); "
            "python -m trainer.multiworker sets it for workers on loopback"
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{TF_CONFIG} is not valid JSON: {e}") from None
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError(f"{TF_CONFIG} needs a 'cluster' object and a 'task' object")
    task_type, task_id = task.get("type"), task.get("index", 0)
    if task_type not in _TRAINING_TYPES:
        raise ValueError(
            f"{TF_CONFIG} task type must be one of {_TRAINING_TYPES}, got {task_type!r}"
        )
    members = cluster.get(task_type)
    if not isinstance(task_id, int) or not isinstance(members, list):
        raise ValueError(f"{TF_CONFIG} task {task!r} is not in the cluster")
    if not 0 <= task_id < len(members):
        raise ValueError(
            f"{TF_CONFIG} task index {task_id} is out of range for {len(members)} {task_type}s"
        )
    num_workers = sum(len(cluster.get(t) or []) for t in _TRAINING_TYPES)
    return WorkerTask(task_type=task_type, task_id=task_id, num_workers=num_workers)


def current_task(environ: Optional[Mapping[str, str]] = None) -> Optional[WorkerTask]:
    """The task of ``TF_CONFIG`` in ``environ`` (default: ``os.environ``); None if unset."""
    raw = (os.environ if environ is None else environ).get(TF_CONFIG)
    return parse_tf_config(raw) if raw else None


def is_chief(strategy: Any) -> bool:
    """Whether this process writes the outputs under ``strategy``.

    True for single-process strategies; for ``MultiWorkerMirroredStrategy``, the chief
    of its cluster resolver.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and resolver.task_id == 0 and not has_chief


def write_dir(final: str, strategy: Any) -> str:
    """Where this worker writes the output that belongs at ``final``.

    The chief writes ``final`` itself; another worker a fresh hidden sibling
    ``.NAME.worker-<type>-<id>-<random>``, which it removes when done.
    """
    if is_chief(strategy):
        return final
    resolver = strategy.cluster_resolver
    parent, name = os.path.split(os.path.abspath(final))
    suffix = f"{resolver.task_type}-{resolver.task_id}-{uuid.uuid4().hex[:8]}"
    return os.path.join(parent, f".{name}.worker-{suffix}")


def free_ports(count: int) -> List[int]:
    """``count`` distinct TCP ports that were free on loopback a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(addresses: Sequence[str]) -> List[Dict[str, Any]]:
    """One ``TF_CONFIG`` per worker of a chief-less cluster (worker 0 is the chief)."""
    if not addresses:
        raise ValueError("a cluster needs at least one worker address")
    cluster = {"worker": list(addresses)}
    return [
        {"cluster": cluster, "task": {"type": "worker", "index": i}} for i in range(len(addresses))
    ]


def _pump(stream: IO[bytes], prefix: str, out: IO[str]) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"{prefix}{line.decode('utf-8', 'replace')}")
        out.flush()
    stream.close()


def launch(train_args: Sequence[str], workers: int = 2, log_level: str = "INFO") -> int:
    """Runs ``dnc train --strategy multiworker`` as ``workers`` processes on loopback.

    Args:
        train_args: ``dnc train`` arguments (without ``train``).
        workers: number of worker processes (>= 1).
        log_level: ``dnc --log-level`` of every worker.

    Returns:
        0 if every worker succeeded, else the exit code of the first one that failed.

    Raises:
        ValueError: ``workers`` < 1, or ``train_args`` already choose a ``--strategy``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if any(a == "--strategy" or a.startswith("--strategy=") for a in train_args):
        raise ValueError("--strategy is set by the launcher (multiworker)")
    addresses = [f"{HOST}:{port}" for port in free_ports(workers)]
    command = [sys.executable, "-m", "pipeline", f"--log-level={log_level}", "train"]
    command += [*train_args, "--strategy=multiworker"]
    procs, pumps = [], []
    for index, config in enumerate(tf_configs(addresses)):
        env = {**os.environ, TF_CONFIG: json.dumps(config), "TF_USE_LEGACY_KERAS": "1"}
        proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[worker {index}] ", sys.stdout))
        pump.start()
        pumps.append(pump)
    code = 0
    try:
        code = _wait_all(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pump in pumps:
            pump.join()
    return code


def _wait_all(procs: List[subprocess.Popen]) -> int:
    """Waits for every process; on the first failure stops the rest and returns its code."""
    pending = list(procs)
    while pending:
        for proc in list(pending):
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            pending.remove(proc)
            if code != 0:
                for other in pending:
                    other.terminate()
                for other in pending:
                    try:
                        other.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        other.kill()
                        other.wait()
                return code
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m trainer.multiworker [--workers N] -- DNC_TRAIN_ARGS``."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.multiworker",
        description="Runs `dnc train --strategy multiworker` as N worker processes on "
        "loopback, each with its TF_CONFIG (worker 0 is the chief and writes the model).",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--log-level", default="INFO", help="dnc --log-level of the workers")
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = list(args.train_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        parser.error("give the `dnc train` arguments after --")
    try:
        return launch(rest, workers=args.workers, log_level=args.log_level)
    except ValueError as e:
        parser.error(str(e))
    return 2  # not reached: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
