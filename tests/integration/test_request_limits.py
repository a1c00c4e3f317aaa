"""Resource bounds and security defaults of the server (real gRPC/REST on loopback).

History length, request elements, ``num_results`` (from the export's metadata or the model's
own check), request body size and framing, per-request deadlines (the server's timeout and
the gRPC client's deadline) and the bind address warning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from typing import Any, Dict, Iterator, List, Tuple

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving import model_manager
from serving.limits import Deadline
from serving.model_config import METADATA_DIR, METADATA_FILE
from serving.server import Server, add_serve_arguments, run_serve
from tests.integration.serving_process import in_process_server
from tests.integration.tiny_model import install, make_request

MAX_BYTES = 64 * 1024
MAX_HISTORY = 8
MAX_ELEMENTS = 1000


class _Slow(tf.Module):
    """``serving_default`` spins for ``seconds`` of wall time (a model slower than a timeout)."""

    @tf.function(input_signature=[tf.TensorSpec([], tf.float32, name="seconds")])
    def spin(self, seconds):
        start = tf.timestamp()
        limit = tf.cast(seconds, tf.float64)
        (n,) = tf.while_loop(
            lambda i: tf.timestamp() - start < limit, lambda i: (i + 1,), [tf.constant(0)]
        )
        return {"iterations": n}


@pytest.fixture(scope="module")
def bases(templates, tmp_path_factory) -> Dict[str, str]:
    """Base paths: "m" (tiny), "meta" (tiny + metadata max_num_results=5), "slow"."""
    root = tmp_path_factory.mktemp("limits")
    install(templates, str(root / "m"), 1)
    meta = install(templates, str(root / "meta"), 1)
    os.makedirs(os.path.join(meta, METADATA_DIR))
    with open(os.path.join(meta, METADATA_DIR, METADATA_FILE), "w") as f:
        json.dump({"max_num_results": 5}, f)
    slow = _Slow()
    tf.saved_model.save(slow, str(root / "slow" / "1"), signatures={"serving_default": slow.spin})
    return {name: str(root / name) for name in ("m", "meta", "slow")}


@contextlib.contextmanager
def _serve(bases: Dict[str, str], **kwargs: Any) -> Iterator[Server]:
    options = dict(
        grpc_port=0,
        rest_port=0,
        poll_wait_seconds=0,
        max_request_bytes=MAX_BYTES,
        max_request_elements=MAX_ELEMENTS,
        max_history_length=MAX_HISTORY,
    )
    options.update(kwargs)
    with in_process_server(bases, **options) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(bases):
    with _serve(bases) as srv:
        yield srv


def _stub(srv: Server) -> Any:
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}")
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _grpc(srv: Server, request: Any, timeout: float = 20) -> Tuple[grpc.StatusCode, Any]:
    try:
        return grpc.StatusCode.OK, _stub(srv).Predict(request, timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), e.details()


def _http(srv: Server, data: bytes, half_close: bool = True) -> Tuple[int, Dict[str, Any]]:
    """Sends raw bytes to the REST port; returns (status, JSON body) of the response."""
    with socket.create_connection(("127.0.0.1", srv.rest_port), timeout=20) as conn:
        conn.sendall(data)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        response = conn.makefile("rb").read()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _post(path: str, body: bytes, headers: str = "") -> bytes:
    if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
        headers += f"Content-Length: {len(body)}\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body


def _chunked(body: bytes, size: int) -> bytes:
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def _history(rows: int, length: int) -> np.ndarray:
    return np.array([[f"i{j}".encode() for j in range(length)]] * rows, dtype=object).reshape(
        rows, length
    )


def test_history_length_limit(server):
    code, answer = _grpc(server, make_request(history=_history(2, MAX_HISTORY)))
    assert code == grpc.StatusCode.OK
    assert tf.make_ndarray(answer.outputs["item_ids"])[0, 0] == f"i{MAX_HISTORY - 1}".encode()
    for rows in (1, 0):  # the shape is the bound, even with no rows at all
        code, details = _grpc(server, make_request(history=_history(rows, MAX_HISTORY + 1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"length {MAX_HISTORY + 1}" in details and f"limit of {MAX_HISTORY}" in details
        assert "--max_history_length" in details
    body = json.dumps({"instances": [["a"] * (MAX_HISTORY + 1)]}).encode()
    status, answer = _http(server, _post("/v1/models/m:predict", body))
    assert status == 400 and f"length {MAX_HISTORY + 1}" in answer["error"]
    body = json.dumps({"instances": [["a"] * MAX_HISTORY]}).encode()
    assert _http(server, _post("/v1/models/m:predict", body))[0] == 200


def test_request_elements_limit(server):
    code, details = _grpc(server, make_request(history=_history(MAX_ELEMENTS // 4 + 1, 4)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"limit of {MAX_ELEMENTS}" in details and "--max_request_elements" in details


def test_num_results_limits(server):
    def retrieve(name: str, n: int) -> Tuple[grpc.StatusCode, Any]:
        request = make_request(
            name, "retrieve", history=[["a"]], alpha=np.float32(1), num_results=np.int32(n)
        )
        return _grpc(server, request)

    code, answer = retrieve("meta", 5)
    assert code == grpc.StatusCode.OK and answer.outputs["item_ids"].tensor_shape.dim[1].size == 5
    # The tiny model itself accepts up to 10: 6 is refused by the export's metadata.
    assert retrieve("meta", 6) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "num_results 6 exceeds this model's max_num_results 5",
    )
    assert retrieve("m", -1) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "num_results must be >= 0, got -1",
    )
    code, details = retrieve("m", 2**31 - 1)  # no metadata: the model's own assertion
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(
        "rejected by the model: assertion failed: [num_results must be <= 10]"
    )
    assert "{{node" not in details and "[Op:" not in details and "\n" not in details
    body = {
        "signature_name": "retrieve",
        "inputs": {"history": [["a"]], "alpha": 1, "num_results": 6},
    }
    status, answer = _http(server, _post("/v1/models/meta:predict", json.dumps(body).encode()))
    assert status == 400 and "max_num_results 5" in answer["error"]


def test_rest_body_size_and_framing(server):
    path = "/v1/models/m:predict"
    valid = b'{"instances": [["a", "b"]]}'
    ok = {"predictions": [{"item_ids": ["b", "a"], "version": 1}]}
    assert _http(server, _post(path, valid)) == (200, ok)
    chunked = "Transfer-Encoding: chunked\r\n"
    assert _http(server, _post(path, _chunked(valid, 5), chunked)) == (200, ok)

    # Over the limit by Content-Length: answered without sending (or reading) a body.
    status, answer = _http(server, _post(path, b"", f"Content-Length: {MAX_BYTES + 1}\r\n"))
    assert status == 413 and f"limit of {MAX_BYTES} bytes" in answer["error"]
    # Over the limit while streaming chunks: refused once the limit is passed.
    big = b'{"instances": [["' + b"x" * MAX_BYTES + b'"]]}'
    status, answer = _http(server, _post(path, _chunked(big, 4096), chunked))
    assert status == 413 and "--max_request_bytes" in answer["error"]

    bad = {
        "no length": (f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + valid, 411),
        "both": (
            _post(path, _chunked(valid, 5), chunked + f"Content-Length: {len(valid)}\r\n"),
            400,
        ),
        "gzip": (_post(path, valid, "Transfer-Encoding: gzip\r\n"), 400),
        "chunk size": (_post(path, b"zz\r\nabc\r\n0\r\n\r\n", chunked), 400),
        "negative": (_post(path, valid, "Content-Length: -1\r\n"), 400),
        "two lengths": (
            _post(path, valid, f"Content-Length: {len(valid)}\r\nContent-Length: 3\r\n"),
            400,
        ),
        "short body": (_post(path, valid[:5], f"Content-Length: {len(valid)}\r\n"), 400),
        "short chunks": (_post(path, b"ff\r\nabc", chunked), 400),
    }
    for what, (data, expected) in bad.items():
        status, answer = _http(server, data)
        assert (status, bool(answer.get("error"))) == (expected, True), (what, answer)
    assert _http(server, _post(path, valid)) == (200, ok)  # still serving


def test_request_timeout_slow_model_and_slow_body(bases):
    with _serve(bases, request_timeout_seconds=0.5) as srv:
        start = time.monotonic()
        code, details = _grpc(srv, make_request("slow", seconds=np.float32(1.5)))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert details.startswith("deadline exceeded while running the model")
        assert "--request_timeout_seconds allowed 0.500s" in details
        assert time.monotonic() - start < 10
        status, answer = _http(
            srv, _post("/v1/models/slow:predict", b'{"inputs": {"seconds": 1.5}}')
        )
        assert status == 504 and "while running the model" in answer["error"]
        code, answer = _grpc(srv, make_request("slow", seconds=np.float32(0)))
        assert code == grpc.StatusCode.OK  # fast requests are unaffected

        # A client that stops sending its body is answered once the timeout passes.
        start = time.monotonic()
        partial = _post("/v1/models/m:predict", b'{"inst', "Content-Length: 100\r\n")
        status, answer = _http(srv, partial, half_close=False)
        assert status == 504 and "while reading the request body" in answer["error"]
        assert time.monotonic() - start < 10  # not the 30 s socket timeout


def test_expired_client_deadline_is_not_run(bases):
    """A request whose gRPC deadline passes while it waits for a worker never runs."""
    with _serve(bases, grpc_workers=1, request_timeout_seconds=0) as srv:
        loaded = srv.manager.get("slow")
        first = threading.Thread(
            target=_grpc, args=(srv, make_request("slow", seconds=np.float32(1)))
        )
        first.start()
        time.sleep(0.3)  # the only worker is busy for about 0.7 s more
        code, _ = _grpc(srv, make_request("slow", seconds=np.float32(0)), timeout=0.3)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        first.join(20)
        time.sleep(0.5)  # the expired request has been dequeued by now
        assert loaded.runs == 1
        assert _grpc(srv, make_request("slow", seconds=np.float32(0)))[0] == grpc.StatusCode.OK
        assert loaded.runs == 2
        # The same check in-process: a passed deadline is refused before the model runs.
        with pytest.raises(model_manager.ServingError) as info:
            loaded.run("", {"seconds": np.float32(0)}, deadline=Deadline(0.0, "a test"))
        assert info.value.code == model_manager.Code.DEADLINE_EXCEEDED
        assert "before running the model" in info.value.message and loaded.runs == 2


def test_concurrent_rpcs_are_bounded(bases):
    """Past --grpc_max_concurrent_rpcs a request is refused at once, not queued."""
    with _serve(bases, grpc_workers=1, max_concurrent_rpcs=2, request_timeout_seconds=0) as srv:
        loaded = srv.manager.get("slow")
        results: List[grpc.StatusCode] = []

        def call(seconds: float) -> None:
            results.append(_grpc(srv, make_request("slow", seconds=np.float32(seconds)))[0])

        running = threading.Thread(target=call, args=(1.5,))  # holds the only worker
        running.start()
        time.sleep(0.3)
        waiting = threading.Thread(target=call, args=(0,))  # queued behind it: 2 in flight
        waiting.start()
        time.sleep(0.3)
        start = time.monotonic()
        code, details = _grpc(srv, make_request("slow", seconds=np.float32(0)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert time.monotonic() - start < 0.5  # refused, not queued behind the slow call
        running.join(20)
        waiting.join(20)
        assert results == [grpc.StatusCode.OK, grpc.StatusCode.OK]
        assert loaded.runs == 2  # the refused request never ran
        assert _grpc(srv, make_request("slow", seconds=np.float32(0)))[0] == grpc.StatusCode.OK


def test_bind_defaults_and_warning(bases, caplog):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model_base_path=x"])
    assert args.host == "127.0.0.1" and args.max_history_length == 2048
    assert args.request_timeout_seconds == 30 and args.max_request_bytes == 4 * 1024 * 1024
    assert args.grpc_max_concurrent_rpcs == 128  # a bounded queue by default
    with caplog.at_level(logging.WARNING, logger="dnc.serving"):
        with _serve(bases, host="127.0.0.1"):
            pass
        assert "reachable from other hosts" not in caplog.text
        # TEST-NET-1: not an address of this machine, so nothing is exposed; binding fails
        # after the warning has been logged.
        srv = Server([model_manager.ModelConfig("m", bases["m"])], host="192.0.2.1", grpc_port=0)
        with pytest.raises(RuntimeError):
            srv.start()
        srv.stop(0)
    assert "binding 192.0.2.1 (--host): the server is reachable from other hosts" in caplog.text
    assert "no authentication or TLS" in caplog.text


def test_run_serve_rejects_invalid_limits(bases, caplog):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([f"--model_base_path={bases['m']}", "--max_history_length=0"])
    with caplog.at_level(logging.ERROR, logger="dnc.serving"):
        assert run_serve(args) == 2
    assert "max_history_length must be a positive integer" in caplog.text


def test_version_directories_parsed_safely(templates, tmp_path):
    """Only canonical integer directories inside the base path are versions."""
    base = tmp_path / "m"
    install(templates, str(base), 1)
    outside = tmp_path / "outside"
    install(templates, str(outside), 2, as_version=9)
    for hostile in ("01", "+2", "3.0", "-4", "7abc", "9" * 19, "99999999999999999999", "\u0663"):
        shutil.copytree(templates[2], base / hostile)
    os.symlink(outside / "9", base / "5")  # resolves outside the base path
    (base / "6").write_text("a file, not a directory")
    loaded: List[str] = []

    def recording_loader(path: str) -> Any:
        loaded.append(path)
        return model_manager.default_loader(path)

    config = model_manager.ModelConfig("m", str(base), policy=model_manager.VersionPolicy("all"))
    manager = model_manager.ModelManager([config], poll_wait_seconds=0, loader=recording_loader)
    manager.poll_all()
    assert loaded == [os.path.join(os.path.realpath(base), "1")]
    assert [s.version for s in manager.model("m").statuses()] == [1]
