"""Hostile and malformed requests against a real in-process server (gRPC stub and HTTP).

Every request must get a well-formed error status (never UNKNOWN/INTERNAL, never HTTP 500)
or a correct answer, the server must keep answering afterwards, and model names must never
reach the filesystem.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import urllib.parse
from typing import Any, Dict, List, Tuple

import grpc
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import example, given
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from serving import model_manager
from serving.server import Server
from tests.integration.hostile import (
    CLEAN_HTTP,
    DTYPE_ENUMS,
    MAX_BYTES,
    MAX_ELEMENTS,
    MAX_HISTORY,
    NAMES,
    REQUEST_INPUTS,
    SETTINGS,
    assert_clean,
    b64,
    call,
    ids,
    json_values,
    rest,
    rows,
)
from tests.integration.tiny_model import install, make_request


@pytest.fixture(scope="module")
def served(templates, tmp_path_factory):
    """A server of model "m" (v1, label "stable" -> 1, "canary" -> 7) next to a decoy.

    ``secret/1`` beside the base path is a valid SavedModel: a server that resolved a
    path-like model name would load and serve it. Polling is off, so after start-up the
    server has no reason to touch the filesystem.
    """
    root = tmp_path_factory.mktemp("props")
    base = str(root / "m")
    install(templates, base, 1)
    install(templates, str(root / "secret"), 2, as_version=1)
    loaded: List[str] = []

    def recording_loader(path: str) -> Any:
        loaded.append(path)
        return model_manager.default_loader(path)

    srv = Server(
        [model_manager.ModelConfig("m", base, {"stable": 1, "canary": 7})],
        grpc_port=0,
        rest_port=0,
        poll_wait_seconds=0,
        max_request_bytes=MAX_BYTES,
        max_request_elements=MAX_ELEMENTS,
        max_history_length=MAX_HISTORY,
        request_timeout_seconds=20,
        loader=recording_loader,
    )
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}")
    yield {
        "server": srv,
        "root": str(root),
        "base": base,
        "loaded": loaded,
        "channel": channel,
        "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel),
        "status": model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus,
    }
    channel.close()
    srv.stop(1)


def _assert_healthy(served: Dict[str, Any]) -> None:
    request = make_request(history=np.array([[b"a", b"b"]], dtype=object))
    response = served["predict"].Predict(request, timeout=20)
    assert tf.make_ndarray(response.outputs["item_ids"]).tolist() == [[b"b", b"a"]]
    status, body = rest(served, "POST", "/v1/models/m:predict", b'{"instances": [["x", "y"]]}')
    assert (status, body) == (200, {"predictions": [{"item_ids": ["y", "x"], "version": 1}]})


@SETTINGS
@given(
    name=st.one_of(st.just("m"), st.just("m"), NAMES),
    signature=st.one_of(
        st.sampled_from(["", "serving_default"]),
        st.sampled_from(["retrieve", "nope", "../retrieve", "serving_default\0"]),
    ),
    inputs=REQUEST_INPUTS,
    choice=st.one_of(
        st.just(("", None)),
        st.just(("", None)),
        st.just(("version", 1)),
        st.tuples(st.just("version"), st.integers(-(2**63), 2**63 - 1)),
        st.tuples(st.just("version_label"), st.sampled_from(["stable", "canary", "../x", ""])),
        st.tuples(st.just("version_label"), st.text()),
    ),
    output_filter=st.one_of(
        st.just([]),
        st.just([]),
        st.lists(st.sampled_from(["item_ids", "version", "x"]), max_size=2),
    ),
)
def test_grpc_predict_random_inputs(served, name, signature, inputs, choice, output_filter):
    request = make_request(name, signature, **inputs)
    if choice[0] == "version":
        request.model_spec.version.value = choice[1]
    elif choice[0] == "version_label":
        request.model_spec.version_label = choice[1]
    request.output_filter.extend(output_filter)
    code, answer = call(served["predict"].Predict, request)
    if code != grpc.StatusCode.OK:
        assert_clean(code, answer, request)
        return
    assert name == "m" and answer.model_spec.version.value == 1
    history = inputs["history"]
    if answer.model_spec.signature_name == "serving_default" and "item_ids" in answer.outputs:
        assert history.ndim == 2 and history.shape[1] <= MAX_HISTORY
        reversed_ids = tf.make_ndarray(answer.outputs["item_ids"]).tolist()
        assert reversed_ids == history[:, ::-1].tolist()


@SETTINGS
@given(
    alpha=st.floats(allow_nan=True, allow_infinity=True, width=32),
    num_results=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 12)),
    history=st.lists(ids, min_size=0, max_size=5),
)
@example(alpha=9.541302515039711e-39, num_results=3, history=[])  # a subnormal alpha (CI)
def test_retrieve_scalars_grpc_and_rest(served, alpha, num_results, history):
    """NaN/inf alpha and any num_results: exact answers in range, INVALID_ARGUMENT outside."""
    request = make_request(
        signature="retrieve",
        history=np.array([history], dtype=object).reshape(1, len(history)),
        alpha=np.float32(alpha),
        num_results=np.int32(num_results),
    )
    code, answer = call(served["predict"].Predict, request)
    body = {
        "signature_name": "retrieve",
        "inputs": {"history": [[""] * len(history)], "alpha": alpha, "num_results": num_results},
    }
    status, rest_answer = rest(served, "POST", "/v1/models/m:predict", json.dumps(body).encode())
    if 0 <= num_results <= 10:
        assert code == grpc.StatusCode.OK, answer
        ids_out = tf.make_ndarray(answer.outputs["item_ids"])[0].tolist()
        assert ids_out == [f"v1_{i}".encode() for i in range(num_results)]
        scores = tf.make_ndarray(answer.outputs["scores"])[0]
        tiny = np.finfo(np.float32).tiny
        # TF on CPU treats a subnormal input as zero and flushes subnormal results to zero.
        graph_alpha = np.float32(0.0 if abs(np.float32(alpha)) < tiny else alpha)
        with np.errstate(over="ignore", invalid="ignore"):
            expected_scores = graph_alpha * np.arange(num_results, dtype=np.float32)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=tiny, equal_nan=True)
        assert status == 200 and len(rest_answer["outputs"]["item_ids"][0]) == num_results
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, answer
        expected = "num_results must be >= 0" if num_results < 0 else "num_results must be <= 10"
        assert expected in answer
        assert "node" not in answer and "[Op:" not in answer  # no graph internals
        assert status == 400 and expected in rest_answer["error"]


@SETTINGS
@given(
    key=st.sampled_from(["history", "alpha", "num_results"]),
    dtype=DTYPE_ENUMS,
    dims=st.lists(
        st.one_of(st.integers(-3, 5), st.sampled_from([2**31, 2**62, 10**6])), max_size=4
    ),
    unknown_rank=st.booleans(),
    string_val=st.lists(st.binary(max_size=8), max_size=6),
    float_val=st.lists(st.floats(width=32), max_size=4),
    int_val=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4),
    content=st.binary(max_size=64),
    signature=st.sampled_from(["", "retrieve"]),
)
def test_grpc_raw_tensor_protos(
    served, key, dtype, dims, unknown_rank, string_val, float_val, int_val, content, signature
):
    """Hand-made TensorProtos: invalid dtype enums, negative/huge dims, mismatched values."""
    proto = tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims],
            unknown_rank=unknown_rank,
        ),
        string_val=string_val,
        float_val=float_val,
        int_val=int_val,
        tensor_content=content,
    )
    others = {
        "history": np.array([[b"a"]], dtype=object),
        "alpha": np.float32(1),
        "num_results": np.int32(2),
    }
    others[key] = proto
    if not signature:
        others = {"history": others["history"]}
    code, answer = call(served["predict"].Predict, make_request(signature=signature, **others))
    if code != grpc.StatusCode.OK:
        assert_clean(code, answer, proto)


METHODS = [
    "/tensorflow.serving.PredictionService/Predict",
    "/tensorflow.serving.PredictionService/GetModelMetadata",
    "/tensorflow.serving.PredictionService/Classify",
    "/tensorflow.serving.ModelService/GetModelStatus",
    "/tensorflow.serving.ModelService/HandleReloadConfigRequest",
]


@SETTINGS
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=200))
def test_grpc_raw_bytes(served, method, payload):
    """Arbitrary bytes as a request message: unparsable ones are INVALID_ARGUMENT."""
    raw = served["channel"].unary_unary(method)  # no serializers: raw bytes both ways
    code, answer = call(raw, payload)
    if code != grpc.StatusCode.OK:
        assert_clean(code, answer, payload)


def _expected_for_name(name: str) -> grpc.StatusCode:
    try:
        model_manager.validate_model_name(name)
    except ValueError:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.OK if name == "m" else grpc.StatusCode.NOT_FOUND


@SETTINGS
@given(name=NAMES)
def test_model_names_every_api(served, name):
    """Path-like and random names: INVALID_ARGUMENT or NOT_FOUND, on all five entry points."""
    expected = _expected_for_name(name)
    code, _ = call(served["predict"].Predict, make_request(name, history=[["a"]]))
    assert code == expected
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = name
    assert call(served["predict"].GetModelMetadata, metadata)[0] == expected
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = name
    assert call(served["status"], status)[0] == expected
    quoted = urllib.parse.quote(name, safe="")
    http_expected = {
        grpc.StatusCode.OK: 200,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
    }[expected]
    if not name:
        http_expected = 404  # "/v1/models/:predict" is not a route
    body = b'{"instances": [["a"]]}'
    assert rest(served, "POST", f"/v1/models/{quoted}:predict", body)[0] == http_expected
    assert rest(served, "GET", f"/v1/models/{quoted}")[0] == http_expected
    assert rest(served, "GET", f"/v1/models/{quoted}/metadata")[0] == http_expected


@SETTINGS
@given(
    version=st.one_of(st.just("1"), st.text(max_size=22), st.integers(-5, 10**20).map(str)),
    label=st.one_of(st.just("stable"), st.just("canary"), st.text(max_size=10)),
)
def test_rest_versions_and_labels(served, version, label):
    quoted = urllib.parse.quote(version, safe="")
    if version and all("0" <= c <= "9" for c in version) and len(version) <= 18:
        expected = 200 if int(version) == 1 else 404
    else:
        expected = 404 if not version else 400
    body = b'{"instances": [["a"]]}'
    path = f"/v1/models/m/versions/{quoted}:predict"
    assert rest(served, "POST", path, body)[0] == expected, version
    path = f"/v1/models/m/labels/{urllib.parse.quote(label, safe='')}:predict"
    expected = 200 if label == "stable" else 404  # "canary" -> 7 is not loaded
    assert rest(served, "POST", path, body)[0] == expected, label


@SETTINGS
@given(
    body=st.one_of(
        st.binary(max_size=60),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"instances": st.one_of(json_values, rows)},
            optional={"signature_name": json_values, "inputs": json_values},
        ).map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({"inputs": json_values}).map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"[" * 5000, b'{"instances": ' + b"[" * 100 + b"]" * 100 + b"}"]),
        st.just(b'{"instances": [["\\ud800"]]}'),
        st.just(b'{"instances": [[' + b"1" * 5000 + b"]]}"),
    ),
    path=st.sampled_from(
        ["/v1/models/m:predict", "/v1/models/m/versions/1:predict", "/v1/models/m:regress"]
    ),
)
def test_rest_malformed_bodies(served, body, path):
    status, answer = rest(served, "POST", path, body)
    assert status in CLEAN_HTTP, (status, answer, body)
    if status != 200:
        assert isinstance(answer["error"], str) and answer["error"], body
    else:
        assert set(answer) <= {"predictions", "outputs"}, answer


@SETTINGS
@given(
    rows_in=st.lists(
        st.lists(st.text(max_size=6) | b64, min_size=3, max_size=3), min_size=1, max_size=5
    )
)
def test_rest_unicode_and_binary_ids_round_trip(served, rows_in):
    """Unicode and b64 binary ids come back reversed, byte for byte (text when valid UTF-8)."""
    body = json.dumps({"instances": rows_in}).encode()
    status, answer = rest(served, "POST", "/v1/models/m:predict", body)

    def as_bytes(v: Any) -> bytes:
        return base64.b64decode(v["b64"]) if isinstance(v, dict) else v.encode("utf-8")

    assert status == 200, answer
    got = [[as_bytes(v) for v in p["item_ids"]] for p in answer["predictions"]]
    assert got == [[as_bytes(v) for v in reversed(r)] for r in rows_in]


@SETTINGS
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"]),
    path=st.one_of(
        st.text(max_size=40).map(lambda t: urllib.parse.quote(t, safe="/:%?=&")),
        st.text(max_size=20).map(lambda t: "/v1/models/" + urllib.parse.quote(t, safe="/:")),
        st.sampled_from(
            [
                "/",
                "//",
                "/v1/models",
                "/v1/models/m/versions/1/labels/x",
                "/v1/models/m:x",
                "/v1/models/m/metadata/x",
                "/v1/models/m:predict?x=1",
                "/v1/models/m" + "/x" * 500,
            ]
        ),
    ),
)
def test_rest_random_methods_and_paths(served, method, path):
    """Any method on any path: a JSON error (or a status/metadata answer), never HTML."""
    status, answer = rest(served, method, path if path.startswith("/") else "/" + path, b"{}")
    assert status in CLEAN_HTTP | {501}, (method, path, status)
    assert status == 200 or answer["error"]


def test_rest_protocol_errors_are_json(served):
    port = served["server"].rest_port
    for request, expected in (
        (b"GET /" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/9.9\r\n\r\n", 505),
        (b"BREW /v1/models/m HTTP/1.1\r\n\r\n", 501),
        (b"GET /v1/models/m HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", 431),
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(request)
            conn.shutdown(socket.SHUT_WR)
            response = conn.makefile("rb").read()
        head, _, body = response.partition(b"\r\n\r\n")
        assert int(head.split()[1]) == expected, head
        assert json.loads(body)["error"]


def test_server_still_answers_after_fuzzing(served):
    """Runs after the properties above (file order): nothing they sent broke the server."""
    _assert_healthy(served)
    assert served["server"].manager.model("m").statuses()[0].state.name == "AVAILABLE"


def test_path_like_names_never_touch_the_filesystem(served):
    """Path-like names are rejected before any file access: no open/listdir/scandir at all
    while they are handled, the decoy SavedModel beside the base path is never loaded."""
    events: List[Tuple[str, Any]] = []
    recording = [True]

    def hook(event: str, args: Tuple[Any, ...]) -> None:
        if recording[0] and event in ("open", "os.listdir", "os.scandir", "os.stat"):
            events.append((event, args[0] if args else None))

    sys.addaudithook(hook)  # cannot be removed: disarmed by the flag below
    try:
        secret = os.path.join(served["root"], "secret")
        hostile = ["../secret", "..", "/etc", "a/b", "m/../../secret", secret, "m\0x", "..%2F"]
        for name in hostile:
            code, details = call(served["predict"].Predict, make_request(name, history=[["a"]]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid model name" in details
            quoted = urllib.parse.quote(name, safe="")
            status, answer = rest(served, "GET", f"/v1/models/{quoted}/metadata")
            assert status == 400 and "invalid model name" in answer["error"]
    finally:
        recording[0] = False
    assert events == []
    assert served["loaded"] == [os.path.join(os.path.realpath(served["base"]), "1")]
    assert os.path.isdir(os.path.join(served["root"], "secret", "1"))  # the decoy exists
