"""Benchmark: `dnc preprocess` at KuaiRand's size, wall time and peak memory per phase.

Runs ``dnc preprocess --source synthetic`` (the generator stands in for reading the
logs) in a child process with the project's defaults, sized like KuaiRand by default
(25,828 users, 108,025 items, ~20M interactions, K = 15), and samples the resident
memory of the child's whole process tree every half second. The phases are read off
the child's own log lines as they appear (to the half second):

- ``start-up+read+group+split``: start the process (imports), generate (or parse)
  the rows, group them by user, order, filter, split, and collect the training
  sequences for the clustering;
- ``item2vec``: building the Word2Vec corpus and training it;
- ``k-means``: scikit-learn K-means on the item vectors;
- ``records+tft+write``: the cluster lookups, the TFT analysis and transform, the
  TFRecord, stats and cluster writes, and publishing the output.

With ``--profile`` the child also runs under cProfile, and the report adds the
cumulative time of the functions that own each finer stage; cProfile slows the
Python-heavy stages more than the native ones, so use its shares, not its seconds.

    .venv/bin/python bench/preprocess_scale.py [--users 25828 --items 108025 \\
        --mean-length 780 --clusters 15] [--profile] [--out bench/results/preprocess-20m] \\
        [-- beam options ...]
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import rss_mb  # noqa: E402
from preprocess import _machine, _versions, add_size_arguments  # noqa: E402

# (phase that starts, pattern of the log line that starts it); the first phase starts
# with the child process.
PHASE_MARKERS: List[Tuple[str, str]] = [
    ("item2vec", r"INFO preprocessing\.clustering: item2vec: training"),
    ("k-means", r"INFO preprocessing\.clustering: item2vec: \d+ items"),
    ("records+tft+write", r"INFO preprocessing\.clustering: k-means: K="),
]
FIRST_PHASE = "start-up+read+group+split"

# Finer stages from the profile: (stage, file suffix, function name); the cumulative
# time of each listed function is summed per stage.
PROFILE_STAGES: List[Tuple[str, str, str]] = [
    ("generate (stands in for parse)", "preprocessing/sources/synthetic.py", "process"),
    ("order/filter/split per user", "preprocessing/sequences.py", "order_events"),
    ("order/filter/split per user", "preprocessing/sequences.py", "filter_user"),
    ("order/filter/split per user", "preprocessing/sequences.py", "split_user"),
    ("item2vec", "preprocessing/clustering.py", "_item2vec"),
    ("item2vec", "preprocessing/clustering.py", "_corpus"),
    ("k-means", "sklearn/cluster/_kmeans.py", "fit"),
    ("cluster lookups (records)", "preprocessing/sequences.py", "split_records"),
    ("TFT analyze + transform (TF graph runs)", "tensorflow_transform/beam/impl.py", "process"),
    ("TFRecord write", "apache_beam/io/iobase.py", "process"),
]


def _tree_pids(root: int) -> List[int]:
    """``root`` and all its descendants, from the parent ids in ``/proc/*/stat``."""
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _watch(pid: int, log_path: str) -> Tuple[Dict[str, Dict[str, float]], int, float]:
    """Samples memory until ``pid`` exits.

    Returns:
        Seconds and peak RSS per phase, the exit code, and the child's own
        ``ru_maxrss`` in MB.
    """
    phases = {FIRST_PHASE: {"start": time.time(), "peak_rss_mb": 0.0}}
    current, markers, offset = FIRST_PHASE, list(PHASE_MARKERS), 0
    while True:
        reaped, status, usage = os.wait4(pid, os.WNOHANG)
        done = reaped != 0
        with open(log_path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            new = f.read()
            offset = f.tell()
        for line in new.splitlines():
            if markers and re.search(markers[0][1], line):
                current = markers.pop(0)[0]
                phases[current] = {"start": time.time(), "peak_rss_mb": 0.0}
        if done:
            break
        rss = sum(rss_mb(p) or 0.0 for p in _tree_pids(pid))
        phases[current]["peak_rss_mb"] = max(phases[current]["peak_rss_mb"], round(rss, 1))
        time.sleep(0.5)
    end = time.time()
    names = list(phases)
    for name, following in zip(names, names[1:] + [None], strict=True):
        stop = phases[following]["start"] if following else end
        phases[name]["seconds"] = round(stop - phases[name].pop("start"), 1)
    return phases, os.waitstatus_to_exitcode(status), round(usage.ru_maxrss / 1024, 1)


def _profile_stages(path: str) -> Dict[str, float]:
    """Cumulative seconds of the functions in ``PROFILE_STAGES``, summed per stage."""
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    total = max(entry[3] for entry in stats.values())
    stages: Dict[str, float] = {"total (profiled)": round(total, 1)}
    for stage, suffix, function in PROFILE_STAGES:
        seconds = sum(
            entry[3]
            for (filename, _, name), entry in stats.items()
            if filename.endswith(suffix) and name == function
        )
        stages[stage] = round(stages.get(stage, 0.0) + seconds, 1)
    return stages


def _markdown(report: Dict) -> str:
    s = report["stats"]
    lines = [
        f"# `dnc preprocess` at {s['interactions_read']:,} interactions",
        "",
        f"{s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions kept, "
        f"K = {s['clusters']}; synthetic source, project defaults, {report['machine']['cpus']} "
        f"cores; {report['date']}.",
        "",
        f"Wall time {report['wall_seconds']:.0f} s ({report['wall_seconds'] / 60:.1f} min), "
        f"{s['interactions_read'] / report['wall_seconds']:,.0f} interactions/s; peak RSS "
        f"{report['peak_rss_mb']:,.0f} MB (`ru_maxrss` of the largest process: "
        f"{report['ru_maxrss_mb']:,.0f} MB).",
        "",
        "| phase | seconds | share | peak RSS (MB) |",
        "|---|---:|---:|---:|",
    ]
    for name, phase in report["phases"].items():
        share = phase["seconds"] / report["wall_seconds"]
        lines.append(
            f"| {name} | {phase['seconds']:.1f} | {share:.0%} | {phase['peak_rss_mb']:,.0f} |"
        )
    if report.get("profile"):
        lines += [
            "",
            "cProfile, cumulative seconds (shares only; the profiler's overhead is uneven):",
        ]
        lines += ["", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in report["profile"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, users=25_828, items=108_025, categories=15, mean_length=780)
    parser.add_argument("--clusters", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="run the child under cProfile")
    parser.add_argument("--keep", help="keep the preprocessing output (and the profile) here")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "preprocess-20m"))
    args, beam_args = parser.parse_known_args()
    beam_args = [a for a in beam_args if a != "--"]

    work = tempfile.mkdtemp(prefix="dnc-scale-")
    output = args.keep or os.path.join(work, "out")
    log_path = os.path.join(work, "preprocess.log")
    command = [
        os.path.join(os.path.dirname(sys.executable), "dnc"),
        "--log-level=INFO",
        "preprocess",
        "--source=synthetic",
        f"--synthetic-users={args.users}",
        f"--synthetic-items={args.items}",
        f"--synthetic-categories={args.categories}",
        f"--synthetic-mean-length={args.mean_length}",
        f"--num-clusters={args.clusters}",
        f"--output={output}",
        *beam_args,
    ]
    profile_path = (args.keep or work).rstrip("/") + ".prof"
    if args.profile:
        command = [sys.executable, "-m", "cProfile", "-o", profile_path, *command]
    print(" ".join(command), flush=True)
    try:
        start = time.monotonic()
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            phases, code, maxrss_mb = _watch(process.pid, log_path)
            process.returncode = code  # reaped by _watch
        wall = time.monotonic() - start
        if code != 0:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                sys.stderr.write(f.read()[-4000:])
            raise SystemExit(f"dnc preprocess failed (exit {code})")
        with open(os.path.join(output, "stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
        report = {
            "benchmark": "preprocess_scale",
            "command": command,
            "settings": vars(args) | {"beam_args": beam_args},
            "stats": stats,
            "wall_seconds": round(wall, 1),
            "phases": phases,
            "peak_rss_mb": max(p["peak_rss_mb"] for p in phases.values()),
            "ru_maxrss_mb": maxrss_mb,
            "profile": _profile_stages(profile_path) if args.profile else None,
            "machine": _machine(),
            "versions": _versions(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=True, default=str)
        with open(args.out + ".md", "w", encoding="utf-8") as f:
            f.write(_markdown(report))
        print(_markdown(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
