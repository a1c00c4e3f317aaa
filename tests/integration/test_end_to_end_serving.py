"""preprocess -> train -> export -> `dnc serve` -> Predict over the real gRPC stub and REST.

The served items must be the ones the trainer's own evaluation path returns for the
brute-force export (same merge, alpha and prompt weight as selected at export, same
histories).
"""

import json
import os
import urllib.request

import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from pipeline.cli import main
from serving.export import METADATA_DIR, METADATA_FILE
from tests.integration.serving_process import dnc_serve
from tests.integration.test_export import raw_requests
from trainer import data, evaluation
from trainer.train import ModelScorer, load_model

USERS = 12
M = 10


@pytest.fixture(scope="module")
def served(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model_dir, base = str(root / "model"), str(root / "serving" / "dnc")
    train = ["train", f"--data={tiny_data}", f"--output={model_dir}", "--variant=dnc"]
    train += ["--epochs=1", "--steps-per-epoch=5", "--batch-size=32", "--max-len=10"]
    train += ["--dim=16", "--blocks=1", "--eval-users=30", "--eval-m=10"]
    assert main(["--log-level=WARNING"] + train) == 0
    export = ["export", f"--model={model_dir}", f"--data={tiny_data}", f"--output={base}"]
    export += ["--index=brute-force", f"--num-results={M}", "--max-history=100"]
    assert main(["--log-level=WARNING"] + export) == 0
    with open(os.path.join(base, "1", METADATA_DIR, METADATA_FILE)) as f:
        metadata = json.load(f)
    selected = {
        "alpha": float(metadata["alpha"]),
        "merge": metadata["merge"],
        "prompt_weight": float(metadata.get("prompt_weight", 1.0)),
    }
    with dnc_serve(base, "dnc") as server:
        yield {"model_dir": model_dir, **selected, **server}


@pytest.fixture(scope="module")
def reference(tiny_data, served):
    """Histories of some test users and the trainer's exact merged top-M for them."""
    items = data.load_items(tiny_data)
    ev = data.evaluation_data(tiny_data, "test", 10, max_users=USERS, seed=3)
    model, _ = load_model(served["model_dir"], tiny_data)
    exact = evaluation.retrieve(
        ModelScorer(model), ev.histories, ev.exclude, items.item_cluster, m=M,
        alpha=served["alpha"], merge=served["merge"],
        prompt_weight=served["prompt_weight"], progress=False,
    )  # fmt: skip
    raw = raw_requests(ev.exclude, items)
    expected = [{items.item_ids[i - 1] for i in row if i} for row in exact]
    return raw, expected


def test_grpc_predict_returns_the_trainers_items(served, reference):
    raw, expected = reference
    stub = prediction_service_pb2_grpc.PredictionServiceStub(served["channel"])
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dnc"
    request.model_spec.signature_name = "serving_default"
    request.inputs["history"].CopyFrom(tf.make_tensor_proto(raw.astype(bytes)))
    reply = stub.Predict(request, timeout=30)
    item_ids = tf.make_ndarray(reply.outputs["item_ids"])
    assert item_ids.shape == (USERS, M)
    assert reply.model_spec.version.value == 1
    for row, want in zip(item_ids, expected, strict=True):
        assert {x.decode() for x in row} == want


def test_rest_predict_returns_the_same_items(served, reference):
    raw, expected = reference
    body = json.dumps({"instances": [{"history": list(row)} for row in raw]}).encode()
    request = urllib.request.Request(
        served["rest"] + "/v1/models/dnc:predict",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        predictions = json.load(response)["predictions"]
    assert len(predictions) == USERS
    for prediction, want in zip(predictions, expected, strict=True):
        assert set(prediction["item_ids"]) == want
        assert len(prediction["scores"]) == M


def test_dnc_query_prints_the_items(served, reference, capsys):
    raw, expected = reference
    history = ",".join(x for x in raw[0] if x)
    code = main(
        ["query", f"--server={served['grpc']}", "--model_name=dnc", f"--history={history}"]
        + [f"--num_results={M}", f"--alpha={served['alpha']}"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert sum(item in printed for item in expected[0]) == M
