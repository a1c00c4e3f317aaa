"""Benchmark: memory of repeated hot swaps (load, warm up, serve, unload) in one process.

Runs :class:`serving.model_manager.ServedModel` in this process on a copy of a model template:
``--threads`` threads call the latest version's ``serving_default`` (light load, paced to
``--rate`` requests/s in all) while a new version is published and polled in ``--swaps`` times.
After each swap (the previous version unloaded) it records:

* the process RSS (``/proc/self/status``),
* glibc's ``mallinfo2``: bytes in use (``uordblks + hblkhd``) and free bytes the allocator
  keeps (``fordblks``), which tells allocations still referenced from freed-but-kept memory,
* the functions registered in TensorFlow's eager context and whether the unloaded versions
  (``LoadedVersion`` and the restored SavedModel object) were garbage collected (weak refs),
* optionally (``--trim``) the RSS after ``malloc_trim(0)``.

Writes ``OUT.json``::

    .venv/bin/python bench/swap_memory.py --model-template runs/pipeline/serving/dnc \\
        --swaps 30 --out bench/results/swap-memory
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dnc_env  # noqa: E402,F401  (tf-keras before tensorflow)
from bench import loadgen  # noqa: E402
from bench import serving as serving_bench  # noqa: E402


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Optional[Any]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _libc()


def malloc_mb() -> Dict[str, Optional[float]]:
    """glibc heap figures in MiB (None where not glibc)."""
    if LIBC is None:
        return {"in_use_mb": None, "free_kept_mb": None}
    info = LIBC.mallinfo2()
    mib = 1024.0 * 1024.0
    return {
        "in_use_mb": round((info.uordblks + info.hblkhd) / mib, 1),
        "free_kept_mb": round(info.fordblks / mib, 1),
    }


def rss_mb() -> Optional[float]:
    """This process's RSS in MiB."""
    return loadgen.rss_mb(os.getpid())


def rss_parts_mb() -> Dict[str, float]:
    """RssAnon and RssFile of this process in MiB."""
    out: Dict[str, float] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0].lower() + "_mb"] = round(int(line.split()[1]) / 1024.0, 1)
    return out


def eager_functions() -> int:
    """Functions registered in TensorFlow's eager context."""
    from tensorflow.python.eager import context

    return len(context.context().list_function_names())


class Clients:
    """Threads calling the latest loaded version, paced to ``rate`` requests/s in all."""

    def __init__(self, model: Any, histories: Sequence[Any], threads: int, rate: float) -> None:
        self.model, self.histories, self.rate = model, histories, rate
        self.stop = threading.Event()
        self.calls = 0
        self.errors: List[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)
        ]

    def _loop(self, index: int) -> None:
        pause = len(self.threads) / self.rate if self.rate > 0 else 0.0
        i = index
        while not self.stop.is_set():
            history = self.histories[i % len(self.histories)]
            i += len(self.threads)
            try:
                self.model.get().run("serving_default", {"history": history})
                with self.lock:
                    self.calls += 1
            except Exception as e:  # noqa: BLE001  (counted and reported)
                with self.lock:
                    self.errors.append(f"{type(e).__name__}: {e}"[:200])
            if pause:
                self.stop.wait(pause)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Swaps ``args.swaps`` times; returns the per-swap measurements."""
    import numpy as np

    from bench.load import histories_from_data, latest_version_dir
    from serving.model_manager import ModelConfig, ServedModel, default_loader

    work = tempfile.mkdtemp(prefix="dnc-swaps-")
    try:
        template = os.path.join(work, "template")
        shutil.copytree(latest_version_dir(args.model_template), template)
        meta_path = os.path.join(template, "assets.extra", "dnc_metadata.json")
        with open(meta_path, encoding="utf-8") as f:
            data_dir = json.load(f).get("data_dir", "")
        histories = [
            np.array([[h.encode() for h in history]], dtype=object)
            for history in histories_from_data(data_dir, 200, 200)
        ]
        base = os.path.join(work, "models", "dnc")
        os.makedirs(base)
        loadgen.push_version(base, template, 1)
        model = ServedModel(ModelConfig("dnc", base), default_loader)
        model.poll()
        clients = Clients(model, histories, args.threads, args.rate)
        clients.start()
        time.sleep(args.settle)
        refs: List[Any] = []
        rows: List[Dict[str, Any]] = []

        def sample(swap: int, seconds: float) -> Dict[str, Any]:
            row: Dict[str, Any] = {"swap": swap, "load_seconds": round(seconds, 2)}
            if args.gc:
                start = time.monotonic()
                gc.collect()
                row["gc_seconds"] = round(time.monotonic() - start, 3)
            row.update(
                {
                    "rss_mb": rss_mb(),
                    **rss_parts_mb(),
                    **malloc_mb(),
                    "python_blocks": sys.getallocatedblocks(),
                    "threads": threading.active_count(),
                    "os_threads": len(os.listdir("/proc/self/task")),
                    "eager_functions": eager_functions(),
                    "unloaded_alive": sum(r() is not None for r in refs),
                    "calls": clients.calls,
                }
            )
            if args.trim and LIBC is not None:
                start = time.monotonic()
                LIBC.malloc_trim(0)
                row["trim_seconds"] = round(time.monotonic() - start, 3)
                row["rss_mb_after_trim"] = rss_mb()
                row["rssanon_mb_after_trim"] = rss_parts_mb()["rssanon_mb"]
            print(json.dumps(row), flush=True)
            return row

        rows.append(sample(0, 0.0))
        for swap in range(1, args.swaps + 1):
            old = model.get()
            refs += [weakref.ref(old), weakref.ref(old.obj)]
            del old
            loadgen.push_version(base, template, swap + 1)
            start = time.monotonic()
            model.poll()  # loads and warms the new version, unloads the old one
            seconds = time.monotonic() - start
            time.sleep(args.settle)
            model.poll()  # as the server's next poll: releases what requests held then
            rows.append(sample(swap, seconds))
            shutil.rmtree(os.path.join(base, str(swap)))  # as an operator would
        clients.join()
        return {
            "rows": rows,
            "calls": clients.calls,
            "errors": clients.errors[:5],
            "error_count": len(clients.errors),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-template", required=True, help="exported version dir or base path")
    p.add_argument("--swaps", type=int, default=30)
    p.add_argument("--threads", type=int, default=4, help="client threads")
    p.add_argument("--rate", type=float, default=40.0, help="requests/s in all (0: closed loop)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of load after each swap")
    p.add_argument("--gc", action="store_true", help="gc.collect() before each sample")
    p.add_argument("--trim", action="store_true", help="also sample after malloc_trim(0)")
    p.add_argument("--out", default="", help="write OUT.json")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the swaps and writes the JSON."""
    args = parse_args(argv)
    report = {
        "benchmark": "swap_memory",
        "settings": vars(args),
        **run(args),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": serving_bench.machine(),
        "versions": serving_bench.versions(),
    }
    if args.out:
        with open(args.out + ".json", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0 if report["error_count"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
