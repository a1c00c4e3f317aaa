"""Benchmark: serving latency / QPS of the exported retrieval graph, ScaNN vs brute force.

Training a model over 1M items is out of reach here, so the SavedModel is assembled from
synthetic embeddings with the project's own serving graph: ``SyntheticTowers`` stands in
for the trained towers (mean-pooled history embeddings times a per-cluster prompt plus a
pull towards the cluster centre; intent = softmax over the centres) and is wrapped, as is,
by ``serving.retrieval_module.RetrievalModule``. Everything else is the real serving path:
the raw-id vocabulary table, one index per cluster built by ``index_plan`` /
``build_index`` (the plans ``dnc export`` would choose), history exclusion and the
quota merge (``compute_quotas_tf`` + ``merge_per_cluster_tf``), or with ``--merge score``
the score merge (at ``--prompt-weight 0`` through one global index, as ``dnc export``
builds it for ``dnc``'s default). Note that the stand-in
user tower is much cheaper than a transformer tower; the figures measure retrieval.

Items: ``--clusters`` Gaussian centres in ``--dim`` dimensions, item = centre + noise,
uneven cluster sizes (share of cluster c ~ 1 / (c + 1)^0.8). Requests: 20-50 items drawn
from 1-3 clusters, ``serving_default`` (M = ``--num-results``).

For every size and index kind:

* export to ``TMP/NAME/1`` (``tf.saved_model.save`` with the ``Scann`` namespace),
* in-process latency: the loaded ``serving_default`` signature called directly,
* a ``serving.server.Server`` (gRPC, loopback, port 0) in a child process, queried with
  ``serving.client.PredictClient``: sequential requests, then ``--concurrency`` client
  threads with a stub each,
* recall of the ScaNN lists against the brute-force lists of the same requests,
* with ``--enable-batching``: the concurrent phase again against a server with request
  batching (``serving.batching``; ``--batching-parameters-file``, TF Serving's format, or
  the defaults below), to compare batching on and off.

Every phase is bounded by a request count and ``--phase-seconds``. Writes
``OUT.json`` and ``OUT.md``::

    .venv/bin/python bench/serving.py --sizes 100000,1000000 --out bench/results/serving
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import dnc_env  # noqa: E402,F401  (tf-keras before tensorflow)
from bench.machine import load_average  # noqa: E402
from bench.serving_catalogue import (  # noqa: E402
    add_catalogue_args,
    export_synthetic,
    item_ids,
    synthetic_histories,
    synthetic_items,
)
from bench.serving_report import markdown, targets  # noqa: E402
from trainer.score_merge import (  # noqa: E402
    MERGES,
    check_prompt_weight,
    searches_one_global_index,
)

INDEX_ORDER = ("brute-force", "scann")
PACKAGES = (
    "tensorflow",
    "tensorflow-recommenders",
    "scann",
    "tensorflow-serving-api",
    "grpcio",
    "numpy",
)
_CHILD_FLAG = "--serve-child"
# --enable-batching without --batching-parameters-file: batches of up to 32 requests, formed
# while the batch threads are busy (no waiting), one thread per core.
DEFAULT_BATCHING = (
    "max_batch_size { value: 32 } batch_timeout_micros { value: 0 } "
    f"max_enqueued_batches {{ value: 100 }} num_batch_threads {{ value: {os.cpu_count() or 1} }}\n"
)


# ---------------------------------------------------------------------------- timing


def summarize(latencies: Sequence[float], wall: float) -> Dict[str, Any]:
    """p50 / p90 / p99 / mean (ms) and QPS of one phase."""
    if not latencies:
        return {"requests": 0}
    ms = np.asarray(latencies) * 1000.0
    return {
        "requests": int(ms.size),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "max_ms": round(float(ms.max()), 3),
        "wall_seconds": round(wall, 3),
        "qps": round(ms.size / wall, 1) if wall > 0 else None,
    }


def run_in_process(
    paths: Sequence[str], histories: Sequence[np.ndarray], count: int, warmup: int, limit: float
) -> List[Tuple[Dict[str, Any], List[List[bytes]]]]:
    """Latency of the loaded ``serving_default`` signature of each SavedModel, requests
    interleaved across them (so that their ratio shares the machine's load); returns
    (stats, item lists) per path."""
    import tensorflow as tf

    from serving.export import load_exported

    loaded, load_seconds = [], []
    for path in paths:
        start = time.monotonic()
        loaded.append(load_exported(path))
        load_seconds.append(time.monotonic() - start)
    fns = [model.signatures["serving_default"] for model in loaded]
    for fn in fns:
        for i in range(warmup):
            fn(history=tf.constant(histories[i % len(histories)]))
    latencies: List[List[float]] = [[] for _ in fns]
    lists: List[List[List[bytes]]] = [[] for _ in fns]
    begin = time.monotonic()
    for i in range(count):
        if time.monotonic() - begin > limit:
            break
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            out = fn(history=tf.constant(histories[i % len(histories)]))
            ids = out["item_ids"].numpy()
            latencies[j].append(time.perf_counter() - t0)
            if i < len(histories):
                lists[j].append(ids[0].tolist())
    wall = time.monotonic() - begin
    results = []
    for j in range(len(fns)):
        stats = summarize(latencies[j], wall)
        stats["load_seconds"] = round(load_seconds[j], 2)
        results.append((stats, lists[j]))
    del loaded, fns
    gc.collect()
    return results


class ChildServer:
    """``serving.server.Server`` in a child process (this script with ``--serve-child``).

    The child prints ``PORT n`` once serving and stops when its stdin closes. ``command``
    starts another child with that contract instead.
    """

    def __init__(
        self,
        base_path: str,
        name: str,
        timeout: float,
        batching_file: str = "",
        command: Optional[List[str]] = None,
    ) -> None:
        if command is None:
            command = [sys.executable, os.path.abspath(__file__), _CHILD_FLAG, base_path, name]
            command += [batching_file] if batching_file else []
        self.process = subprocess.Popen(  # noqa: S603
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port: Optional[int] = None
        self.batching_stats: Optional[Dict[str, Any]] = None  # read by close()
        box: Dict[str, str] = {}

        def read() -> None:
            for line in self.process.stdout or ():
                if line.startswith("PORT "):
                    box["line"] = line
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if "line" not in box:
            self.close()
            raise RuntimeError(f"the model server did not start within {timeout:.0f} s")
        self.port = int(box["line"].split()[1])

    def close(self, timeout: float = 30.0) -> None:
        """Closes stdin (the stop signal) and waits; kills the child after ``timeout``."""
        try:
            if self.process.stdin is not None and not self.process.stdin.closed:
                rest, _ = self.process.communicate(timeout=timeout)  # closes stdin first
            else:
                rest = None
                self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return
        for line in (rest or "").splitlines():
            if line.startswith("BATCHING "):
                self.batching_stats = json.loads(line.split(" ", 1)[1])


def serve_child(
    base_path: str, name: str, batching_file: str = "", max_seconds: float = 4 * 3600
) -> int:
    """Child entry: serves ``name`` from ``base_path`` until stdin closes (with request
    batching when ``batching_file``, a BatchingParameters text proto, is given)."""
    from serving.batching_config import load_batching_parameters
    from serving.model_manager import ModelConfig
    from serving.server import Server

    server = Server(
        [ModelConfig(name, base_path)],
        "127.0.0.1",
        grpc_port=0,
        rest_port=None,
        poll_wait_seconds=0,
        batching=load_batching_parameters(batching_file) if batching_file else None,
    )
    server.start()
    print(f"PORT {server.grpc_port}", flush=True)
    done = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    done.wait(max_seconds)
    server.stop()
    if server.batcher is not None:
        print(f"BATCHING {json.dumps(server.batcher.stats())}", flush=True)
    return 0


def run_sequential(
    target: str, name: str, histories: Sequence[np.ndarray], count: int, warmup: int, limit: float
) -> Tuple[Dict[str, Any], List[List[bytes]]]:
    """One request at a time over gRPC; returns stats and the item lists."""
    from serving.client import PredictClient

    latencies, lists = [], []
    with PredictClient(target, name, timeout=60) as client:
        for i in range(warmup):
            client.predict({"history": histories[i % len(histories)]})
        begin = time.monotonic()
        for i in range(count):
            if time.monotonic() - begin > limit:
                break
            t0 = time.perf_counter()
            out = client.predict({"history": histories[i % len(histories)]})
            latencies.append(time.perf_counter() - t0)
            if i < len(histories):
                lists.append(out["item_ids"][0].tolist())
    return summarize(latencies, time.monotonic() - begin), lists


def run_concurrent(
    target: str,
    name: str,
    histories: Sequence[np.ndarray],
    clients: int,
    per_client: int,
    limit: float,
) -> Dict[str, Any]:
    """``clients`` threads, each with its own channel and stub, ``per_client`` requests."""
    from serving.client import PredictClient

    stubs = [PredictClient(target, name, timeout=60) for _ in range(clients)]
    for stub in stubs:  # connect + warm up every channel
        stub.predict({"history": histories[0]})
    results: List[List[float]] = [[] for _ in range(clients)]
    errors: List[str] = []
    barrier = threading.Barrier(clients + 1)
    deadline: Dict[str, float] = {}

    def worker(c: int) -> None:
        barrier.wait()
        try:
            for i in range(per_client):
                if time.monotonic() > deadline["t"]:
                    break
                history = histories[(c * 37 + i) % len(histories)]
                t0 = time.perf_counter()
                stubs[c].predict({"history": history})
                results[c].append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001  (reported, not fatal)
            errors.append(f"client {c}: {e!r}")

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    deadline["t"] = time.monotonic() + limit
    begin = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join(limit + 120)
    wall = time.monotonic() - begin
    for stub in stubs:
        stub.close()
    stats = summarize([x for r in results for x in r], wall)
    stats["clients"] = clients
    if errors:
        stats["errors"] = errors[:5]
    return stats


def recall(approx: Sequence[Sequence[bytes]], exact: Sequence[Sequence[bytes]]) -> float:
    """Mean |approx ∩ exact| / |exact| over requests (padding ``b""`` ignored)."""
    values = []
    for a, e in zip(approx, exact, strict=False):
        truth = {x for x in e if x}
        if truth:
            values.append(len(truth & {x for x in a if x}) / len(truth))
    return round(float(np.mean(values)), 4) if values else float("nan")


# ---------------------------------------------------------------------------- report


def machine() -> Dict[str, Any]:
    """CPU, platform and Python of this machine."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": load_average(),
    }


