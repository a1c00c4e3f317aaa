"""Beam's portable job API on loopback: a local job service and an external SDK worker pool.

``dnc preprocess`` passes unknown flags to Beam, so any portable runner takes the
same four flags (Flink's and Spark's job servers, or this local one)::

    --runner=PortableRunner --job_endpoint=HOST:PORT
    --environment_type=EXTERNAL --environment_config=HOST:PORT

``local_portable_services`` starts Beam's own ``local_job_service_main`` (job API,
artifact staging, the runner that executes the stages) and ``worker_pool_main`` (the
external environment: it starts each SDK worker as a separate ``python`` process),
each in its own process group, and stops both on exit. The command line runs one
``dnc preprocess`` through them::

    python -m preprocessing.portable -- --source ml1m --input DIR --output OUT

Everything after ``--`` is ``dnc preprocess``'s arguments; the runner flags are added.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator, List, Optional, Sequence, Tuple

JOB_SERVICE_MODULE = "apache_beam.runners.portability.local_job_service_main"
WORKER_POOL_MODULE = "apache_beam.runners.worker.worker_pool_main"
HOST = "localhost"
# Beam 2.59's PortableRunner gives the job's state and message streams the
# --job_server_timeout deadline (default 60 s), so a job that runs longer fails with
# DEADLINE_EXCEEDED although it is still running (seen at 20M interactions; the same
# as apache/beam#35867). The services here are known to listen before a job is
# submitted, so the deadline only has to outlast the job: one day.
JOB_SERVER_TIMEOUT_S = 24 * 3600
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class PortableEndpoints:
    """Where the local services listen.

    Attributes:
        job_endpoint: the job service, ``HOST:PORT`` (Beam's ``--job_endpoint``).
        worker_pool: the SDK worker pool, ``HOST:PORT`` (``--environment_config``).
        sdk_worker_parallelism: SDK worker processes per environment
            (Beam's ``--sdk_worker_parallelism``).
        pids: process ids of the job service and the worker pool; each leads its own
            process group (the pool's SDK workers are in the pool's group).
    """

    job_endpoint: str
    worker_pool: str
    sdk_worker_parallelism: int = 1
    pids: Tuple[int, ...] = ()

    def beam_args(self) -> Tuple[str, ...]:
        """The Beam flags that send a pipeline to these services."""
        return (
            "--runner=PortableRunner",
            f"--job_endpoint={self.job_endpoint}",
            "--environment_type=EXTERNAL",
            f"--environment_config={self.worker_pool}",
            f"--sdk_worker_parallelism={self.sdk_worker_parallelism}",
            f"--job_server_timeout={JOB_SERVER_TIMEOUT_S}",
        )


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict:
    """The services' environment: ``python`` is this interpreter, the repo importable.

    ``worker_pool_main`` starts SDK workers as ``python -c ...``, so this interpreter's
    directory goes first on ``PATH``.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["TF_USE_LEGACY_KERAS"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


def _start(args: List[str], log_path: str) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_worker_env(),
            start_new_session=True,  # its own process group: stopped with its SDK workers
        )


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGINT to the process group (a clean stop), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, timeout)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; its SDK workers may still be in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


def _tail(path: str, chars: int = 3000) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")[-chars:]


def _wait_listening(proc: subprocess.Popen, port: int, log_path: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[2]} exited with code {proc.returncode}:\n{_tail(log_path)}"
            )
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.args[2]} not listening on port {port}:\n{_tail(log_path)}")


def _read_port(proc: subprocess.Popen, port_file: str, log_path: str, deadline: float) -> int:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[2]} exited with code {proc.returncode}:\n{_tail(log_path)}"
            )
        if os.path.exists(port_file):
            with open(port_file, encoding="utf-8") as f:
                return int(f.read())
        time.sleep(0.2)
    raise RuntimeError(f"{proc.args[2]} wrote no port file:\n{_tail(log_path)}")


@contextlib.contextmanager
def local_portable_services(
    log_dir: Optional[str] = None,
    sdk_worker_parallelism: int = 1,
    start_timeout: float = 120.0,
) -> Iterator[PortableEndpoints]:
    """Runs a Beam job service and an external worker pool on loopback for the block.

    Args:
        log_dir: where ``job_service.log`` and ``worker_pool.log`` go (the worker pool's
            log also holds its SDK workers' stderr); default: a temporary directory,
            removed afterwards.
        sdk_worker_parallelism: SDK worker processes per environment (>= 1).
        start_timeout: seconds to wait for each service to listen.

    Yields:
        The endpoints; ``beam_args()`` are the flags for ``dnc preprocess``.

    Raises:
        ValueError: ``sdk_worker_parallelism`` or ``start_timeout`` is not positive.
        RuntimeError: a service exited or did not listen in time (its log tail is in
            the message).
    """
    if sdk_worker_parallelism < 1:
        raise ValueError(f"sdk_worker_parallelism must be >= 1, got {sdk_worker_parallelism}")
    if start_timeout <= 0:
        raise ValueError(f"start_timeout must be > 0, got {start_timeout}")
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dnc-portable-"))
        os.makedirs(log_dir, exist_ok=True)
        job_log = os.path.join(log_dir, "job_service.log")
        pool_log = os.path.join(log_dir, "worker_pool.log")
        port_file = os.path.join(log_dir, f"job_service-{os.getpid()}.port")
        job = _start([JOB_SERVICE_MODULE, "--port=0", f"--port_file={port_file}"], job_log)
        stack.callback(_stop, job)
        pool_port = free_port()
        pool = _start([WORKER_POOL_MODULE, f"--service_port={pool_port}"], pool_log)
        stack.callback(_stop, pool)
        deadline = time.monotonic() + start_timeout
        job_port = _read_port(job, port_file, job_log, deadline)
        _wait_listening(job, job_port, job_log, deadline)
        _wait_listening(pool, pool_port, pool_log, deadline)
        yield PortableEndpoints(
            job_endpoint=f"{HOST}:{job_port}",
            worker_pool=f"{HOST}:{pool_port}",
            sdk_worker_parallelism=sdk_worker_parallelism,
            pids=(job.pid, pool.pid),
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m preprocessing.portable [options] -- DNC_PREPROCESS_ARGS``."""
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.portable",
        description="Runs `dnc preprocess` on Beam's portable runner: a local job service "
        "and an external SDK worker pool (separate processes) on loopback.",
    )
    parser.add_argument("--log-dir", default=None, help="service logs (default: temporary)")
    parser.add_argument("--sdk-worker-parallelism", type=int, default=1)
    parser.add_argument("--log-level", default="INFO", help="dnc --log-level")
    parser.add_argument("preprocess_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = list(args.preprocess_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        parser.error("give the `dnc preprocess` arguments after --")
    if args.sdk_worker_parallelism < 1:
        parser.error(f"--sdk-worker-parallelism must be >= 1, got {args.sdk_worker_parallelism}")
    if any(a.split("=")[0] in ("--runner", "--job_endpoint", "--environment_type") for a in rest):
        parser.error("--runner, --job_endpoint and --environment_type are set by this command")
    with local_portable_services(args.log_dir, args.sdk_worker_parallelism) as endpoints:
        command = [sys.executable, "-m", "pipeline", f"--log-level={args.log_level}"]
        command += ["preprocess", *rest, *endpoints.beam_args()]
        return subprocess.call(command, env=_worker_env())


if __name__ == "__main__":
    sys.exit(main())
