"""``dnc serve`` in a subprocess on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Sequence

import grpc
import pytest
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis.get_model_status_pb2 import GetModelStatusRequest


@contextlib.contextmanager
def in_process_server(bases: Dict[str, str], **options: Any) -> Iterator[Any]:
    """A started in-process ``serving.server.Server`` of ``bases`` (name -> BASE/NAME)
    with ``options`` (``grpc_port=0`` and friends); stopped on exit."""
    from serving import model_manager
    from serving.server import Server

    models = [model_manager.ModelConfig(name, path) for name, path in bases.items()]
    srv = Server(models, **options)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(1)


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_available(server: subprocess.Popen, channel: grpc.Channel, name: str) -> None:
    status = model_service_pb2_grpc.ModelServiceStub(channel)
    deadline = time.monotonic() + 120
    while True:
        try:
            request = GetModelStatusRequest()
            request.model_spec.name = name
            reply = status.GetModelStatus(request, timeout=2)
            if any(v.state == v.AVAILABLE for v in reply.model_version_status):
                return
        except grpc.RpcError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"server did not come up:\n{server.stdout.read()[-3000:]}")
        time.sleep(0.5)


def _model_flags(models: Dict[str, str]) -> List[str]:
    if len(models) == 1:
        ((name, base),) = models.items()
        return [f"--model_name={name}", f"--model_base_path={base}"]
    entries = "".join(f"  config {{ name: '{n}' base_path: '{b}' }}\n" for n, b in models.items())
    handle, path = tempfile.mkstemp(suffix=".config")
    with os.fdopen(handle, "w") as f:
        f.write("model_config_list {\n" + entries + "}\n")
    return [f"--model_config_file={path}"]


@contextlib.contextmanager
def dnc_serve(
    base: str, name: str, *, flags: Sequence[str] = (), **more: str
) -> Iterator[Dict[str, object]]:
    """Serves ``base`` (BASE/NAME) as ``name`` (and ``more`` name=base models), with
    further ``dnc serve`` ``flags``.

    Yields the channel, the gRPC target and the REST URL once every model is available.
    The server must exit cleanly (code 0) on SIGTERM when the block ends.
    """
    grpc_port, rest_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--log-level=WARNING", "serve"]
        + [f"--port={grpc_port}", f"--rest_api_port={rest_port}"]
        + _model_flags({name: base, **more})
        + ["--file_system_poll_wait_seconds=0.5", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        for model in (name, *more):
            _wait_available(server, channel, model)
        yield {
            "channel": channel,
            "grpc": f"127.0.0.1:{grpc_port}",
            "rest": f"http://127.0.0.1:{rest_port}",
        }
    finally:
        channel.close()
        server.terminate()
    assert server.wait(timeout=60) == 0
