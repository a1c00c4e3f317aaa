"""Building blocks of the serving load benchmark (``bench/load.py``).

* :func:`require_loopback`: the load generator only ever talks to this machine.
* :class:`ServerProcess`: ``python -m pipeline serve`` (the ``dnc serve`` command) as a child
  process, so that its RSS is the server's own and it can be SIGKILLed and restarted;
  :class:`InProcessServer`: ``serving.server.Server`` in this process.
* :func:`push_version`: copies a SavedModel into ``BASE/<version>`` the way ``dnc export``
  publishes (a hidden staging directory beside it, then one rename), optionally corrupted.
* :class:`Monitor`: samples the server's RSS and ``GetModelStatus`` in the background.
* :class:`LoadRun`: N client threads (gRPC ``PredictionService`` stub or REST) sharing a fixed
  request budget under a time limit; every request's outcome is recorded.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from preprocessing import fileio

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
CORRUPTIONS = ("truncated-pb", "garbage-pb", "missing-variables")
STATE_NAMES = {10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}
# Clients reconnect quickly after an outage (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
RECONNECT_SLACK_SECONDS = 1.0  # > max_reconnect_backoff_ms: failures this late still count
# A server killed mid-response leaves the body short: IncompleteRead is "down" too.
_REST_DOWN = (
    ConnectionError,
    http.client.RemoteDisconnected,
    http.client.BadStatusLine,
    http.client.IncompleteRead,
)


def require_loopback(host: str) -> str:
    """Returns ``host`` if it is a loopback address (or ``localhost``).

    Raises:
        ValueError: for any other host: this tool must not load another machine.
    """
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(
        f"refusing to send load to {host!r}: bench/load.py only targets loopback "
        "(127.0.0.1, ::1, localhost)"
    )


def rss_mb(pid: int) -> Optional[float]:
    """VmRSS of a process in MiB from ``/proc/<pid>/status`` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError):
        return None
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def push_version(base: str, template: str, version: int, corrupt: str = "") -> str:
    """Publishes a copy of ``template`` as ``base/<version>`` (staging dir + rename).

    Args:
        base: the model base path.
        template: a SavedModel directory.
        version: the integer version to create (must not exist).
        corrupt: "" for a good copy, else one of :data:`CORRUPTIONS`.

    Returns:
        The new version directory.
    """
    if corrupt and corrupt not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corrupt!r}; expected one of {CORRUPTIONS}")
    final = os.path.join(base, str(version))
    if os.path.exists(final):
        raise FileExistsError(final)
    staging = fileio.staging_path(final)
    shutil.copytree(template, staging)
    meta = os.path.join(staging, "assets.extra", "dnc_metadata.json")
    if os.path.exists(meta):  # as dnc export: the metadata names its version
        with open(meta, encoding="utf-8") as f:
            content = json.load(f)
        content["version"] = version
        with open(meta, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
    pb = os.path.join(staging, "saved_model.pb")
    if corrupt == "truncated-pb":
        with open(pb, "r+b") as f:
            f.truncate(os.path.getsize(pb) // 3)
    elif corrupt == "garbage-pb":
        with open(pb, "wb") as f:
            f.write(b"\x08\x96\x01 not a SavedModel " * 64)
    elif corrupt == "missing-variables":
        shutil.rmtree(os.path.join(staging, "variables"))
    os.rename(staging, final)
    return final


def model_status(channel: grpc.Channel, name: str, timeout: float = 5.0) -> List[Dict[str, Any]]:
    """``GetModelStatus`` as a list of ``{version, state, error}`` (newest first)."""
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        request, timeout=timeout
    )
    return [
        {
            "version": int(s.version),
            "state": STATE_NAMES.get(int(s.state), str(s.state)),
            "error": s.status.error_message,
        }
        for s in response.model_version_status
    ]


def serving_version(statuses: Sequence[Dict[str, Any]]) -> Optional[int]:
    """The version a latest-policy server answers with: the newest AVAILABLE one."""
    available = [s["version"] for s in statuses if s["state"] == "AVAILABLE"]
    return max(available) if available else None


def wait_available(
    target: str, name: str, version: Optional[int], timeout: float, alive: Callable[[], bool]
) -> Optional[float]:
    """Polls ``GetModelStatus`` until ``version`` (any if None) is AVAILABLE.

    Returns:
        The ``time.monotonic()`` at which it was seen, or None on timeout / death.
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        while time.monotonic() < deadline and alive():
            try:
                statuses = model_status(channel, name, timeout=2.0)
            except grpc.RpcError:
                time.sleep(0.05)
                continue
            current = serving_version(statuses)
            if current is not None and (version is None or current >= version):
                return time.monotonic()
            time.sleep(0.05)
    return None


class ServerProcess:
    """``python -m pipeline serve`` (= ``dnc serve``) on loopback, as a child process.

    Args:
        name: the model name.
        base_path: the model base path.
        log_path: file receiving the server's stdout and stderr (appended).
        host: loopback interface.
        poll_seconds: ``--file_system_poll_wait_seconds``.
        grpc_port, rest_port: ports (default: free ones, kept across restarts).
    """

    def __init__(
        self,
        name: str,
        base_path: str,
        log_path: str,
        host: str = "127.0.0.1",
        poll_seconds: float = 1.0,
        grpc_port: int = 0,
        rest_port: int = 0,
    ) -> None:
        self.name = name
        self.base_path = base_path
        self.log_path = log_path
        self.host = require_loopback(host)
        self.poll_seconds = poll_seconds
        self.grpc_port = grpc_port or free_port(host)
        self.rest_port = rest_port or free_port(host)
        self.process: Optional[subprocess.Popen] = None
        self.pids: List[int] = []

    @property
    def pid(self) -> int:
        """The current server process id."""
        if self.process is None:
            raise RuntimeError("the server has not been started")
        return self.process.pid

    def alive(self) -> bool:
        """Whether the current process is running."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 300.0) -> float:
        """Starts the server and waits until a version is AVAILABLE; returns that instant.

        Raises:
            RuntimeError: if it exits or is not ready within ``timeout`` seconds.
        """
        command = [
            sys.executable,
            "-m",
            "pipeline",
            "--log-level=INFO",
            "serve",
            f"--model_name={self.name}",
            f"--model_base_path={self.base_path}",
            f"--host={self.host}",
            f"--port={self.grpc_port}",
            f"--rest_api_port={self.rest_port}",
            f"--file_system_poll_wait_seconds={self.poll_seconds}",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(  # noqa: S603
                command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.pids.append(self.process.pid)
        ready = wait_available(self.grpc_target, self.name, None, timeout, self.alive)
        if ready is None:
            code = self.process.poll()
            self.kill()
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                tail = "".join(log.readlines()[-15:])
            raise RuntimeError(
                f"the server {'exited with ' + str(code) if code is not None else 'timed out'}"
                f" before serving; the end of its log:\n{tail}"
            )
        return ready

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC API."""
        return f"{self.host}:{self.grpc_port}"

    def kill(self) -> None:
        """SIGKILLs the server (no cleanup, as a crash) and reaps it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(30)

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM (graceful stop), SIGKILL after ``timeout``; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


class InProcessServer:
    """``serving.server.Server`` in this process (RSS then includes the clients)."""

    def __init__(
        self, name: str, base_path: str, host: str = "127.0.0.1", poll_seconds: float = 1.0
    ) -> None:
        from serving.model_manager import ModelConfig
        from serving.server import Server

        self.name = name
        self.host = require_loopback(host)
        self.server = Server(
            [ModelConfig(name, base_path)],
            host=host,
            grpc_port=0,
            rest_port=0,
            poll_wait_seconds=poll_seconds,
        )
        self.pids = [os.getpid()]
        self.grpc_port = 0
        self.rest_port = 0

    @property
    def pid(self) -> int:
        """This process."""
        return os.getpid()

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC API."""
        return f"{self.host}:{self.grpc_port}"

    def alive(self) -> bool:
        """Always true while this process runs."""
        return True

    def start(self, timeout: float = 300.0) -> float:
        """Starts the server (loads the initial version); returns the ready instant."""
        del timeout
        self.server.start()
        self.grpc_port = int(self.server.grpc_port or 0)
        self.rest_port = int(self.server.rest_port or 0)
        return time.monotonic()

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """Stops gracefully."""
        self.server.stop(min(timeout, 5.0))
        return 0


class Monitor(threading.Thread):
    """Samples the server's RSS and ``GetModelStatus`` every ``interval`` seconds.

    Records every version ever seen AVAILABLE (and when, as ``time.monotonic()``), so that a
    corrupt version that was served even briefly is caught; errors while the server is down
    are ignored. RSS samples are ``(time.monotonic(), MiB)``.
    """

    def __init__(self, server: Any, interval: float = 0.25) -> None:
        super().__init__(name="monitor", daemon=True)
        self.server = server
        self.interval = interval
        self.rss: List[Tuple[float, float]] = []
        self.available_since: Dict[int, float] = {}
        self.last_status: List[Dict[str, Any]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Samples until :meth:`stop`."""
        channel, target = None, ""
        while not self._stop_event.is_set():
            now = time.monotonic()
            value = rss_mb(self.server.pid)
            if value is not None:
                self.rss.append((now, value))
            if self.server.grpc_target != target or channel is None:
                if channel is not None:
                    channel.close()
                target = self.server.grpc_target
                channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            try:
                statuses = model_status(channel, self.server.name, timeout=2.0)
            except grpc.RpcError:
                statuses = []
            for s in statuses:
                if s["state"] == "AVAILABLE":
                    self.available_since.setdefault(s["version"], now)
            if statuses:
                self.last_status = statuses
            self._stop_event.wait(self.interval)
        if channel is not None:
            channel.close()

    def stop(self) -> None:
        """Stops sampling and waits for the thread."""
        self._stop_event.set()
        self.join(10)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One request: client, protocol, start/end (s since the run began), code, version."""

    client: int
    protocol: str
    start: float
    end: float
    code: str
    version: Optional[int]


def grpc_requests(name: str, histories: Sequence[Sequence[str]]) -> List[Any]:
    """``serving_default`` PredictRequests of the histories (built once, reused)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    out = []
    for history in histories:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = "serving_default"
        array = np.array([[h.encode("utf-8") for h in history]], dtype=object)
        request.inputs["history"].CopyFrom(tf.make_tensor_proto(array))
        out.append(request)
    return out


def rest_bodies(histories: Sequence[Sequence[str]]) -> List[bytes]:
    """Columnar REST ``:predict`` bodies of the histories."""
    return [
        json.dumps({"signature_name": "serving_default", "inputs": {"history": [list(h)]}}).encode()
        for h in histories
    ]


def grpc_call(stub: Any, request: Any, timeout: float) -> Tuple[str, Optional[int]]:
    """One Predict: ("OK", answering version) or (status code name, None)."""
    try:
        response = stub.Predict(request, timeout=timeout)
    except grpc.RpcError as e:
        return e.code().name, None
    if "item_ids" not in response.outputs:
        return "BAD_RESPONSE", None
    return "OK", int(response.model_spec.version.value)


def rest_call(host: str, port: int, path: str, body: bytes, timeout: float) -> str:
    """One REST predict: "OK", "HTTP_<status>", "UNAVAILABLE" (connection refused, reset,
    dropped or cut mid-response: the server is down) or "DEADLINE_EXCEEDED"."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
    except TimeoutError:
        return "DEADLINE_EXCEEDED"
    except _REST_DOWN:
        return "UNAVAILABLE"
    finally:
        conn.close()
    if response.status != 200:
        return f"HTTP_{response.status}"
    try:
        outputs = json.loads(data)["outputs"]
    except (ValueError, KeyError):
        return "BAD_RESPONSE"
    return "OK" if isinstance(outputs, dict) and "item_ids" in outputs else "BAD_RESPONSE"


class LoadRun:
    """``clients`` threads sharing ``total`` requests, stopped at ``time_limit`` seconds.

    Client ``c`` uses REST if ``c < rest_clients`` and gRPC (its own channel and
    ``PredictionService`` stub) otherwise, and cycles through the prepared histories from
    its own offset. After a failure with UNAVAILABLE it waits ``retry_backoff`` seconds
    before its next request (a client that hammers a dead server only counts failures).
    With ``rate`` > 0 the clients together send at most ``rate`` requests per second (each
    paced at ``rate / clients``); otherwise each sends its next request on an answer.
    """

    def __init__(
        self,
        server: Any,
        histories: Sequence[Sequence[str]],
        clients: int,
        total: int,
        time_limit: float,
        rest_clients: int = 0,
        timeout: float = 30.0,
        retry_backoff: float = 0.1,
        rate: float = 0.0,
    ) -> None:
        if clients < 1 or total < 1 or time_limit <= 0:
            raise ValueError("clients, total and time_limit must be > 0")
        if not 0 <= rest_clients <= clients:
            raise ValueError(f"rest_clients must be in [0, {clients}]")
        self.server = server
        self.clients = clients
        self.total = total
        self.time_limit = time_limit
        self.rest_clients = rest_clients
        self.timeout = timeout
        self.retry_backoff = retry_backoff
        self.interval = clients / rate if rate > 0 else 0.0  # per client
        self.requests = grpc_requests(server.name, histories)
        self.bodies = rest_bodies(histories)
        self.outcomes: List[List[Outcome]] = [[] for _ in range(clients)]
        self.t0 = time.monotonic()  # the clock of the run's events (pushes may precede the load)
        self.started = 0.0
        self.wall = 0.0
        self._lock = threading.Lock()
        self._issued = 0
        self._done = 0
        self._deadline = float("inf")

    @property
    def done(self) -> int:
        """Requests finished so far (answered or failed)."""
        return self._done

    def now(self) -> float:
        """Seconds since the run began."""
        return time.monotonic() - self.t0

    def wait_done(self, count: int, timeout: float) -> bool:
        """Blocks until ``count`` requests have finished (False on timeout / end of run)."""
        deadline = time.monotonic() + timeout
        while self._done < count:
            if time.monotonic() > min(deadline, self._deadline) or self._issued >= self.total:
                return self._done >= count
            time.sleep(0.01)
        return True

    def _take(self) -> bool:
        with self._lock:
            if self._issued >= self.total or time.monotonic() > self._deadline:
                return False
            self._issued += 1
            return True

    def _worker(self, c: int, barrier: threading.Barrier) -> None:
        rest = c < self.rest_clients
        channel = None if rest else grpc.insecure_channel(self.server.grpc_target, CHANNEL_OPTIONS)
        stub = None
        if channel is not None:
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        path = f"/v1/models/{self.server.name}:predict"
        i = (c * 7919) % len(self.requests)
        barrier.wait()
        next_at = time.monotonic()
        try:
            while self._take():
                if self.interval:  # paced: one request per interval, no catching up
                    time.sleep(max(0.0, next_at - time.monotonic()))
                    next_at = max(next_at, time.monotonic() - self.interval) + self.interval
                start = self.now()
                if rest:
                    code = rest_call(
                        self.server.host, self.server.rest_port, path, self.bodies[i], self.timeout
                    )
                    version = None
                else:
                    code, version = grpc_call(stub, self.requests[i], self.timeout)
                outcome = Outcome(c, "rest" if rest else "grpc", start, self.now(), code, version)
                self.outcomes[c].append(outcome)
                with self._lock:
                    self._done += 1
                i = (i + 1) % len(self.requests)
                if code == "UNAVAILABLE":
                    time.sleep(self.retry_backoff)
        finally:
            if channel is not None:
                channel.close()

    def run(self) -> None:
        """Runs every client to the end of the budget or the time limit."""
        barrier = threading.Barrier(self.clients + 1)
        threads = [
            threading.Thread(target=self._worker, args=(c, barrier), name=f"client-{c}")
            for c in range(self.clients)
        ]
        for t in threads:
            t.start()
        self.started = self.now()
        self._deadline = time.monotonic() + self.time_limit
        barrier.wait()
        for t in threads:
            t.join()
        self.wall = self.now() - self.started

    def all_outcomes(self) -> List[Outcome]:
        """Every request's outcome, ordered by start time."""
        return sorted((o for per in self.outcomes for o in per), key=lambda o: o.start)
