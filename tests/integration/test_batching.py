"""Request batching (``--enable_batching``) over the real gRPC stub on loopback.

A tiny trained dnc model is exported twice (brute force with the quota merge, ScaNN with the
score merge, both with ``retrieve_filtered``) and served by two in-process servers, one
without batching (the reference) and one with it. Concurrent clients with different history
lengths, batch sizes, signatures, ``num_results`` and ``alpha`` must get, request by request,
what the reference gives (ids and clusters exactly, scores within float tolerance), while
sharing graph calls. A bad request in a batch gets INVALID_ARGUMENT alone; a full queue is
answered UNAVAILABLE; bad batching flags stop ``dnc serve`` with a clear message.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from typing import Any, Dict, Iterator, List, Tuple

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.batching_config import BatchingParameters
from serving.export import export_model
from serving.server import Server, add_serve_arguments, configure_tf_threads, run_serve
from tests.integration.serving_process import dnc_serve, in_process_server
from tests.integration.test_export import _train, raw_requests
from tests.integration.tiny_model import make_request
from trainer import data

CLIENTS = 8
PER_CLIENT = 12
BATCHING = BatchingParameters(
    max_batch_size=4, batch_timeout_micros=50_000, max_enqueued_batches=100, num_batch_threads=2
)
EXPORTS = {
    "bf": dict(index="brute-force", merge="quota", max_history=100),
    "scann": dict(index="scann", merge="score", max_history=20, scann_min_size=16),
}


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory) -> Dict[str, Any]:
    """Base paths of the two exports, plus request material (raw histories, ids, K)."""
    root = tmp_path_factory.mktemp("batching")
    model_dir = _train(tiny_data, root / "model", "dnc")
    bases = {}
    for name, options in EXPORTS.items():
        bases[name] = str(root / "serving" / name)
        export_model(
            model_dir,
            tiny_data,
            bases[name],
            alpha=1.0,
            max_num_results=20,
            default_num_results=10,
            max_exclude=4,
            **options,
        )
    items = data.load_items(tiny_data)
    ev = data.evaluation_data(tiny_data, "test", 10, max_users=40, seed=5)
    return {"bases": bases, "raw": raw_requests(ev.exclude, items), "items": items}


def _serve(bases: Dict[str, str], **kwargs: Any):
    return in_process_server(bases, grpc_port=0, rest_port=None, poll_wait_seconds=0, **kwargs)


@pytest.fixture(scope="module")
def servers(exported) -> Iterator[Dict[str, Server]]:
    with _serve(exported["bases"]) as plain, _serve(exported["bases"], batching=BATCHING) as b:
        yield {"plain": plain, "batched": b}


def _stub(server: Server) -> Tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    return channel, prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _outputs(response: Any) -> Dict[str, np.ndarray]:
    return {key: tf.make_ndarray(value) for key, value in response.outputs.items()}


def _history(raw: np.ndarray, rows: List[int], length: int) -> np.ndarray:
    """Rows of ``raw`` cut to their last ``length`` items (trailing "" dropped first)."""
    out = []
    for row in rows:
        items = [x for x in raw[row] if x]
        out.append(items[-length:] if length else items)
    width = max(len(r) for r in out)
    return np.asarray([r + [""] * (width - len(r)) for r in out], dtype=object)


def _requests(exported: Dict[str, Any]) -> List[Any]:
    """A mix of requests: both models, five signatures, 1-2 rows, histories of 1-all items,
    two num_results and two alphas (so several batch queues are busy at once)."""
    rng = np.random.default_rng(11)
    raw, items = exported["raw"], exported["items"]
    ids = np.asarray(items.item_ids, dtype=object)
    requests = []
    for i in range(CLIENTS * PER_CLIENT):
        model = "bf" if i % 2 == 0 else "scann"
        rows = [int(r) for r in rng.choice(len(raw), 1 + (i % 3 == 0), replace=False)]
        history = _history(raw, rows, int(rng.integers(0, 8)))
        kind = ("retrieve", "retrieve_filtered", "serving_default", "intent", "user_embedding")[
            i % 5
        ]
        inputs: Dict[str, Any] = {"history": history}
        if kind in ("retrieve", "retrieve_filtered"):
            inputs["alpha"] = np.float32((0.5, 1.0)[(i // 5) % 2])
            inputs["num_results"] = np.int32((5, 10)[(i // 10) % 2])
        if kind == "retrieve_filtered":
            width = int(rng.integers(1, 3))
            clusters = rng.integers(-1, items.num_clusters, (len(rows), width)).astype(np.int32)
            exclude = np.full((len(rows), int(rng.integers(0, 4))), "", dtype=object)
            exclude[:, : max(0, exclude.shape[1] - 1)] = rng.choice(
                ids, (len(rows), max(0, exclude.shape[1] - 1))
            )
            inputs.update(clusters=clusters, exclude=exclude)
        if kind == "user_embedding":
            inputs["cluster"] = rng.integers(0, items.num_clusters + 1, len(rows)).astype(np.int32)
        requests.append(make_request(model, "" if kind == "serving_default" else kind, **inputs))
    return requests


def _assert_same(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for key, value in want.items():
        assert got[key].shape == value.shape, f"{what}: {key}"
        if value.dtype.kind == "f":
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=what)
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=f"{what}: {key}")


def test_concurrent_batched_requests_equal_unbatched_calls(exported, servers):
    requests = _requests(exported)
    channel, stub = _stub(servers["plain"])
    with channel:
        expected = [_outputs(stub.Predict(r, timeout=30)) for r in requests]
    batched = servers["batched"]
    runs_before = {m: batched.manager.get(m).runs for m in EXPORTS}
    got: List[Any] = [None] * len(requests)
    errors: List[str] = []
    barrier = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        channel, stub = _stub(batched)
        with channel:
            barrier.wait()
            for i in range(c, len(requests), CLIENTS):
                try:
                    got[i] = _outputs(stub.Predict(requests[i], timeout=30))
                except grpc.RpcError as e:
                    errors.append(f"request {i}: {e.code()} {e.details()}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    mismatches = []
    for i, (out, want) in enumerate(zip(got, expected, strict=True)):
        spec = requests[i].model_spec
        try:
            _assert_same(out, want, f"request {i} ({spec.name}, {spec.signature_name})")
        except AssertionError as e:
            mismatches.append(str(e))
    assert not mismatches, f"{len(mismatches)} differ; the first: {mismatches[0]}"
    calls = sum(batched.manager.get(m).runs - runs_before[m] for m in EXPORTS)
    assert calls < len(requests), "no two requests shared a graph call"


def test_a_bad_request_in_a_batch_fails_alone(exported, servers, caplog):
    """Four filtered requests fill one batch (max_batch_size=4, long timeout); the one with
    an unknown cluster, which only the graph detects, gets INVALID_ARGUMENT."""
    params = BatchingParameters(
        max_batch_size=4,
        batch_timeout_micros=5_000_000,
        max_enqueued_batches=4,
        num_batch_threads=1,
    )
    raw = exported["raw"]
    requests = []
    for i in range(4):
        clusters = np.asarray([[99 if i == 2 else i % 3]], np.int32)
        inputs = {
            "history": _history(raw, [i], 3 + i),
            "alpha": np.float32(1.0),
            "num_results": np.int32(7),
            "clusters": clusters,
            "exclude": np.asarray([[""]], dtype=object),
        }
        requests.append(make_request("bf", "retrieve_filtered", **inputs))
    channel, stub = _stub(servers["plain"])
    with channel:
        expected = {
            i: _outputs(stub.Predict(r, timeout=30)) for i, r in enumerate(requests) if i != 2
        }
    results: Dict[int, Any] = {}
    with _serve({"bf": exported["bases"]["bf"]}, batching=params) as server:
        barrier = threading.Barrier(len(requests))

        def client(i: int) -> None:
            channel, stub = _stub(server)
            with channel:
                barrier.wait()
                try:
                    results[i] = _outputs(stub.Predict(requests[i], timeout=30))
                except grpc.RpcError as e:
                    results[i] = (e.code(), e.details())

        with caplog.at_level(logging.INFO, logger="dnc.serving"):
            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        runs = server.manager.get("bf").runs
    code, details = results[2]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "clusters must be cluster ids" in details
    for i, want in expected.items():
        _assert_same(results[i], want, f"request {i}")
    assert runs == 1 + len(requests)  # the failed batch, then each request alone
    assert any("running them one by one" in r.getMessage() for r in caplog.records)


class _Spin(tf.Module):
    """``serving_default``: ``seconds`` [B] -> ``done`` [B], after spinning max(seconds)."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="seconds")])
    def spin(self, seconds):
        start = tf.timestamp()
        limit = tf.cast(tf.reduce_max(seconds), tf.float64)
        (n,) = tf.while_loop(
            lambda i: tf.timestamp() - start < limit, lambda i: (i + 1,), [tf.constant(0)]
        )
        return {"done": tf.fill(tf.shape(seconds), n) * 0 + 1}


