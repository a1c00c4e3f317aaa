"""Benchmark: ScaNN recall against exact search vs latency, per cluster size (issue 14).

For the clusters of the serving benchmark's synthetic catalogue (``bench/serving.py``:
uneven cluster sizes, low-rank or isotropic noise), one tfrs ``ScaNN`` layer per setting,
built as ``serving.indexes.build_index`` builds it, searched one query at a time
(the serving path's per-cluster search):

* ``leaves_fraction``: share of the ~sqrt(n) leaves searched (the export's
  ``--leaves-fraction``),
* ``reorder``: exact re-scoring of ``reorder * k`` asymmetric-hashing candidates (the export
  re-scores ``k``, ``reorder = 1``).

Recall@k is against the exact top-k of the same query (NumPy); latency is the median and
p99 of single-query calls after a warm-up, with brute force (``tfrs`` ``BruteForce``) over
the same cluster as the reference. Queries are pooled histories: the mean of 20 random
items of the cluster plus noise. Writes ``OUT.json``, ``OUT.md`` and ``OUT.png``
(recall vs latency, one line per ``reorder``)::

    .venv/bin/python bench/scann_sweep.py --items 1000000 --out bench/results/scann-sweep
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import dnc_env  # noqa: E402,F401  (tf-keras before tensorflow)
from bench.machine import load_average  # noqa: E402

# ``--which`` value of the one index over every item.
GLOBAL = "global"


def _serving_bench():
    """``bench/serving.py`` (its name would shadow the ``serving`` package on import)."""
    spec = importlib.util.spec_from_file_location(
        "serving_bench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "serving.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def queries(embeddings: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Pooled-history queries [count, d] over one cluster's embeddings [n, d]."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(embeddings), size=(count, 20))
    pooled = embeddings[picks].mean(axis=1)
    return (pooled + rng.normal(0, 0.1, pooled.shape)).astype(np.float32)


def cluster_queries(
    embeddings: np.ndarray, cluster: np.ndarray, count: int, seed: int
) -> np.ndarray:
    """Queries [count, d] for one index over every cluster: each pooled within one random
    cluster (a history about one interest), as :func:`queries` pools within its cluster."""
    rng = np.random.default_rng(seed)
    labels = np.unique(cluster)
    members = {c: np.flatnonzero(cluster == c) for c in labels}
    picks = rng.choice(labels, size=count)
    rows = [queries(embeddings[members[c]], 1, seed + i)[0] for i, c in enumerate(picks)]
    return np.stack(rows)


def exact_top(embeddings: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row indices [Q, k]."""
    scores = q @ embeddings.T
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def time_calls(index, q: np.ndarray, k: int, warmup: int = 10) -> Dict[str, Any]:
    """Per-query latency (ms) and the returned row ids of single-query calls."""
    import tensorflow as tf

    for row in q[:warmup]:
        index(tf.constant(row[None]), k=k)
    times, ids = [], []
    for row in q:
        start = time.perf_counter()
        _, found = index(tf.constant(row[None]), k=k)
        times.append((time.perf_counter() - start) * 1e3)
        ids.append(found.numpy()[0])
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "ids": np.asarray(ids),
    }


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k found."""
    shares = [len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(shares))


def sweep_cluster(
    emb: np.ndarray, q: np.ndarray, args: argparse.Namespace, global_index: bool = False
) -> Dict[str, Any]:
    """Every (leaves_fraction, reorder) point of one index over ``emb`` for the queries
    ``q``, and brute force; ``global_index``: ``emb`` is every item, not one cluster's."""
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    from serving.indexes import build_index, index_plan

    k = args.k
    exact = exact_top(emb, q, k)
    identifiers = np.arange(len(emb)).astype(str)
    brute = tfrs.layers.factorized_top_k.BruteForce(k=k)
    brute.index(tf.constant(emb), tf.constant(np.arange(len(emb))))
    reference = time_calls(brute, q, k)
    points: List[Dict[str, Any]] = []
    for fraction in args.leaves_fractions:
        for reorder in args.reorders:
            plan = index_plan(len(emb), k, "scann", scann_min_size=16, leaves_fraction=fraction)
            plan["num_reordering_candidates"] = int(reorder * k)
            start = time.perf_counter()
            index = build_index(plan, emb, identifiers, f"sweep_{fraction}_{reorder}")
            build = time.perf_counter() - start
            timed = time_calls(index, q, k)
            found = timed.pop("ids").astype(np.int64)
            points.append(
                {
                    "leaves_fraction": fraction,
                    "reorder": reorder,
                    "num_leaves": plan["num_leaves"],
                    "num_leaves_to_search": plan["num_leaves_to_search"],
                    "num_reordering_candidates": plan["num_reordering_candidates"],
                    "recall": round(recall(found, exact), 4),
                    "p50_ms": round(timed["p50_ms"], 3),
                    "p99_ms": round(timed["p99_ms"], 3),
                    "build_s": round(build, 2),
                }
            )
            print(f"  n={len(emb)} {points[-1]}", flush=True)
    return {
        "size": len(emb),
        "global": global_index,
        "brute_force": {
            "p50_ms": round(reference["p50_ms"], 3),
            "p99_ms": round(reference["p99_ms"], 3),
        },
        "points": points,
    }


