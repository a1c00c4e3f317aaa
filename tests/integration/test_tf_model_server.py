"""The stock ``tensorflow_model_server`` binary serving a brute-force export.

serving/README-deploy.md documents serving brute-force exports with the stock
``tensorflow/serving`` image. When ``tensorflow_model_server`` is on ``PATH`` (e.g. inside
that image or the one of serving/Dockerfile.tfserving, with this project's Python
environment), the real binary is started on free ports and queried through the real
``PredictionService`` stub; otherwise that test is skipped. The op check below runs
everywhere: a brute-force export must use only stock TensorFlow ops (no ScaNN op), which
is what lets the stock server load it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Dict, Iterator, Set

import numpy as np
import pytest
import tensorflow as tf

from serving.export import export_model, load_exported
from tests.integration.test_export import _train
from trainer import data

BINARY_NAME = "tensorflow_model_server"
MODEL_NAME = "dnc"
BRUTE = dict(
    index="brute-force", max_num_results=20, default_num_results=10, max_history=20, alpha=1.0
)
START_SECONDS = 120.0


SKIP_REASON = (
    f"{BINARY_NAME} not on PATH: the real TF Serving binary is not installable here "
    "(run inside tensorflow/serving:2.16.1 or the serving/Dockerfile.tfserving image "
    "with the project's Python environment to exercise this test)"
)


def _binary() -> str:
    path = shutil.which(BINARY_NAME)
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory) -> Dict[str, str]:
    """A tiny dnc model trained for a few steps and exported with brute force (version 1)."""
    root = tmp_path_factory.mktemp("tf_model_server")
    model_dir = _train(tiny_data, root / "model", "dnc", steps=3, eval_users=20, eval_m=(5,))
    base = str(root / "models")
    output = os.path.join(base, MODEL_NAME)
    version = export_model(model_dir, tiny_data, output, **BRUTE)
    return {
        "model_dir": model_dir,
        "data": tiny_data,
        "base": base,
        "output": output,
        "version": version,
    }


def _graph_ops(version_dir: str) -> Set[str]:
    """Op types used by the SavedModel graph and its function library."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops: Set[str] = set()
    functions: Set[str] = set()
    for meta in proto.meta_graphs:
        ops |= {node.op for node in meta.graph_def.node}
        for fn in meta.graph_def.library.function:
            functions.add(fn.signature.name)
            ops |= {node.op for node in fn.node_def}
    return ops - functions


def test_brute_force_export_uses_only_stock_tensorflow_ops(exported, tmp_path):
    from tensorflow.python.framework import op_def_registry

    ops = _graph_ops(exported["version"])
    assert ops, "no ops found in the SavedModel"
    assert not {op for op in ops if "scann" in op.lower()}
    unknown = {op for op in ops if op_def_registry.get(op) is None}
    assert not unknown, f"ops not registered by TensorFlow: {sorted(unknown)}"
    # The check is meaningful: a ScaNN export of the same model does use ScaNN ops.
    scann = export_model(
        exported["model_dir"],
        exported["data"],
        str(tmp_path / "scann" / MODEL_NAME),
        index="scann",
        max_num_results=10,
        default_num_results=10,
        max_history=20,
        max_exclude=0,  # k = 30 < the ~40-item clusters: ScaNN trees, not brute force
        alpha=1.0,
        scann_min_size=16,
    )
    assert {op for op in _graph_ops(scann) if op.startswith("Scann")}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def model_server(exported, tmp_path) -> Iterator[Dict[str, object]]:
    """The real binary serving ``exported`` (gRPC only, REST disabled), stopped afterwards."""
    binary = _binary()
    port = _free_port()
    log_path = tmp_path / "model_server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(  # noqa: S603
            [
                binary,
                f"--port={port}",
                "--rest_api_port=0",
                f"--model_name={MODEL_NAME}",
                f"--model_base_path={exported['output']}",
                "--file_system_poll_wait_seconds=1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield {"target": f"127.0.0.1:{port}", "process": process, "log": log_path}
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_available(server: Dict[str, object]) -> None:
    """Polls GetModelStatus until version 1 is AVAILABLE (bounded by START_SECONDS)."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    process: subprocess.Popen = server["process"]  # type: ignore[assignment]
    deadline = time.monotonic() + START_SECONDS
    with grpc.insecure_channel(str(server["target"])) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL_NAME
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log = server["log"].read_text(errors="replace")  # type: ignore[union-attr]
                pytest.fail(f"{BINARY_NAME} exited with {process.returncode}:\n{log[-4000:]}")
            try:
                response = stub.GetModelStatus(request, timeout=5)
            except grpc.RpcError:
                time.sleep(0.5)
                continue
            states = [s.state for s in response.model_version_status]
            if get_model_status_pb2.ModelVersionStatus.AVAILABLE in states:
                return
            time.sleep(0.5)
    log = server["log"].read_text(errors="replace")  # type: ignore[union-attr]
    pytest.fail(f"model not AVAILABLE after {START_SECONDS:.0f} s:\n{log[-4000:]}")


@pytest.mark.skipif(shutil.which(BINARY_NAME) is None, reason=SKIP_REASON)
def test_stock_model_server_serves_the_brute_force_export(exported, model_server):
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    _wait_available(model_server)
    reference = load_exported(exported["version"])
    raw_ids = data.load_items(exported["data"]).item_ids[:3]
    history = np.array([[str(v).encode() for v in raw_ids]], dtype=object)
    with grpc.insecure_channel(str(model_server["target"])) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL_NAME
        request.model_spec.signature_name = "serving_default"
        request.inputs["history"].CopyFrom(tf.make_tensor_proto(history))
        response = stub.Predict(request, timeout=30)
        outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
        expected = reference.signatures["serving_default"](history=tf.constant(history))
        assert set(outputs) == {"item_ids", "scores", "clusters"}
        assert outputs["item_ids"].shape == (1, BRUTE["default_num_results"])
        np.testing.assert_array_equal(outputs["item_ids"], expected["item_ids"].numpy())
        np.testing.assert_allclose(outputs["scores"], expected["scores"].numpy(), rtol=1e-5)
        assert not set(outputs["item_ids"][0].tolist()) & set(history[0].tolist())

        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL_NAME
        request.model_spec.signature_name = "retrieve"
        request.inputs["history"].CopyFrom(tf.make_tensor_proto(history))
        request.inputs["alpha"].CopyFrom(tf.make_tensor_proto(np.float32(0.5)))
        request.inputs["num_results"].CopyFrom(tf.make_tensor_proto(np.int32(5)))
        response = stub.Predict(request, timeout=30)
        assert tf.make_ndarray(response.outputs["item_ids"]).shape == (1, 5)

        request.inputs["num_results"].CopyFrom(tf.make_tensor_proto(np.int32(10_000)))
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
