"""Benchmark: end-to-end preprocessing throughput on an ML-1M-sized synthetic set.

Generates ~1M interactions (6,040 users, 3,706 items, like ML-1M) as a CSV file,
then runs ``dnc preprocess --source csv`` on it twice in one go, on DirectRunner
in-process and with ``multi_processing`` (2 workers), each in a fresh process so
start-up is counted. Writes a JSON file with the figures, machine, versions and
settings.

    .venv/bin/python bench/preprocess.py [--users 6040 --items 3706 --mean-length 166]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Dict, List

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)

import dnc_env  # noqa: E402,F401

MODES = {
    "in_process": [],
    "multi_processing_2": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


def _versions() -> Dict[str, str]:
    names = ["apache-beam", "tensorflow", "tensorflow-transform", "gensim", "scikit-learn"]
    return {n: metadata.version(n) for n in names}


def _machine() -> Dict[str, object]:
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def add_size_arguments(
    parser: argparse.ArgumentParser, *, users: int, items: int, categories: int, mean_length: int
) -> None:
    """The synthetic data set's size flags (``--users --items --categories --mean-length``)."""
    parser.add_argument("--users", type=int, default=users)
    parser.add_argument("--items", type=int, default=items)
    parser.add_argument("--categories", type=int, default=categories)
    parser.add_argument("--mean-length", type=int, default=mean_length)


def synthetic_config(args: argparse.Namespace):
    """The ``SyntheticConfig`` of the size flags of ``add_size_arguments``."""
    from preprocessing.config import SyntheticConfig

    return SyntheticConfig(
        num_users=args.users,
        num_items=args.items,
        num_categories=args.categories,
        mean_length=args.mean_length,
    )


def _run(mode_args: List[str], csv_path: str, out: str, clusters: int) -> Dict[str, float]:
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "dnc"),
        "--log-level=WARNING",
        "preprocess",
        "--source=csv",
        f"--input={csv_path}",
        f"--output={out}",
        f"--num-clusters={clusters}",
        *mode_args,
    ]
    start = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - start
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    return {
        "wall_seconds": round(wall, 2),
        "pipeline_seconds": stats["elapsed_seconds"],
        "interactions": stats["interactions_read"],
        "interactions_per_second_wall": round(stats["interactions_read"] / wall, 1),
        "users": stats["users"],
        "items": stats["items"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, users=6040, items=3706, categories=18, mean_length=166)
    parser.add_argument("--num-clusters", type=int, default=10)
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "preprocess.json"))
    args = parser.parse_args()

    from preprocessing.sources.synthetic import write_csv

    work = tempfile.mkdtemp(prefix="dnc-bench-")
    try:
        config = synthetic_config(args)
        csv_path = os.path.join(work, "interactions.csv")
        start = time.monotonic()
        rows = write_csv(config, csv_path)
        generate_seconds = time.monotonic() - start
        print(f"generated {rows:,} interactions in {generate_seconds:.1f}s")
        results = {}
        for mode, mode_args in MODES.items():
            results[mode] = _run(mode_args, csv_path, os.path.join(work, mode), args.num_clusters)
            print(f"{mode}: {json.dumps(results[mode])}")
        report = {
            "benchmark": "preprocess",
            "data": {
                "kind": "synthetic csv (ML-1M size)",
                "rows": rows,
                "settings": vars(config) if hasattr(config, "__dict__") else str(config),
            },
            "settings": {"num_clusters": args.num_clusters, "clustering": "kmeans"},
            "results": results,
            "ratio_multi_over_in_process": round(
                results["in_process"]["wall_seconds"]
                / results["multi_processing_2"]["wall_seconds"],
                3,
            ),
            "machine": _machine(),
            "versions": _versions(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True, default=str)
        print(f"wrote {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
