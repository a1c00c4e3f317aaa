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
        [--portable [--sdk-worker-parallelism 1]] [--compare EARLIER_OUTPUT] \\
        [-- beam options ...]

With ``--portable`` the run goes through Beam's portable job API on loopback
(``python -m preprocessing.portable``: a job service and an external SDK worker pool,
separate processes, all in the sampled process tree); ``--compare`` checks that the
output holds the same data as an earlier run's (``preprocessing.output_digest``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import re
import shutil
import signal
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


def _mem_available_mb() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` in MB."""
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def _watch(
    pid: int, log_path: str, min_available_mb: float
) -> Tuple[Dict[str, Dict[str, float]], int, float]:
    """Samples memory until ``pid`` exits, reading the phase markers from ``log_path``.

    On the portable runner the stages run in the SDK worker, whose INFO lines reach
    no log, so the run is one phase. If the machine's available memory falls below
    ``min_available_mb``, the whole process tree is killed and the benchmark stops
    with that message (instead of the kernel's OOM killer choosing a process).

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
        tree = _tree_pids(pid)
        rss = sum(rss_mb(p) or 0.0 for p in tree)
        if _mem_available_mb() < min_available_mb:
            for member in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
            raise SystemExit(
                f"stopped: the machine's available memory fell below {min_available_mb} MB "
                f"(process tree at {rss:,.0f} MB RSS)"
            )
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


def _runner_line(report: Dict) -> str:
    if report.get("runner") != "portable":
        line = "Runner: the DirectRunner (in-process)."
    else:
        line = (
            "Runner: Beam's portable job API on loopback (`python -m preprocessing.portable`: "
            "a local job service and an external worker pool starting "
            f"{report['settings']['sdk_worker_parallelism']} SDK worker process(es); the peak "
            "RSS sums all of them). The stages run in the SDK worker, whose progress lines "
            "reach no log here, so the run is one phase."
        )
    compare = report.get("compare")
    if compare:
        verdict = "identical" if compare["equal"] else f"DIFFERENT in {compare['differing']}"
        line += f" Output vs `{compare['reference']}`: {verdict} (`preprocessing.output_digest`)."
    return line


def _markdown(report: Dict) -> str:
    s = report["stats"]
    lines = [
        f"# `dnc preprocess` at {s['interactions_read']:,} interactions",
        "",
        f"{s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions kept, "
        f"K = {s['clusters']}; synthetic source, project defaults, {report['machine']['cpus']} "
        f"cores; {report['date']}.",
        "",
        _runner_line(report),
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


def _command(
    args: argparse.Namespace, output: str, beam_args: List[str], service_logs: str
) -> List[str]:
    """The child's command line: ``dnc preprocess``, or the same on the portable runner."""
    preprocess = [
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
    if not args.portable:
        return [
            os.path.join(os.path.dirname(sys.executable), "dnc"),
            "--log-level=INFO",
            *preprocess,
        ]
    return [
        sys.executable,
        "-m",
        "preprocessing.portable",
        f"--log-dir={service_logs}",
        f"--sdk-worker-parallelism={args.sdk_worker_parallelism}",
        "--log-level=INFO",
        "--",
        *preprocess[1:],
    ]


def _compare(output: str, reference: str) -> Dict[str, object]:
    """Whether ``output`` holds the same data as ``reference`` (runner-independent)."""
    from preprocessing.output_digest import output_digest

    ours, theirs = output_digest(output), output_digest(reference)
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    return {
        "reference": reference,
        "equal": not differing,
        "differing": differing,
        "records": {k: v for k, v in ours.items() if k.startswith("records/")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, users=25_828, items=108_025, categories=15, mean_length=780)
    parser.add_argument("--clusters", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="run the child under cProfile")
    parser.add_argument("--keep", help="keep the preprocessing output (and the profile) here")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "preprocess-20m"))
    parser.add_argument(
        "--portable",
        action="store_true",
        help="run through Beam's portable job API (python -m preprocessing.portable: a local "
        "job service and an external SDK worker pool, separate processes)",
    )
    parser.add_argument("--sdk-worker-parallelism", type=int, default=1)
    parser.add_argument(
        "--compare",
        metavar="DIR",
        help="an earlier output of the same settings (e.g. the DirectRunner's): report "
        "whether this run wrote the same data (preprocessing.output_digest)",
    )
    parser.add_argument(
        "--min-available-mb",
        type=float,
        default=1024,
        help="stop the run when the machine's available memory falls below this",
    )
    args, beam_args = parser.parse_known_args()
    beam_args = [a for a in beam_args if a != "--"]

    work = tempfile.mkdtemp(prefix="dnc-scale-")
    output = args.keep or os.path.join(work, "out")
    log_path = os.path.join(work, "preprocess.log")
    command = _command(args, output, beam_args, os.path.join(work, "portable-logs"))
    profile_path = (args.keep or work).rstrip("/") + ".prof"
    if args.profile:
        command = [sys.executable, "-m", "cProfile", "-o", profile_path, *command]
    print(" ".join(command), flush=True)
    try:
        start = time.monotonic()
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            phases, code, maxrss_mb = _watch(process.pid, log_path, args.min_available_mb)
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
            "runner": "portable" if args.portable else "direct",
            "compare": _compare(output, args.compare) if args.compare else None,
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