def _wait_for(condition: Any, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.005)


def test_a_full_queue_is_answered_unavailable(tmp_path):
    """One batch thread busy, one batch queued (max_enqueued_batches=1): the next request
    is refused with UNAVAILABLE at once, the two others are answered."""
    spin = _Spin()
    tf.saved_model.save(
        spin, str(tmp_path / "spin" / "1"), signatures={"serving_default": spin.spin}
    )
    params = BatchingParameters(
        max_batch_size=1, batch_timeout_micros=0, max_enqueued_batches=1, num_batch_threads=1
    )
    with _serve({"spin": str(tmp_path / "spin")}, batching=params) as server:
        batcher = server.batcher
        channel, stub = _stub(server)
        with channel:
            slow = make_request("spin", seconds=np.asarray([3.0], np.float32))
            fast = make_request("spin", seconds=np.asarray([0.0], np.float32))
            before = batcher.batches_run
            running = stub.Predict.future(slow, timeout=30)
            _wait_for(lambda: batcher.batches_run > before, "the batch thread took it")
            queued = stub.Predict.future(fast, timeout=30)
            _wait_for(lambda: batcher.queued_batches() == 1, "the second one is queued")
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(fast, timeout=30)
            assert not running.done()  # refused while the queue was full, not after
            assert tf.make_ndarray(running.result().outputs["done"]).tolist() == [1]
            assert tf.make_ndarray(queued.result().outputs["done"]).tolist() == [1]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    details = info.value.details()
    assert (
        "the batch queue of model 'spin' version 1 signature 'serving_default' is full" in details
    )
    assert "max_enqueued_batches=1" in details


