"""What each merge costs a request at a million items: quota, score at several prompt weights.

The score merge's offsets need the exact in-cluster log-partitions ``log Z_k``: one matmul
of the K cluster queries against every item of their cluster, the work of a brute-force
search over the whole catalogue, whatever the index. At prompt weight 0 the offsets are
weighted by 0 and the export keeps neither the item tables nor the matmul
(``serving.retrieval_module``). This benchmark measures that cost on the serving graph
itself: the same synthetic catalogue and stand-in towers as ``bench/serving.py`` (real
vocabulary lookup, one index per cluster, per-cluster k), one SavedModel per merge, loaded
together and called in interleaved rounds (``bench.serving.run_in_process``), so that their
ratios share the machine's load. A brute-force quota export is the reference of exact search.

    .venv/bin/python bench/merge_latency.py --size 1000000 --latent-dim 8 \\
        --out bench/results/serving-merge-1m

Writes OUT.json (figures, machine, versions, settings) and OUT.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # ahead of bench/: ``serving`` is the project's package

import dnc_env  # noqa: E402,F401  (tf-keras before tensorflow)
from bench import serving as bench_serving  # noqa: E402
from bench import serving_catalogue, serving_report  # noqa: E402

# (name, index kind, merge, prompt weight)
VARIANTS: Tuple[Tuple[str, str, str, float, bool], ...] = (
    ("brute force, quota", "brute-force", "quota", 1.0, False),
    ("ScaNN, quota", "scann", "quota", 1.0, False),
    ("ScaNN, score w=1", "scann", "score", 1.0, False),
    ("ScaNN, score w=0.25", "scann", "score", 0.25, False),
    ("ScaNN, score w=0, per-cluster indexes", "scann", "score", 0.0, False),
    ("brute force, score w=0, one global index", "brute-force", "score", 0.0, True),
    ("ScaNN, score w=0, one global index", "scann", "score", 0.0, True),
)


def add_catalogue_args(p: argparse.ArgumentParser) -> None:
    """``bench/serving.py``'s catalogue flags (8-d latent noise: the low-rank set) with one
    ``--size`` and in-process timing rounds."""
    p.add_argument("--size", type=int, default=1_000_000, help="items in the catalogue")
    serving_catalogue.add_catalogue_args(p, latent_dim=8)
    p.add_argument("--requests", type=int, default=300, help="timed rounds (one request each)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--phase-seconds", type=float, default=600.0, help="cap of the timed phase")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_catalogue_args(p)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "serving-merge-1m"))
    args = p.parse_args(argv)
    if args.size < args.clusters:
        p.error(f"--size {args.size} must be at least --clusters {args.clusters}")
    return args


def export_all(args: argparse.Namespace, work: str) -> Tuple[List[Dict[str, Any]], List[str], Any]:
    """One SavedModel per variant; returns their rows, paths and the request histories."""
    data = serving_catalogue.synthetic_items(
        args.size, args.clusters, args.dim, args.noise, args.seed, args.latent_dim
    )
    ids = serving_catalogue.item_ids(args.size)
    histories = serving_catalogue.synthetic_histories(
        data["item_cluster"], data["sizes"], args.requests, args.min_history,
        args.max_history_len, args.seed,
    )  # fmt: skip
    rows, paths = [], []
    for name, kind, merge, weight, global_index in VARIANTS:
        path = os.path.join(work, f"v{len(paths)}", "1")
        print(f"[{args.size:,} items] {name}: building and saving", flush=True)
        row = {"variant": name, "index": kind, "merge": merge, "prompt_weight": weight}
        row["global_index"] = global_index
        built = serving_catalogue.export_synthetic(
            data, ids, kind, path, args, merge=merge, prompt_weight=weight,
            global_index=global_index,
        )  # fmt: skip
        row.update({k: built[k] for k in ("build_seconds", "save_seconds", "saved_model_mb")})
        rows.append(row)
        paths.append(path)
    return rows, paths, histories


def measure(args: argparse.Namespace, work: str) -> List[Dict[str, Any]]:
    """Rows of figures, one per variant (latency in-process, lists vs brute force)."""
    rows, paths, histories = export_all(args, work)
    timed = bench_serving.run_in_process(
        paths, histories, args.requests, args.warmup, args.phase_seconds
    )
    exact = {}  # (merge, prompt weight) -> the brute-force run of that merge
    for row, (stats, lists) in zip(rows, timed, strict=True):
        if row["index"] == "brute-force":
            exact.setdefault((row["merge"], row["prompt_weight"]), (stats, lists))
    for row, (stats, lists) in zip(rows, timed, strict=True):
        row["in_process"] = stats
        brute = exact.get((row["merge"], row["prompt_weight"]), exact[("quota", 1.0)])
        row["p50_vs_brute_force"] = round(brute[0]["p50_ms"] / stats["p50_ms"], 2)
        if brute is not exact[("quota", 1.0)] or row["merge"] == "quota":
            row["recall_vs_brute_force"] = bench_serving.recall(lists, brute[1])
        print(f"{row['variant']}: {stats}", flush=True)
    gc.collect()
    return rows


def markdown(report: Dict[str, Any]) -> str:
    """The report as a Markdown table."""
    s = report["settings"]
    lines = [
        f"### Merge cost per request, {s['size']:,} items, K={s['clusters']}, d={s['dim']} "
        f"(latent {s['latent_dim']}), M={s['num_results']}, in-process, interleaved",
        "",
        "| variant | p50 ms | p99 ms | p50 speed-up vs brute force | recall@M vs brute force "
        "| SavedModel MB | build s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ip = r["in_process"]
        lines.append(
            f"| {r['variant']} | {ip['p50_ms']:.2f} | {ip['p99_ms']:.2f} | "
            f"{r['p50_vs_brute_force']:.2f}x "
            f"| {serving_report.fmt(r.get('recall_vs_brute_force'))} "
            f"| {r['saved_model_mb']:,.0f} | {r['build_seconds']} |"
        )
    m = report["machine"]
    lines += [
        "",
        "Speed-up and recall against the brute-force run of the same merge (the first "
        "brute-force row, quota, where that merge has no brute-force run).",
        "",
        f"Load average {m['load_average_start']} at start, {m['load_average_end']} at the end; "
        f"{report['total_seconds']} s in all.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns the exit code."""
    return bench_serving.run_benchmark("merge_latency", parse_args(argv), measure, markdown)


if __name__ == "__main__":
    sys.exit(main())
