"""A ScaNN export whose trees are really partitioned, served by ``dnc serve``.

The pipeline's default export is ScaNN, so this is the path users take: 2,000 items in
two clusters of about 1,000, so each cluster's tree has about 32 leaves of which a few
are searched. The model is trained (not random) so that its embeddings have the structure
ANN search relies on, and the served lists must recall >= 0.95 of the exact lists of a
brute-force export of the same model. The filters of ``retrieve_filtered`` and their
INVALID_ARGUMENT errors go through the real ``tensorflow-serving-api`` stub.
"""

import json
import os

import grpc
import numpy as np
import pytest
import tensorflow as tf

from pipeline.cli import main
from serving.client import PredictClient
from serving.export import METADATA_DIR, METADATA_FILE, ExportConfig, build_module
from tests.integration.serving_process import dnc_serve
from trainer import data

M = 20
USERS = 40


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("scann")
    data_dir, model_dir = str(root / "data"), str(root / "model")
    preprocess = ["preprocess", "--source=synthetic", "--synthetic-users=800"]
    preprocess += ["--synthetic-items=2000", "--synthetic-categories=2", "--num-clusters=2"]
    preprocess += ["--synthetic-mean-length=30", f"--output={data_dir}"]
    assert main(["--log-level=WARNING"] + preprocess) == 0
    train = ["train", f"--data={data_dir}", f"--output={model_dir}", "--variant=dnc"]
    train += ["--epochs=4", "--steps-per-epoch=40", "--batch-size=64", "--max-len=20"]
    train += ["--dim=32", "--blocks=1", "--eval-users=100", "--eval-m=20"]
    assert main(["--log-level=WARNING"] + train) == 0
    out = {"data": data_dir, "model": model_dir}
    for index in ("scann", "brute-force"):
        base = str(root / index / "dnc")
        export = ["export", f"--model={model_dir}", f"--data={data_dir}", f"--output={base}"]
        export += [f"--index={index}", f"--num-results={M}", "--max-num-results=50"]
        export += ["--max-history=30", "--max-exclude=10", "--merge=score", "--alpha=1"]
        export += ["--scann-min-size=256"]
        assert main(["--log-level=WARNING"] + export) == 0
        with open(os.path.join(base, "1", METADATA_DIR, METADATA_FILE)) as f:
            out[index] = {"base": base, "metadata": json.load(f)}
    return out


@pytest.fixture(scope="module")
def histories(exports):
    items = data.load_items(exports["data"])
    ev = data.evaluation_data(exports["data"], "test", 20, max_users=USERS, seed=5)
    return [list(items.item_ids[h - 1]) for h in ev.exclude]


@pytest.fixture(scope="module")
def server(exports):
    """One ``dnc serve`` with both exports: ``scann`` and ``exact`` (brute force)."""
    with dnc_serve(exports["scann"]["base"], "scann", exact=exports["brute-force"]["base"]) as s:
        yield s


def _lists(server, name, histories):
    with PredictClient(server["grpc"], name) as client:
        return [client.retrieve(h, num_results=M, alpha=1.0) for h in histories]


def test_the_trees_are_partitioned(exports):
    plans = exports["scann"]["metadata"]["index"]["plans"]
    assert [p["kind"] for p in plans] == ["scann", "scann"]
    for plan in plans:
        assert plan["num_leaves_to_search"] < plan["num_leaves"], plan


def test_served_scann_recalls_the_exact_lists(server, histories):
    approximate = _lists(server, "scann", histories)
    exact = _lists(server, "exact", histories)
    pairs = zip(approximate, exact, strict=True)
    found = [len(set(a["item_ids"][0]) & set(e["item_ids"][0])) for a, e in pairs]
    recall = sum(found) / (M * len(histories))
    print(f"ScaNN recall@{M} against exact: {recall:.4f}")
    assert recall >= 0.95, recall


def test_the_global_index_recalls_the_exact_lists(exports, histories):
    """At prompt weight 0 unrestricted requests search one index over all items, whose
    ScaNN tree is searched more sparsely (``global_leaves_fraction``) than the clusters'."""
    raw = np.full((len(histories), max(map(len, histories))), "", dtype=object)
    for row, history in enumerate(histories):
        raw[row, : len(history)] = history
    lists, plans = {}, {}
    for index in ("scann", "brute-force"):
        config = ExportConfig(
            model_dir=exports["model"], data_dir=exports["data"], output="unused", index=index,
            max_num_results=50, default_num_results=M, max_history=30, max_exclude=10,
            merge="score", alpha=1.0, prompt_weight=0.0, scann_min_size=256,
        )  # fmt: skip
        module, metadata = build_module(config)
        plans[index] = metadata["index"]["global_plan"]
        assert plans[index]["kind"] == index, plans[index]
        assert plans[index]["size"] == metadata["num_items"] > 1900, plans[index]
        out = module.retrieve(tf.constant(raw), tf.constant(1.0), tf.constant(M))
        lists[index] = out["item_ids"].numpy()
    assert plans["scann"]["num_leaves_to_search"] < plans["scann"]["num_leaves"], plans
    pairs = zip(lists["scann"], lists["brute-force"], strict=True)
    recall = np.mean([len(set(a) & set(e)) / M for a, e in pairs])
    print(f"global ScaNN index recall@{M} against exact: {recall:.4f}")
    assert recall >= 0.95, recall


def test_filters_and_their_errors_over_grpc(server, histories):
    history = histories[0]
    with PredictClient(server["grpc"], "scann") as client:
        plain = client.retrieve(history, num_results=M, alpha=1.0)
        top = [x.decode() for x in plain["item_ids"][0][:3]]
        out = client.retrieve(history, num_results=M, alpha=1.0, clusters=[1], exclude=top)
        assert set(out["clusters"][0].tolist()) == {1}
        assert not set(top) & {x.decode() for x in out["item_ids"][0]}
        with pytest.raises(grpc.RpcError) as error:
            client.retrieve(history, num_results=M, clusters=[7])
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "clusters must be cluster ids < K=2" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            client.retrieve(history, num_results=M, exclude=[str(i) for i in range(11)])
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_exclude=10" in error.value.details()
