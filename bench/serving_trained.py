"""Benchmark: serving a trained model's exports, ScaNN against exact retrieval.

``bench/serving.py`` measures the serving graph on a synthetic catalogue with a stand-in
tower; this script takes two exports of one *trained* model (``dnc export --index scann``
and ``--index brute-force``, the same merge settings) and measures what a user of that
model gets: the real Transformer tower, the trained item embeddings, the exported merge.

Requests are the test users' histories of the preprocessing output the model was trained
on (the most recent ``max_history`` items, raw ids, as a client sends them). For each
export:

* in-process: the loaded ``serving_default`` signatures called in turn (so that the two
  share the machine's load), latency p50/p90/p99 and the returned lists;
* recall of the ScaNN lists against the exact lists of the same requests (``M`` =
  the export's default number of results);
* gRPC: a ``serving.server.Server`` child on loopback, one client at a time, then 8 and 32
  concurrent clients (``--clients``), the server's RSS once loaded and after the load.

Writes ``OUT.json`` and ``OUT.md``::

    .venv/bin/python bench/serving_trained.py --scann E/scann/dnc --exact E/exact/dnc \\
        --data runs/kr20m --out bench/results/serving-kuairand-20m
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import dnc_env  # noqa: E402,F401  (tf-keras before tensorflow)
from bench.load import _metadata, latest_version_dir  # noqa: E402
from bench.loadgen import rss_mb  # noqa: E402
from bench.serving import (  # noqa: E402
    ChildServer,
    recall,
    run_benchmark,
    run_concurrent,
    run_in_process,
    run_sequential,
    summarize,
)

KINDS = ("scann", "exact")
REPORTED_METADATA = (
    "variant",
    "num_items",
    "num_clusters",
    "cluster_sizes",
    "embedding_dim",
    "merge",
    "alpha",
    "prompt_weight",
    "max_history",
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scann", required=True, help="base path (or version) of the ScaNN export")
    p.add_argument("--exact", required=True, help="the brute-force export of the same model")
    p.add_argument("--data", required=True, help="the preprocessing output it was trained on")
    p.add_argument("--requests", type=int, default=300, help="distinct test histories")
    p.add_argument("--clients", default="8,32", help="concurrent gRPC clients per phase")
    p.add_argument("--per-client", type=int, default=100, help="requests per client")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--phase-seconds", type=float, default=90.0, help="cap of every phase")
    p.add_argument("--start-timeout", type=float, default=900.0, help="server start limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "serving-trained"))
    args = p.parse_args(argv)
    args.client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.requests < 1 or any(c < 1 for c in args.client_counts):
        p.error("--requests and every --clients value must be >= 1")
    return args


def test_histories(data_dir: str, count: int, max_history: int, seed: int) -> List[np.ndarray]:
    """Raw-id histories (``[1, L]`` bytes) of ``count`` random test users."""
    from preprocessing import features
    from trainer import data

    items = data.load_items(data_dir)
    ev = data.evaluation_data(data_dir, features.TEST, max_history, max_users=count, seed=seed)
    out = []
    for history in ev.exclude:
        ids = items.item_ids[history[-max_history:] - 1]
        out.append(np.array([s.encode() for s in ids], dtype=object).reshape(1, -1))
    return out


def signature_phase(
    path: str, num_clusters: int, histories: List[np.ndarray], warmup: int
) -> Dict[str, Any]:
    """In-process latency of the tower-only signatures (what a request spends before
    and besides the index searches): ``user_embedding`` (K-row prompted batch) and
    ``intent``."""
    import tensorflow as tf

    from serving.export import load_exported

    signatures = load_exported(path).signatures
    calls = {
        "user_embedding": lambda h: signatures["user_embedding"](
            history=tf.constant(h), cluster=tf.constant([num_clusters], tf.int32)
        ),
        "intent": lambda h: signatures["intent"](history=tf.constant(h)),
    }
    out = {}
    for name, call in calls.items():
        for i in range(warmup):
            call(histories[i % len(histories)])
        latencies = []
        begin = time.monotonic()
        for history in histories:
            t0 = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), call(history))
            latencies.append(time.perf_counter() - t0)
        out[name] = summarize(latencies, time.monotonic() - begin)
        print(f"  signature {name} {out[name]}", flush=True)
    return out


def grpc_phases(
    base: str, name: str, histories: List[np.ndarray], args: argparse.Namespace
) -> Dict[str, Any]:
    """One client, then each concurrency level, against a child server of ``base``."""
    server = ChildServer(base, name, args.start_timeout)
    try:
        target = f"127.0.0.1:{server.port}"
        row: Dict[str, Any] = {"server_rss_mb_loaded": rss_mb(server.process.pid)}
        row["sequential"], lists = run_sequential(
            target, name, histories, len(histories), args.warmup, args.phase_seconds
        )
        print(f"  {name} gRPC 1 client {row['sequential']}", flush=True)
        row["concurrent_by_clients"] = {}
        for clients in args.client_counts:
            stats = run_concurrent(
                target, name, histories, clients, args.per_client, args.phase_seconds
            )
            row["concurrent_by_clients"][str(clients)] = stats
            print(f"  {name} gRPC {clients} clients {stats}", flush=True)
        row["server_rss_mb_after"] = rss_mb(server.process.pid)
        row["grpc_lists"] = lists
    finally:
        server.close()
    return row


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    """All phases; returns the report's ``results``."""
    paths = {"scann": latest_version_dir(args.scann), "exact": latest_version_dir(args.exact)}
    meta = {kind: _metadata(path) for kind, path in paths.items()}
    for key in ("merge", "alpha", "prompt_weight", "default_num_results", "model_dir"):
        if meta["scann"].get(key) != meta["exact"].get(key):
            raise ValueError(
                f"the two exports differ in {key}: {meta['scann'].get(key)!r} vs "
                f"{meta['exact'].get(key)!r}; export one model twice with the same settings"
            )
    histories = test_histories(args.data, args.requests, meta["scann"]["max_history"], args.seed)
    print(f"{len(histories)} test histories; in-process phase", flush=True)
    timed = run_in_process(
        [paths["scann"], paths["exact"]], histories, len(histories), args.warmup, 1e9
    )
    results: Dict[str, Any] = {"exports": {}}
    lists = {}
    for kind, (stats, kind_lists) in zip(KINDS, timed, strict=True):
        lists[kind] = kind_lists
        results["exports"][kind] = {"path": paths[kind], "in_process": stats}
        print(f"  {kind} in-process {stats}", flush=True)
    results["recall_at_m"] = recall(lists["scann"], lists["exact"])
    results["m"] = meta["scann"]["default_num_results"]
    print(f"recall@{results['m']} ScaNN vs exact: {results['recall_at_m']}", flush=True)
    results["signatures"] = signature_phase(
        paths["scann"], int(meta["scann"]["num_clusters"]), histories, args.warmup
    )
    for kind in KINDS:
        base = os.path.dirname(paths[kind])
        row = grpc_phases(base, os.path.basename(base), histories, args)
        row["grpc_matches_in_process"] = row.pop("grpc_lists") == lists[kind][: len(histories)]
        results["exports"][kind].update(row)
    results["metadata"] = {k: meta["scann"].get(k) for k in REPORTED_METADATA}
    results["index_plans"] = meta["scann"]["index"]
    return results