def versions() -> Dict[str, str]:
    """Installed versions of the serving stack."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def run_benchmark(
    name: str,
    args: argparse.Namespace,
    measure_rows: Callable[[argparse.Namespace, str], List[Dict[str, Any]]],
    to_markdown: Callable[[Dict[str, Any]], str],
    model: str = "bench/serving.py's synthetic catalogue and stand-in towers",
) -> int:
    """Runs ``measure_rows(args, work_dir)`` and writes the report (figures, machine, load
    averages, versions, settings, ``model``: what was served) to ``args.out`` .json and .md."""
    report: Dict[str, Any] = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": model,
    }
    work = tempfile.mkdtemp(prefix=f"dnc-{name}-")
    started = time.monotonic()
    try:
        report["results"] = measure_rows(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    report["machine"]["load_average_end"] = load_average()
    write(report, args.out, to_markdown)
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated item counts")
    p.add_argument("--indexes", default=",".join(INDEX_ORDER), help="brute-force,scann")
    add_catalogue_args(p, latent_dim=0)
    p.add_argument("--sequential", type=int, default=300, help="in-process / gRPC requests")
    p.add_argument(
        "--concurrency",
        default="8,32",
        help="comma-separated client counts of the concurrent phases (the first one is the "
        "main table's and the batching comparison's)",
    )
    p.add_argument("--per-client", type=int, default=150)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--phase-seconds", type=float, default=120.0, help="cap of every phase")
    p.add_argument("--start-timeout", type=float, default=600.0, help="server start limit")
    p.add_argument(
        "--no-fixed-k-reference",
        dest="fixed_k_reference",
        action="store_false",
        help="skip the in-process timing of the fixed-k path (interleaved with per-cluster k)",
    )
    p.add_argument(
        "--enable-batching",
        action="store_true",
        help="also run the concurrent phase against a server with request batching",
    )
    p.add_argument(
        "--batching-parameters-file",
        default="",
        help="BatchingParameters text proto for --enable-batching (default: "
        f"{DEFAULT_BATCHING.strip()!r})",
    )
    p.add_argument(
        "--merge",
        choices=MERGES,
        default="quota",
        help="the export's merge (quota: the paper's, one search per cluster)",
    )
    p.add_argument(
        "--prompt-weight",
        type=float,
        default=1.0,
        help="prompt weight of --merge score; at 0 the export adds one global index and "
        "unrestricted requests search only it, as `dnc export` does for `dnc`'s default",
    )
    p.add_argument("--workdir", default=None, help="keep the SavedModels here (default: temp)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "serving"))
    args = p.parse_args(argv)
    args.size_list = [int(x) for x in args.sizes.split(",") if x.strip()]
    try:
        check_prompt_weight(args.prompt_weight, args.merge)
    except ValueError as e:
        p.error(str(e))
    args.index_list = [x.strip() for x in args.indexes.split(",") if x.strip()]
    try:
        args.client_counts = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.client_counts or min(args.client_counts) < 1:
        p.error(f"--concurrency needs client counts >= 1, got {args.concurrency!r}")
    args.concurrency = args.client_counts[0]
    for kind in args.index_list:
        if kind not in INDEX_ORDER:
            p.error(f"unknown index {kind!r}")
    return args


def write(
    report: Dict[str, Any], out: str, render: Callable[[Dict[str, Any]], str] = markdown
) -> None:
    """Writes ``OUT.json`` and ``OUT.md`` (the report rendered by ``render``)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(render(report))