def _serve_args(tmp_path, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    base = tmp_path / "none"
    base.mkdir(exist_ok=True)
    return parser.parse_args([f"--model_base_path={base}", "--port=0", "--rest_api_port=0", *flags])


def test_bad_batching_flags_stop_dnc_serve_with_a_message(tmp_path, caplog):
    bad = tmp_path / "batching.config"
    bad.write_text("max_batch_size { value: 8 }\nbatch_timeout: 5\n")
    cases = [
        ([f"--batching_parameters_file={bad}"], "without --enable_batching"),
        (
            ["--enable_batching", f"--batching_parameters_file={bad}"],
            'has no field named "batch_timeout"',
        ),
        (
            ["--enable_batching=true", f"--batching_parameters_file={tmp_path / 'missing'}"],
            "cannot read --batching_parameters_file",
        ),
        (["--tensorflow_intra_op_parallelism=-1"], "must be >= 0"),
    ]
    for flags, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="dnc.serving"):
            assert run_serve(_serve_args(tmp_path, *flags)) == 2
        assert any(message in r.getMessage() for r in caplog.records), (flags, caplog.text)
    assert _serve_args(tmp_path, "--enable_batching=false").enable_batching is False


def test_thread_pools_cannot_change_once_tensorflow_runs():
    tf.constant(1.0) + 1.0  # noqa: B018  (TensorFlow is initialized in this process)
    with pytest.raises(ValueError, match="cannot set TensorFlow's thread pools"):
        configure_tf_threads(intra_op=1)
    configure_tf_threads(0, 0)  # nothing asked: nothing to do


def test_dnc_serve_with_batching_and_thread_flags(exported, servers, tmp_path):
    """The command line end to end: a parameters file, thread pool sizes, gRPC answers."""
    config = tmp_path / "batching.config"
    config.write_text(
        "# TF Serving's format\nmax_batch_size { value: 8 }\nbatch_timeout_micros { value: 1000 }\n"
        "max_enqueued_batches { value: 16 }\nnum_batch_threads { value: 2 }\n"
        "pad_variable_length_inputs: true\n"
    )
    flags = [
        "--enable_batching",
        f"--batching_parameters_file={config}",
        "--tensorflow_intra_op_parallelism=1",
        "--tensorflow_inter_op_parallelism=2",
    ]
    history = _history(exported["raw"], [0, 1], 0)
    alpha, num_results = np.float32(1.0), np.int32(10)
    request = make_request("bf", "retrieve", history=history, alpha=alpha, num_results=num_results)
    channel, stub = _stub(servers["plain"])
    with channel:
        want = _outputs(stub.Predict(request, timeout=30))
    with dnc_serve(exported["bases"]["bf"], "bf", flags=flags) as served:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(served["channel"])
        _assert_same(_outputs(stub.Predict(request, timeout=30)), want, "dnc serve")