def markdown(report: Dict[str, Any]) -> str:
    """The report as Markdown: one row per export and phase."""
    r = report["results"]
    m = r["metadata"]
    lines = [
        f"# Serving a trained model: ScaNN vs exact ({report['date']})",
        "",
        f"Model: `{m['variant']}`, {m['num_items']:,} items in {m['num_clusters']} clusters, "
        f"d = {m['embedding_dim']}; merge {m['merge']}, alpha {m['alpha']}, prompt weight "
        f"{m['prompt_weight']}; {report['settings']['requests']} test histories of up to "
        f"{m['max_history']} items from `{report['settings']['data']}`.",
        "",
        f"**Recall@{r['m']} of the ScaNN lists against the exact lists: {r['recall_at_m']}**",
        "",
        "| export | phase | clients | requests | p50 ms | p90 ms | p99 ms | QPS |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        row = r["exports"][kind]
        phases = [("in-process", 1, row["in_process"]), ("gRPC", 1, row["sequential"])]
        phases += [("gRPC", int(c), s) for c, s in row["concurrent_by_clients"].items()]
        for phase, clients, s in phases:
            # The in-process phase interleaves the two exports: its wall time is shared.
            qps = "-" if phase == "in-process" else s["qps"]
            lines.append(
                f"| {kind} | {phase} | {clients} | {s['requests']} | {s['p50_ms']} | "
                f"{s['p90_ms']} | {s['p99_ms']} | {qps} |"
            )
    lines += ["", "| export | server RSS loaded (MB) | after load (MB) | gRPC == in-process |"]
    lines += ["|---|---:|---:|---|"]
    for kind in KINDS:
        row = r["exports"][kind]
        lines.append(
            f"| {kind} | {row['server_rss_mb_loaded']} | {row['server_rss_mb_after']} | "
            f"{row['grpc_matches_in_process']} |"
        )
    lines += ["", "Tower-only signatures of the ScaNN export, in-process (p50 / p99 ms):", ""]
    for name, stats in r["signatures"].items():
        lines.append(f"- `{name}`: {stats['p50_ms']} / {stats['p99_ms']}")
    mach = report["machine"]
    lines += [
        "",
        f"Machine: {mach['cpus']} x {mach['cpu_model']}; load average "
        f"{mach['load_average_start']} at start, {mach['load_average_end']} at the end; "
        f"{report['total_seconds']} s in all.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "serving_trained",
        args,
        lambda a, _work: measure(a),
        markdown,
        model=f"the exports {args.scann} and {args.exact} of one trained model",
    )


if __name__ == "__main__":
    sys.exit(main())
