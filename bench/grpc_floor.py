"""Benchmark: the fixed cost of one gRPC request, whatever the model does.

Issue 14 asks the gRPC p50 of ScaNN retrieval to be 10x below brute force. Over gRPC every
request pays a fixed cost on top of the graph call: the transport, the protos and the
server's Python path. This script measures that floor on a model that does almost nothing
(``serving_default`` returns the history it was sent, with zero scores: the response has the
shape of an M = 50 answer), so the floor can be set against the targets:

* ``grpc_echo``: a bare ``grpc`` server in a child process answering every Predict with a
  prebuilt response, queried with the ``tensorflow-serving-api`` stub and a prebuilt
  request: the transport alone (Python gRPC on both ends).
* ``dnc_serve_stub``: ``serving.server.Server`` (what ``dnc serve`` runs) in a child
  process serving the trivial SavedModel, queried with the same stub and prebuilt request:
  the transport plus the server's path (validation, tensor conversion, the graph call).
* ``dnc_serve_client``: the same server queried with ``serving.client.PredictClient``
  (numpy in, numpy out), as ``bench/serving.py`` queries it.
* ``in_process``: the trivial signature called in this process (the graph-call floor).

The four are timed in interleaved rounds, so their ratios share the machine's load. With
``--serving-report`` (a ``bench/serving.py`` JSON) the report adds the bound this floor
sets: the best gRPC p50 of each index is its in-process p50 plus the gRPC overhead of the
trivial model, against the p50 that 10x below brute force needs. Writes ``OUT.json`` and
``OUT.md``::

    .venv/bin/python bench/grpc_floor.py --out bench/results/grpc-floor
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from concurrent import futures
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import dnc_env  # noqa: E402,F401  (tf-keras before tensorflow)
from bench.serving import ChildServer, run_benchmark, summarize  # noqa: E402

MODEL_NAME = "floor"
PHASES = ("grpc_echo", "dnc_serve_stub", "dnc_serve_client", "in_process")
_ECHO_FLAG = "--echo-child"


def history(length: int) -> np.ndarray:
    """One request's history: ``[1, length]`` raw item ids."""
    return np.array([[f"item_{i}".encode() for i in range(length)]], dtype=object)


def save_trivial_model(base_path: str) -> str:
    """Saves version 1 of a model whose ``serving_default`` returns the history as its item
    list, with zero scores and clusters; returns the model's base path."""
    import tensorflow as tf

    class Trivial(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="history")])
        def serve(self, history):
            shape = tf.shape(history)
            return {
                "item_ids": history,
                "scores": tf.zeros(shape, tf.float32),
                "clusters": tf.zeros(shape, tf.int32),
            }

    module = Trivial()
    tf.saved_model.save(
        module, os.path.join(base_path, "1"), signatures={"serving_default": module.serve}
    )
    return base_path


def echo_child() -> int:
    """Child entry: a bare gRPC PredictionService answering every Predict with one prebuilt
    response; prints ``PORT n`` and stops when stdin closes."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    response = predict_pb2.PredictResponse()
    ids = history(50)
    response.outputs["item_ids"].CopyFrom(tf.make_tensor_proto(ids))
    response.outputs["scores"].CopyFrom(tf.make_tensor_proto(np.zeros(ids.shape, np.float32)))
    response.outputs["clusters"].CopyFrom(tf.make_tensor_proto(np.zeros(ids.shape, np.int32)))

    class Echo(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    sys.stdin.read()
    server.stop(1)
    return 0


def echo_server(timeout: float) -> ChildServer:
    """:func:`echo_child` in a child process (this script with ``--echo-child``)."""
    command = [sys.executable, os.path.abspath(__file__), _ECHO_FLAG]
    return ChildServer("", "", timeout, command=command)


def measure(args: argparse.Namespace, work: str) -> Dict[str, Any]:
    """Times the four phases in interleaved rounds; returns their stats."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.client import PredictClient

    base = save_trivial_model(os.path.join(work, MODEL_NAME))
    ids = history(args.history_length)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs["history"].CopyFrom(tf.make_tensor_proto(ids))
    fn = tf.saved_model.load(os.path.join(base, "1")).signatures["serving_default"]
    # Whatever fails (a child that does not start included), every child started is stopped.
    with contextlib.ExitStack() as stack:
        echo = echo_server(args.start_timeout)
        stack.callback(echo.close)
        server = ChildServer(base, MODEL_NAME, args.start_timeout)
        stack.callback(server.close)
        stubs = []
        for child in (echo, server):
            channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{child.port}"))
            stubs.append(prediction_service_pb2_grpc.PredictionServiceStub(channel))
        client = stack.enter_context(
            PredictClient(f"127.0.0.1:{server.port}", MODEL_NAME, timeout=60)
        )
        calls: Dict[str, Callable[[], Any]] = {
            "grpc_echo": lambda: stubs[0].Predict(request, timeout=60),
            "dnc_serve_stub": lambda: stubs[1].Predict(request, timeout=60),
            "dnc_serve_client": lambda: client.predict({"history": ids}),
            "in_process": lambda: fn(history=tf.constant(ids))["item_ids"].numpy(),
        }
        return time_rounds(calls, args.requests, args.warmup)


