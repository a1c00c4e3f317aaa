"""End-to-end tests of the TF Serving compatible server (real gRPC/REST, real stubs)."""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from serving import client as client_lib
from serving import model_manager
from serving.server import Server, add_serve_arguments, run_serve
from tests.integration.tiny_model import install as _install
from tests.integration.tiny_model import make_request

POLL = 0.2
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server(templates, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("base") / "m")
    _install(templates, base, 1)
    srv = Server(
        [model_manager.ModelConfig("m", base, {"stable": 1, "canary": 7})],
        grpc_port=0,
        rest_port=0,
        poll_wait_seconds=POLL,
        max_request_bytes=MAX_BYTES,
        max_request_elements=10_000,
    )
    srv.start()
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield ch
    ch.close()


def _rest(server, path, body=None, method=None):
    """Returns (HTTP status, JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.rest_port}{path}", data=data, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _code(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value.code(), info.value.details()


def test_grpc_predict(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(make_request(history=[["a", "b", "c"]]), timeout=10)
    assert tf.make_ndarray(response.outputs["item_ids"]).tolist() == [[b"c", b"b", b"a"]]
    assert tf.make_ndarray(response.outputs["version"]).tolist() == [1]
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    request = make_request(version=1, history=[["x", "y"]])
    request.output_filter.append("item_ids")
    assert list(stub.Predict(request, timeout=10).outputs) == ["item_ids"]
    request = make_request(history=[["x"]])
    request.model_spec.version_label = "stable"
    assert stub.Predict(request, timeout=10).model_spec.version.value == 1


def test_clients_retrieve(server):
    grpc_client = client_lib.PredictClient(f"127.0.0.1:{server.grpc_port}", "m")
    rest_client = client_lib.RestClient(f"127.0.0.1:{server.rest_port}", "m")
    with grpc_client:
        for c in (grpc_client, rest_client):
            out = c.retrieve(["a", "b"], num_results=3, alpha=2.0)
            assert out["item_ids"].tolist() == [[b"v1_0", b"v1_1", b"v1_2"]]
            np.testing.assert_allclose(out["scores"], [[0.0, 2.0, 4.0]])
            assert out["clusters"].tolist() == [[0, 1, 2]]
            assert c.retrieve(["a", "b"])["item_ids"].tolist() == [[b"b", b"a"]]
    args = argparse.Namespace(
        server=f"127.0.0.1:{server.grpc_port}",
        model_name="m",
        history="a,b",
        num_results=2,
        alpha=None,
        clusters=None,
        exclude=None,
        rest=False,
        signature_name="serving_default",
        timeout=10.0,
    )
    out = io.StringIO()
    assert client_lib.run_query(args, out) == 0
    assert "v1_1" in out.getvalue() and "cluster" in out.getvalue()
    args.rest, args.server = True, f"127.0.0.1:{server.rest_port}"
    assert client_lib.run_query(args, io.StringIO()) == 0
    args.num_results = 50  # model assert -> error, exit code 1
    assert client_lib.run_query(args, io.StringIO()) == 1


def test_rest_predict_formats(server):
    status, body = _rest(server, "/v1/models/m:predict", {"instances": [["a", "b"], ["c", "d"]]})
    assert status == 200
    assert body == {
        "predictions": [
            {"item_ids": ["b", "a"], "version": 1},
            {"item_ids": ["d", "c"], "version": 1},
        ]
    }
    status, body = _rest(
        server,
        "/v1/models/m/versions/1:predict",
        {"instances": [{"history": ["a", {"b64": "Yg=="}]}]},
    )
    assert status == 200 and body["predictions"][0]["item_ids"] == ["b", "a"]
    status, body = _rest(
        server, "/v1/models/m/labels/stable:predict", {"inputs": {"history": [["a", "b"]]}}
    )
    assert status == 200 and body == {"outputs": {"item_ids": [["b", "a"]], "version": [1]}}
    request = {
        "signature_name": "retrieve",
        "inputs": {"history": [["a"]], "alpha": 1.5, "num_results": 2},
    }
    status, body = _rest(server, "/v1/models/m:predict", request)
    assert status == 200
    assert body["outputs"] == {
        "item_ids": [["v1_0", "v1_1"]],
        "scores": [[0.0, 1.5]],
        "clusters": [[0, 1]],
    }


def test_metadata_and_status(server, channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "m"
    response = stub.GetModelMetadata(request, timeout=10)
    sigs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sigs)
    assert set(sigs.signature_def) == {"serving_default", "retrieve"}
    retrieve = sigs.signature_def["retrieve"]
    assert set(retrieve.inputs) == {"history", "alpha", "num_results"}
    assert retrieve.inputs["num_results"].dtype == tf.int32.as_datatype_enum
    assert len(retrieve.inputs["history"].tensor_shape.dim) == 2
    assert set(retrieve.outputs) == {"item_ids", "scores", "clusters"}

    model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "m"
    status = model_stub.GetModelStatus(status_request, timeout=10)
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]

    code, body = _rest(server, "/v1/models/m")
    assert code == 200
    assert body["model_version_status"][0]["state"] == "AVAILABLE"
    assert body["model_version_status"][0]["version"] == "1"
    code, body = _rest(server, "/v1/models/m/versions/1/metadata")
    assert code == 200
    assert set(body["metadata"]["signature_def"]["signature_def"]) == {
        "serving_default",
        "retrieve",
    }


def test_error_codes(server, channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "m"
    assert _code(stub.Classify, classify)[0] == grpc.StatusCode.UNIMPLEMENTED
    not_found = [
        make_request(name="nope", history=[["a"]]),
        make_request(version=9, history=[["a"]]),
        make_request(signature="nope", history=[["a"]]),
    ]
    label = make_request(history=[["a"]])
    label.model_spec.version_label = "canary"  # points at a version that is not loaded
    for request in [*not_found, label]:
        assert _code(stub.Predict, request)[0] == grpc.StatusCode.NOT_FOUND
    bad = {
        "missing": make_request(signature="retrieve", history=[["a"]], alpha=1.0),
        "unknown input": make_request(history=[["a"]], other=[1]),
        "dtype": make_request(history=[[1, 2]]),
        "rank": make_request(history=["a", "b"]),
        "assert": make_request(
            signature="retrieve", history=[["a"]], alpha=1.0, num_results=np.int32(11)
        ),
        "elements": make_request(history=np.full((1, 20_000), b"", dtype=np.object_)),
        "path name": make_request(name="../m", history=[["a"]]),
    }
    for what, request in bad.items():
        code, details = _code(stub.Predict, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, details)
    assert "num_results must be <= 10" in _code(stub.Predict, bad["assert"])[1]
    big = make_request(history=[["x" * 1000] * 100])  # ~100 KB > 64 KB limit
    assert _code(stub.Predict, big)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED

    cases = [
        ("/v1/models/nope:predict", {"instances": [["a"]]}, 404),
        ("/v1/models/m/versions/9:predict", {"instances": [["a"]]}, 404),
        ("/v1/models/m:predict", {"signature_name": "nope", "instances": [["a"]]}, 404),
        ("/v1/models/m:predict", {"instances": [[1, 2]]}, 400),
        ("/v1/models/m:predict", {"instances": ["a", "b"]}, 400),
        ("/v1/models/m:predict", {"instances": [["a"], ["b", "c"]]}, 400),
        ("/v1/models/m:predict", {"inputs": {"history": [["a"]]}, "instances": []}, 400),
        (
            "/v1/models/m:predict",
            {"signature_name": "retrieve", "inputs": {"history": [["a"]]}},
            400,
        ),
        (
            "/v1/models/m:predict",
            {
                "signature_name": "retrieve",
                "inputs": {"history": [["a"]], "alpha": 1, "num_results": 11},
            },
            400,
        ),
        ("/v1/models/..%2Fm:predict", {"instances": [["a"]]}, 400),
        ("/v1/models/m:classify", {"instances": [["a"]]}, 501),
        ("/v2/whatever", {}, 404),
    ]
    for path, body, expected in cases:
        status, answer = _rest(server, path, body)
        assert status == expected and answer["error"], (path, body, answer)


def test_rest_body_limits(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    conn.putrequest("POST", "/v1/models/m:predict")
    conn.putheader("Content-Length", str(MAX_BYTES + 1))
    conn.endheaders()  # no body sent: the server must answer without reading it
    response = conn.getresponse()
    assert response.status == 413 and "exceeds" in json.loads(response.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    conn.request("POST", "/v1/models/m:predict", body=b"{not json", headers={"Content-Length": "9"})
    assert conn.getresponse().status == 400
    conn.close()


def test_config_validation(tmp_path):
    for name in ("../m", "a/b", "..", "", "a b"):
        with pytest.raises(ValueError):
            model_manager.ModelConfig(name, str(tmp_path))
    with pytest.raises(ValueError, match="parse"):
        model_manager.parse_model_config_text("model_config_list { config { nme: 'x' } }")


def test_hot_swap_and_corrupt_version(templates, tmp_path, caplog):
    base = str(tmp_path / "base" / "m")
    _install(templates, base, 1)
    calls = []

    def counting_loader(path):
        calls.append(path)
        return model_manager.default_loader(path)

    srv = Server(
        [model_manager.ModelConfig("m", base)],
        grpc_port=0,
        rest_port=None,
        poll_wait_seconds=POLL,
        loader=counting_loader,
    )
    srv.start()
    failures, versions, stop = [], [], threading.Event()

    def loop():
        c = client_lib.PredictClient(f"127.0.0.1:{srv.grpc_port}", "m")
        while not stop.is_set():
            try:
                versions.append(int(c.predict({"history": [["a", "b"]]})["version"][0]))
            except grpc.RpcError as e:
                failures.append(e)
        c.close()

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        time.sleep(0.3)
        _install(templates, base, 2)
        deadline = time.monotonic() + 30
        while (not versions or versions[-1] != 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert versions and versions[-1] == 2
        with caplog.at_level(logging.ERROR, logger="dnc.serving"):
            os.makedirs(os.path.join(base, ".tmp-3"))
            with open(os.path.join(base, ".tmp-3", "saved_model.pb"), "wb") as f:
                f.write(b"garbage, not a SavedModel")
            os.rename(os.path.join(base, ".tmp-3"), os.path.join(base, "3"))
            deadline = time.monotonic() + 20
            while "version 3 failed" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(5 * POLL)  # several more polls: must not retry version 3
        assert "version 3 failed to load" in caplog.text
        assert sum(p.endswith(os.sep + "3") for p in calls) == 1
        n = len(versions)
        time.sleep(0.3)
        assert len(versions) > n and set(versions[n:]) == {2}
        statuses = srv.manager.model("m").statuses()
        assert [(s.version, s.state.name) for s in statuses] == [
            (3, "END"),
            (2, "AVAILABLE"),
            (1, "END"),
        ]
        assert statuses[0].error
    finally:
        stop.set()
        thread.join(10)
        srv.stop(1)
    assert not failures, failures[:3]
    assert versions[0] == 1 and versions[-1] == 2
    assert versions == sorted(versions)  # never switches back


def test_model_config_file_two_models(templates, tmp_path):
    for name, version in (("alpha", 1), ("beta", 2)):
        _install(templates, str(tmp_path / name), version)
    config = tmp_path / "models.config"
    config.write_text(
        "model_config_list {\n"
        f"  config {{ name: 'alpha' base_path: '{tmp_path / 'alpha'}'\n"
        "    model_platform: 'tensorflow' }\n"
        f"  config {{ name: 'beta' base_path: '{tmp_path / 'beta'}' }}\n"
        "}\n"
    )
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([f"--model_config_file={config}", "--port=0", "--rest_api_port=0"])
    models = model_manager.parse_model_config_text(config.read_text())
    assert [m.name for m in models] == ["alpha", "beta"]
    with Server(
        models, grpc_port=args.port, rest_port=args.rest_api_port, poll_wait_seconds=0
    ) as srv:
        for name, version in (("alpha", 1), ("beta", 2)):
            out = client_lib.RestClient(f"127.0.0.1:{srv.rest_port}", name).predict(
                {"history": [["a"]]}
            )
            assert out["version"].tolist() == [version]


def test_default_loader_prefers_export(monkeypatch, templates):
    seen = []
    fake = types.ModuleType("serving.export")
    fake.load_exported = lambda path: seen.append(path) or tf.saved_model.load(path)
    monkeypatch.setitem(sys.modules, "serving.export", fake)
    obj = model_manager.default_loader(templates[1])
    assert seen == [templates[1]] and "retrieve" in obj.signatures
    del fake.load_exported
    assert "retrieve" in model_manager.default_loader(templates[1]).signatures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_serve_sigterm_finishes_in_flight(templates, tmp_path):
    _install(templates, str(tmp_path / "m"), 1)
    grpc_port, rest_port = _free_port(), _free_port()
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(
        [
            "--model_name=m",
            f"--model_base_path={tmp_path / 'm'}",
            f"--port={grpc_port}",
            f"--rest_api_port={rest_port}",
            "--file_system_poll_wait_seconds=0.2",
            "--grace_seconds=5",
        ]
    )
    result = {}

    def in_flight_then_sigterm():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client_lib.RestClient(f"127.0.0.1:{rest_port}", "m").status()
                break
            except OSError:
                time.sleep(0.1)
        body = json.dumps({"instances": [["a", "b"]]}).encode()
        conn = socket.create_connection(("127.0.0.1", rest_port), timeout=10)
        conn.sendall(
            b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        time.sleep(0.3)  # the handler is now waiting for the rest of the body
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        conn.sendall(body[5:])
        result["response"] = conn.makefile("rb").read()
        conn.close()

    thread = threading.Thread(target=in_flight_then_sigterm)
    thread.start()
    assert run_serve(args) == 0
    thread.join(15)
    assert result["response"].startswith(b"HTTP/1.0 200"), result
    assert b'"item_ids": ["b", "a"]' in result["response"]