def export_merge(args: argparse.Namespace) -> Dict[str, Any]:
    """The merge arguments of ``export_synthetic``: ``dnc export``'s choice, a global index
    exactly when the score merge runs at prompt weight 0."""
    return {
        "merge": args.merge,
        "prompt_weight": args.prompt_weight,
        "global_index": searches_one_global_index(args.merge, args.prompt_weight),
    }


def benchmark_size(size: int, args: argparse.Namespace, work: str, report: Dict[str, Any]) -> None:
    """Measures every index kind at one corpus size; appends to ``report['results']``."""
    print(f"[{size:,} items] generating data", flush=True)
    data = synthetic_items(size, args.clusters, args.dim, args.noise, args.seed, args.latent_dim)
    ids = item_ids(size)
    histories = synthetic_histories(
        data["item_cluster"],
        data["sizes"],
        args.sequential,
        args.min_history,
        args.max_history_len,
        args.seed,
    )
    lists: Dict[str, List[List[bytes]]] = {}
    merge = export_merge(args)
    for kind in args.index_list:
        name = f"bench_{kind.replace('-', '_')}_{size}"
        base = os.path.join(work, f"n{size}", name)
        row: Dict[str, Any] = {
            "items": size,
            "index": kind,
            "cluster_sizes": data["sizes"].tolist(),
        }
        print(f"[{size:,} items] {kind}: building and saving", flush=True)
        row.update(export_synthetic(data, ids, kind, os.path.join(base, "1"), args, **merge))
        print(f"[{size:,} items] {kind}: built in {row['build_seconds']} s", flush=True)
        paths = [os.path.join(base, "1")]
        if args.fixed_k_reference:
            fixed = os.path.join(work, f"n{size}", f"{name}_fixed_k", "1")
            export_synthetic(data, ids, kind, fixed, args, per_cluster_k=False, **merge)
            paths.append(fixed)
        timed = run_in_process(paths, histories, args.sequential, args.warmup, args.phase_seconds)
        row["in_process"], lists_ip = timed[0]
        print(f"[{size:,} items] {kind}: in-process {row['in_process']}", flush=True)
        if args.fixed_k_reference:
            row["in_process_fixed_k"], lists_fixed = timed[1]
            # Each build trains its own ScaNN partitions (randomly), so ScaNN lists of two
            # builds can differ; brute force must give the same lists (overlap 1.0).
            row["overlap_with_fixed_k"] = recall(lists_ip, lists_fixed)
            row["per_cluster_k_speedup_p50"] = round(
                row["in_process_fixed_k"]["p50_ms"] / row["in_process"]["p50_ms"], 2
            )
            print(f"[{size:,} items] {kind}: fixed k {row['in_process_fixed_k']}", flush=True)
            shutil.rmtree(os.path.dirname(fixed), ignore_errors=True)
        server = ChildServer(base, name, args.start_timeout)
        try:
            target = f"127.0.0.1:{server.port}"
            row["sequential"], lists_grpc = run_sequential(
                target, name, histories, args.sequential, args.warmup, args.phase_seconds
            )
            print(f"[{size:,} items] {kind}: gRPC {row['sequential']}", flush=True)
            row["concurrent_by_clients"] = {}
            for clients in args.client_counts:
                stats = run_concurrent(
                    target, name, histories, clients, args.per_client, args.phase_seconds
                )
                row["concurrent_by_clients"][str(clients)] = stats
                print(f"[{size:,} items] {kind}: {clients} clients {stats}", flush=True)
            row["concurrent"] = row["concurrent_by_clients"][str(args.concurrency)]
        finally:
            server.close()
        if args.enable_batching:
            server = ChildServer(base, name, args.start_timeout, args.batching_file)
            try:
                row["concurrent_batched"] = run_concurrent(
                    f"127.0.0.1:{server.port}",
                    name,
                    histories,
                    args.concurrency,
                    args.per_client,
                    args.phase_seconds,
                )
            finally:
                server.close()
            row["concurrent_batched"]["batching"] = server.batching_stats
            print(f"[{size:,} items] {kind}: batched {row['concurrent_batched']}", flush=True)
        row["grpc_matches_in_process"] = lists_grpc == lists_ip[: len(lists_grpc)]
        lists[kind] = lists_ip
        report["results"].append(row)
        shutil.rmtree(base, ignore_errors=True)
        gc.collect()
    if "scann" in lists and "brute-force" in lists:
        value = recall(lists["scann"], lists["brute-force"])
        for row in report["results"]:
            if row["items"] == size and row["index"] == "scann":
                row["recall_vs_brute_force"] = value
            if row["items"] == size and row["index"] == "brute-force":
                row["recall_vs_brute_force"] = 1.0
        print(f"[{size:,} items] recall@{args.num_results} ScaNN vs BF: {value}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns the exit code."""
    args = parse_args(argv)
    import serving  # noqa: F401  (project packages before tensorflow)

    report: Dict[str, Any] = {
        "benchmark": "serving",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k not in ("size_list", "index_list", "out", "workdir")
        },
        "model": (
            "synthetic embeddings wrapped by serving.retrieval_module.RetrievalModule "
            "(real vocabulary lookup, index_plan/build_index per cluster, "
            f"{args.merge} merge at prompt weight {args.prompt_weight:g}); "
            "stand-in towers: mean-pooled history x per-cluster prompt @ W + 0.5 centre_k, "
            "intent = softmax(mean . centres / sqrt(d))"
        ),
        "results": [],
        "notes": [],
    }
    work = args.workdir or tempfile.mkdtemp(prefix="dnc-serving-bench-")
    args.batching_file = ""
    if args.enable_batching:
        from serving.batching_config import parse_batching_parameters

        text = DEFAULT_BATCHING
        if args.batching_parameters_file:
            with open(args.batching_parameters_file, encoding="utf-8") as f:
                text = f.read()
        params = parse_batching_parameters(text, args.batching_parameters_file or "default")
        report["settings"]["batching_parameters"] = dataclasses.asdict(params)
        args.batching_file = os.path.join(work, "batching.config")
        os.makedirs(work, exist_ok=True)
        with open(args.batching_file, "w", encoding="utf-8") as f:
            f.write(text)
    started = time.monotonic()
    try:
        for size in args.size_list:
            t0 = time.monotonic()
            benchmark_size(size, args, work, report)
            report["notes"].append(f"{size:,} items measured in {time.monotonic() - t0:.0f} s.")
            report["machine"]["load_average_end"] = load_average()
            report["targets"] = targets(report["results"])
            write(report, args.out)  # partial results survive a later failure
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    report["machine"]["load_average_end"] = load_average()
    report["targets"] = targets(report["results"])
    write(report, args.out)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == _CHILD_FLAG:
        sys.exit(serve_child(*sys.argv[2:]))
    sys.exit(main())