def time_rounds(calls: Dict[str, Callable[[], Any]], rounds: int, warmup: int) -> Dict[str, Any]:
    """Calls each of ``calls`` once a round for ``rounds`` rounds (after ``warmup``); the
    latency stats of each."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    latencies: Dict[str, List[float]] = {name: [] for name in calls}
    begin = time.monotonic()
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            latencies[name].append(time.perf_counter() - t0)
    wall = time.monotonic() - begin
    stats = {}
    for name, values in latencies.items():
        # One wall clock covers all phases: a per-phase QPS would mean nothing.
        stats[name] = {k: v for k, v in summarize(values, wall).items() if k != "qps"}
    return stats


def bound(phases: Dict[str, Any], serving_report: Dict[str, Any], ratio: float) -> List[Dict]:
    """Per row of a ``bench/serving.py`` report: its in-process p50 plus the trivial
    model's gRPC overhead (the best gRPC p50 this server can reach for it), the measured
    gRPC p50, and the p50 that ``ratio`` x below brute force needs."""
    overhead = phases["dnc_serve_client"]["p50_ms"] - phases["in_process"]["p50_ms"]
    rows = serving_report["results"]
    brute = {r["items"]: r["sequential"]["p50_ms"] for r in rows if r["index"] == "brute-force"}
    out = []
    for row in rows:
        if row["items"] not in brute or row["index"] == "brute-force":
            continue
        best = row["in_process"]["p50_ms"] + overhead
        out.append(
            {
                "items": row["items"],
                "index": row["index"],
                "in_process_p50_ms": row["in_process"]["p50_ms"],
                "grpc_p50_ms": row["sequential"]["p50_ms"],
                "floor_overhead_ms": round(overhead, 3),
                "best_grpc_p50_ms": round(best, 3),
                "needed_grpc_p50_ms": round(brute[row["items"]] / ratio, 3),
                "reachable": bool(best <= brute[row["items"]] / ratio),
            }
        )
    return out


def measure_rows(args: argparse.Namespace, work: str) -> Dict[str, Any]:
    """The phases, and with ``--serving-report`` the bound they set."""
    phases = measure(args, work)
    for name in PHASES:
        print(f"{name}: {phases[name]}", flush=True)
    result: Dict[str, Any] = {"phases": phases}
    if args.serving_report:
        with open(args.serving_report, encoding="utf-8") as f:
            report = json.load(f)
        result["serving_report"] = os.path.relpath(args.serving_report, ROOT)
        result["bound"] = bound(phases, report, args.ratio)
    return result


def to_markdown(report: Dict[str, Any]) -> str:
    """The report as Markdown: the phases, then the bound."""
    res = report["results"]
    load = report["machine"]
    lines = [
        "# The fixed cost of a gRPC request (`bench/grpc_floor.py`)",
        "",
        f"{report['date']}, {load['cpus']} CPUs, load average {load['load_average_start']} at "
        f"the start and {load['load_average_end']} at the end; "
        f"{report['settings']['requests']} interleaved rounds, history of "
        f"{report['settings']['history_length']} items, M = 50-sized answers.",
        "",
        "| phase | p50 ms | p90 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name in PHASES:
        s = res["phases"][name]
        lines.append(f"| `{name}` | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} |")
    if "bound" in res:
        lines += [
            "",
            f"Bound on `{res['serving_report']}` (best gRPC p50 = in-process p50 + the trivial "
            "model's gRPC overhead; needed = brute force's gRPC p50 / "
            f"{report['settings']['ratio']:g}):",
            "",
            "| items | index | in-process p50 | measured gRPC p50 | best gRPC p50 | needed | "
            "reachable |",
            "|---:|---|---:|---:|---:|---:|---|",
        ]
        trivial = res["phases"]["dnc_serve_client"]["p50_ms"]
        for b in res["bound"]:
            lines.append(
                f"| {b['items']:,} | {b['index']} | {b['in_process_p50_ms']:.2f} | "
                f"{b['grpc_p50_ms']:.2f} | {b['best_grpc_p50_ms']:.2f} | "
                f"{b['needed_grpc_p50_ms']:.2f} | {'yes' if b['reachable'] else 'no'} |"
            )
        lines += [
            "",
            f"The trivial model itself answers in {trivial:.2f} ms over gRPC (p50): "
            + ", ".join(
                f"{'above' if trivial > b['needed_grpc_p50_ms'] else 'below'} the "
                f"{b['needed_grpc_p50_ms']:.2f} ms needed at {b['items']:,} items"
                for b in res["bound"]
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--history-length", type=int, default=50)
    p.add_argument("--start-timeout", type=float, default=120.0, help="server start limit")
    p.add_argument(
        "--serving-report",
        default=os.path.join(ROOT, "bench", "results", "serving-lowrank-clients-1m-score-w0.json"),
        help="a bench/serving.py JSON to bound ('' to skip)",
    )
    p.add_argument("--ratio", type=float, default=10.0, help="the target's x below brute force")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "grpc-floor"))
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.history_length < 1:
        p.error("--requests and --history-length must be >= 1, --warmup >= 0")
    if args.serving_report and not os.path.isfile(args.serving_report):
        p.error(f"--serving-report {args.serving_report} does not exist")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns the exit code."""
    if argv is None and sys.argv[1:] == [_ECHO_FLAG]:
        return echo_child()
    args = parse_args(argv)
    return run_benchmark(
        "grpc-floor", args, measure_rows, to_markdown, model="a trivial SavedModel (echo)"
    )


if __name__ == "__main__":
    sys.exit(main())