def markdown(report: Dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"### ScaNN sweep: {s['items']:,} items, {s['clusters']} clusters, d={s['dim']}, "
        f"{'low-rank' if s['latent_dim'] else 'isotropic'} noise, k={s['k']}",
        "",
        f"Load average {report['load_average_start']} at start, {report['load_average_end']} "
        "at end. Recall@k against exact search of the same query; latency of one query.",
    ]
    for cluster in report["clusters"]:
        bf = cluster["brute_force"]
        lines += [
            "",
            f"**{'One index over all' if cluster['global'] else 'Cluster of'} "
            f"{cluster['size']:,} items** (brute force p50 {bf['p50_ms']:.2f} ms, "
            f"p99 {bf['p99_ms']:.2f} ms)",
            "",
            "| leaves searched | reorder (x k) | recall@k | p50 ms | p99 ms | p50 vs brute force "
            "| build s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for p in cluster["points"]:
            lines.append(
                f"| {p['num_leaves_to_search']} / {p['num_leaves']} ({p['leaves_fraction']:g}) | "
                f"{p['reorder']:g} | {p['recall']:.4f} | {p['p50_ms']:.3f} | {p['p99_ms']:.3f} | "
                f"{bf['p50_ms'] / p['p50_ms']:.1f}x | {p['build_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clusters = report["clusters"]
    fig, axes = plt.subplots(1, len(clusters), figsize=(5 * len(clusters), 4), squeeze=False)
    for ax, cluster in zip(axes[0], clusters, strict=True):
        for reorder in sorted({p["reorder"] for p in cluster["points"]}):
            pts = [p for p in cluster["points"] if p["reorder"] == reorder]
            ax.plot([p["p50_ms"] for p in pts], [p["recall"] for p in pts], "o-",
                    label=f"reorder {reorder:g}k")  # fmt: skip
        ax.axvline(cluster["brute_force"]["p50_ms"], color="grey", ls="--", label="brute force")
        ax.axhline(0.95, color="red", ls=":", label="recall 0.95")
        ax.set_xscale("log")
        ax.set_xlabel("p50 latency per query (ms)")
        ax.set_ylabel(f"recall@{report['settings']['k']} vs exact")
        scope = "one index over" if cluster["global"] else "cluster of"
        ax.set_title(f"{scope} {cluster['size']:,} items")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--latent-dim", type=int, default=8, help="0: isotropic noise")
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--k", type=int, default=100, help="candidates per cluster search")
    p.add_argument(
        "--which",
        default="0,4",
        help=f"clusters to sweep (0 = largest; {GLOBAL!r}: one index over all items, the "
        "index dnc export adds for the score merge at prompt weight 0)",
    )
    p.add_argument("--leaves-fractions", default="0.02,0.05,0.1,0.2,0.4")
    p.add_argument("--reorders", default="1,2,4")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scann-sweep"))
    args = p.parse_args()
    args.leaves_fractions = [float(x) for x in args.leaves_fractions.split(",")]
    args.reorders = [float(x) for x in args.reorders.split(",")]
    bench = _serving_bench()
    report: Dict[str, Any] = {
        "benchmark": "scann-sweep",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": bench.machine(),
        "versions": bench.versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "load_average_start": load_average(),
    }
    data = bench.synthetic_items(
        args.items, args.clusters, args.dim, args.noise, args.seed, args.latent_dim
    )
    cluster = data["item_cluster"][1:]
    emb = data["embeddings"][1:]
    report["clusters"] = []
    for which in args.which.split(","):
        if which == GLOBAL:
            q = cluster_queries(emb, cluster, args.queries, args.seed)
            result = sweep_cluster(np.ascontiguousarray(emb), q, args, global_index=True)
        else:
            members = np.ascontiguousarray(emb[cluster == int(which)])
            q = queries(members, args.queries, int(which))
            result = sweep_cluster(members, q, args)
        report["clusters"].append(result)
    report["load_average_end"] = load_average()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(report))
    plot(report, args.out + ".png")
    print(f"wrote {args.out}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
