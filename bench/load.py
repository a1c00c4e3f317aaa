"""Benchmark: the model server under load and faults (loopback only, bounded).

N client threads (gRPC ``PredictionService`` stub and REST) send ``serving_default``
requests to ``dnc serve`` (a child process, so that its RSS is its own; ``--server
in-process`` runs ``serving.server.Server`` here instead) until a fixed request count or a
time limit is reached. Histories are users' training sequences: those of ``--data`` (a
``dnc preprocess`` output, read with ``trainer.data``), else of the data set the model
template was exported from (its ``dnc_metadata.json``), else of the project's synthetic source.
The model is ``--model-template`` (an exported version directory), else a synthetic model
over the synthetic source's items built with ``bench/serving.py``'s helpers.

Scenarios:

* ``load``: the load alone.
* ``soak``: versions are pushed into the model base path during the run the way ``dnc
  export`` publishes them (staging directory + rename), by default good, corrupt, good.
  Checks: no valid request fails, no answer (``model_spec.version``) or ``GetModelStatus``
  ever shows a corrupt version, the last good version serves at the end.
* ``kill``: a good and a corrupt version are pushed, then the server is SIGKILLed mid-run
  and restarted. Checks: it comes back on the latest good version, clients see only
  UNAVAILABLE, and only while it is down (plus a reconnect slack).

Writes ``OUT.json`` and ``OUT.md``::

    .venv/bin/python bench/load.py --scenario soak --out bench/results/load-soak
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dnc_env  # noqa: E402,F401  (tf-keras before tensorflow)
from bench import (  # noqa: E402
    loadgen,
    report_load,
    serving_catalogue,  # noqa: E402
)
from bench import serving as serving_bench  # noqa: E402
from bench.machine import load_average  # noqa: E402
from preprocessing.errors import EXIT_USAGE  # noqa: E402
from serving.index_kinds import GLOBAL_LEAVES_FRACTION, INDEX_KINDS, LEAVES_FRACTION  # noqa: E402

SCENARIOS = ("load", "soak", "kill")
MODEL_NAME = "dnc"


# ---------------------------------------------------------------------------- inputs


def latest_version_dir(path: str) -> str:
    """``path`` if it holds a SavedModel, else its newest integer version directory."""
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = [int(e) for e in os.listdir(path) if e.isdigit()]
    if not versions:
        raise ValueError(f"{path} is neither a SavedModel nor a base path with versions")
    return os.path.join(path, str(max(versions)))


def _metadata(template: str) -> Dict[str, Any]:
    path = os.path.join(template, "assets.extra", "dnc_metadata.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def histories_from_data(data_dir: str, limit: int, max_len: int) -> List[List[str]]:
    """Raw-id training sequences (most recent ``max_len`` items) of up to ``limit`` users."""
    from trainer import data

    items = data.load_items(data_dir)
    out: List[List[str]] = []
    for record in data.read_split(data_dir, "train").take(limit):
        ids = record["items"].numpy() - 1
        sequence = [str(x) for x in items.item_ids[ids][-max_len:]]
        if sequence:
            out.append(sequence)
    return out


def synthetic_world(args: argparse.Namespace) -> Any:
    """The project's synthetic source (``preprocessing.sources.synthetic``) world."""
    from preprocessing.config import SyntheticConfig
    from preprocessing.sources import synthetic

    config = SyntheticConfig(
        num_users=args.synthetic_users,
        num_items=args.items,
        num_categories=args.clusters,
        mean_length=args.synthetic_mean_length,
        seed=args.seed,
    )
    return synthetic.build_world(config)


def histories_from_world(world: Any, limit: int, max_len: int) -> List[List[str]]:
    """Training sequences (all but the last two events) of the synthetic source's users."""
    from preprocessing.sources import synthetic

    out = []
    for user in range(min(limit, world.config.num_users)):
        items, _ = synthetic.generate_user_arrays(world, user)
        sequence = [str(x) for x in world.item_ids[items[:-2]][-max_len:]]
        if sequence:
            out.append(sequence)
    return out


def synthetic_template(world: Any, work: str, args: argparse.Namespace) -> str:
    """A synthetic-embedding model over the world's items (``bench/serving.py``)."""
    ids = [str(x) for x in world.item_ids]
    data = serving_catalogue.synthetic_items(len(ids), args.clusters, 64, 1.0, args.seed)
    options = SimpleNamespace(
        max_num_results=200,
        max_history=512,
        scann_min_size=1024,
        leaves_fraction=LEAVES_FRACTION,  # the dnc export defaults
        global_leaves_fraction=GLOBAL_LEAVES_FRACTION,
        max_len=50,
        seed=args.seed,
        num_results=50,
        alpha=1.0,
    )
    output = os.path.join(work, "synthetic", "model", "1")
    serving_catalogue.export_synthetic(data, ids, args.index, output, options)
    return output


def prepare(args: argparse.Namespace, work: str) -> Dict[str, Any]:
    """Copies or builds the model template and reads the request histories."""
    info: Dict[str, Any] = {}
    world = None
    if args.model_template:
        source = latest_version_dir(args.model_template)
        template = os.path.join(work, "template")
        shutil.copytree(source, template)  # a private copy: the source may change
        meta = _metadata(template)
        info["model"] = f"{source} ({meta.get('variant', 'unknown variant')})"
        info["model_metadata"] = {
            k: meta[k] for k in ("variant", "num_items", "num_clusters", "index") if k in meta
        }
    else:
        world = synthetic_world(args)
        template = synthetic_template(world, work, args)
        info["model"] = (
            f"synthetic embeddings (bench/serving.py) over the synthetic source's {args.items} "
            f"items, K={args.clusters}, index {args.index}"
        )
        meta = {}
    data_dir = args.data or meta.get("data_dir")
    if data_dir and os.path.isdir(data_dir):
        histories = histories_from_data(data_dir, args.distinct_histories, args.max_history_len)
        info["histories"] = f"training sequences of {data_dir}"
    else:
        world = world or synthetic_world(args)
        histories = histories_from_world(world, args.distinct_histories, args.max_history_len)
        info["histories"] = "training sequences of the synthetic source"
    lengths = sorted(len(h) for h in histories)
    info["history_lengths"] = {
        "users": len(lengths),
        "min": lengths[0],
        "median": lengths[len(lengths) // 2],
        "max": lengths[-1],
    }
    info["template"] = template
    info["histories_list"] = histories
    return info


# ---------------------------------------------------------------------------- scenarios


def push_plan(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The versions pushed: ``[{version, corrupt, at_fraction}]``.

    Soak: during the run, at 1/(n+2), ..., n/(n+2) of the requests (the last good version
    then answers the last part of the run). Kill: before the load starts (so that the latest
    version on disk is corrupt and the latest good one is not the first when it comes).
    """
    if args.scenario == "load":
        return []
    default = "good,corrupt" if args.scenario == "kill" else "good,corrupt,good"
    spec = default if args.pushes is None else args.pushes
    if spec.strip().lower() == "none":
        spec = ""  # a steady-state soak: one version throughout
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    for kind in kinds:
        if kind not in ("good", "corrupt"):
            raise ValueError(f"--pushes: unknown kind {kind!r} (good or corrupt)")
    return [
        {
            "version": 2 + i,
            "corrupt": args.corrupt_kind if kind == "corrupt" else "",
            "at_fraction": 0.0 if args.scenario == "kill" else round((i + 1) / (len(kinds) + 2), 3),
        }
        for i, kind in enumerate(kinds)
    ]


class Events(threading.Thread):
    """Pushes versions at request-count milestones and (``kill``) kills and restarts."""

    def __init__(
        self, args: argparse.Namespace, run: Any, server: Any, base: str, template: str
    ) -> None:
        super().__init__(name="events", daemon=True)
        self.args, self.run_, self.server, self.base, self.template = (
            args,
            run,
            server,
            base,
            template,
        )
        self.pushes = push_plan(args)
        self.kill: Dict[str, Any] = {}
        self.error = ""

    def _resolve(self, push: Dict[str, Any]) -> None:
        """Waits until the pushed version is AVAILABLE (good) or has failed (corrupt)."""
        import grpc

        deadline = time.monotonic() + self.args.load_timeout
        with grpc.insecure_channel(self.server.grpc_target) as channel:
            while time.monotonic() < deadline:
                try:
                    statuses = loadgen.model_status(channel, MODEL_NAME)
                except grpc.RpcError:
                    statuses = []
                mine = [s for s in statuses if s["version"] == push["version"]]
                if mine and (mine[0]["state"] == "AVAILABLE" or mine[0]["error"]):
                    push["state"], push["error"] = mine[0]["state"], mine[0]["error"][:300]
                    push["resolved_s"] = round(self.run_.now(), 3)
                    return
                time.sleep(0.05)
        push["state"] = "TIMEOUT"

    def push(self, push: Dict[str, Any]) -> None:
        """Publishes one planned version and waits until the server has dealt with it."""
        push["rss_mb_before"] = loadgen.rss_mb(self.server.pid)
        loadgen.push_version(self.base, self.template, push["version"], push["corrupt"])
        push["pushed_s"] = round(self.run_.now(), 3)
        self._resolve(push)
        push["rss_mb_resolved"] = loadgen.rss_mb(self.server.pid)

    def run(self) -> None:
        """Runs the plan's pushes that are due during the load, then (kill) the kill."""
        try:
            for push in self.pushes:
                if push.get("pushed_s") is not None:
                    continue  # pushed before the load
                if not self.run_.wait_done(int(push["at_fraction"] * self.run_.total), 1e9):
                    push["state"] = "SKIPPED (the load ended first)"
                    continue
                self.push(push)
            if self.args.scenario == "kill":
                self._kill_and_restart()
        except Exception as e:  # noqa: BLE001  (reported in the JSON, fails the checks)
            self.error = f"{type(e).__name__}: {e}"

    def _kill_and_restart(self) -> None:
        if not self.run_.wait_done(int(self.args.kill_at * self.run_.total), 1e9):
            self.kill["state"] = "SKIPPED (the load ended first)"
            return
        old_pid = self.server.pid
        self.kill["rss_mb_before_kill"] = loadgen.rss_mb(old_pid)
        self.kill["killed_s"] = round(self.run_.now(), 3)
        self.server.kill()
        time.sleep(self.args.down_seconds)
        self.kill["restarted_s"] = round(self.run_.now(), 3)
        ready = self.server.start(self.args.load_timeout)
        self.kill["ready_s"] = round(ready - self.run_.t0, 3)
        self.kill["pids"] = [old_pid, self.server.pid]


def run_scenario(
    args: argparse.Namespace, template: str, histories: Sequence[Sequence[str]], work: str
) -> Dict[str, Any]:
    """Runs one scenario against a fresh base path; returns the raw measurements."""
    base = os.path.join(work, "models", MODEL_NAME)
    os.makedirs(base, exist_ok=True)
    loadgen.push_version(base, template, 1)
    if args.server == "subprocess":
        server: Any = loadgen.ServerProcess(
            MODEL_NAME,
            base,
            os.path.join(work, "server.log"),
            args.host,
            args.poll_seconds,
        )
    else:
        if args.scenario == "kill":
            raise ValueError("--scenario kill needs --server subprocess")
        server = loadgen.InProcessServer(MODEL_NAME, base, args.host, args.poll_seconds)
    start = time.monotonic()
    server.start(args.load_timeout)
    out: Dict[str, Any] = {"server_start_seconds": round(time.monotonic() - start, 2)}
    monitor = loadgen.Monitor(server)
    try:
        out["rss_mb_start"] = loadgen.rss_mb(server.pid)
        monitor.start()
        run = loadgen.LoadRun(
            server,
            histories,
            args.clients,
            args.requests,
            args.time_limit,
            rest_clients=round(args.clients * args.rest_share),
            timeout=args.request_timeout,
            retry_backoff=args.retry_backoff,
            rate=args.rate,
        )
        events = Events(args, run, server, base, template)
        for push in events.pushes:
            if push["at_fraction"] == 0.0:
                events.push(push)
        events.start()
        run.run()
        events.join(args.load_timeout + 60)
        out["rss_mb_end"] = loadgen.rss_mb(server.pid)
        out["final"] = final_check(server, args)
    finally:
        monitor.stop()
        out["exit_code"] = server.stop()
    out.update(run=run, events=events, monitor=monitor, pids=list(server.pids))
    return out


def final_check(server: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """``GetModelStatus`` and a few probe requests after the load."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(server.grpc_target, loadgen.CHANNEL_OPTIONS) as channel:
        statuses = loadgen.model_status(channel, MODEL_NAME)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        requests = loadgen.grpc_requests(MODEL_NAME, [["probe"]] * args.probes)
        probes = [loadgen.grpc_call(stub, r, args.request_timeout) for r in requests]
    return {
        "status": statuses,
        "serving_version": loadgen.serving_version(statuses),
        "probes": [{"code": c, "version": v} for c, v in probes],
    }


# ---------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", choices=SCENARIOS, default="load")
    p.add_argument("--server", choices=("subprocess", "in-process"), default="subprocess")
    p.add_argument("--host", default="127.0.0.1", help="loopback only")
    p.add_argument("--clients", type=int, default=None, help="default 32 (soak), else 8")
    p.add_argument(
        "--requests", type=int, default=None, help="default 20000 (soak), 6000 (kill), 4000"
    )
    p.add_argument("--time-limit", type=float, default=3600.0, help="seconds of load at most")
    p.add_argument("--rate", type=float, default=0.0, help="requests/s in all (0: closed loop)")
    p.add_argument("--rest-share", type=float, default=0.25, help="share of REST clients")
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument(
        "--retry-backoff", type=float, default=0.1, help="a client's pause after UNAVAILABLE"
    )
    p.add_argument(
        "--pushes",
        default=None,
        help="soak: good,corrupt,good; kill: good,corrupt; '' or none: no push",
    )
    p.add_argument("--corrupt-kind", choices=loadgen.CORRUPTIONS, default="truncated-pb")
    p.add_argument("--kill-at", type=float, default=0.5, help="kill: fraction of the requests")
    p.add_argument("--down-seconds", type=float, default=0.0, help="kill: delay before restart")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="server version polling")
    p.add_argument("--load-timeout", type=float, default=300.0, help="server start / load limit")
    p.add_argument("--probes", type=int, default=4, help="requests checked after the load")
    p.add_argument("--model-template", help="exported version dir (or base path) to push")
    p.add_argument("--data", help="dnc preprocess output whose training sequences are sent")
    p.add_argument("--distinct-histories", type=int, default=2000)
    p.add_argument("--max-history-len", type=int, default=200)
    p.add_argument("--items", type=int, default=20000, help="synthetic model / source items")
    p.add_argument("--clusters", type=int, default=10, help="synthetic model / source K")
    p.add_argument("--index", choices=INDEX_KINDS, default="scann")
    p.add_argument("--synthetic-users", type=int, default=2000)
    p.add_argument("--synthetic-mean-length", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default bench/results/load-SCENARIO")
    args = p.parse_args(argv)
    loadgen.require_loopback(args.host)
    soak = args.scenario == "soak"
    args.clients = args.clients or (32 if soak else 8)
    args.requests = args.requests or {"soak": 20000, "kill": 6000}.get(args.scenario, 4000)
    args.out = args.out or os.path.join(ROOT, "bench", "results", f"load-{args.scenario}")
    if not 0.0 <= args.rest_share <= 1.0 or not 0.0 < args.kill_at < 1.0:
        p.error("--rest-share must be in [0, 1] and --kill-at in (0, 1)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns 0 when every check of the scenario passed."""
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"load: {e}", file=sys.stderr)
        return EXIT_USAGE
    load_at_start = load_average()
    work = tempfile.mkdtemp(prefix="dnc-load-")
    try:
        info = prepare(args, work)
        print(f"[load] {args.scenario}: model {info['model']}; {info['histories']}", flush=True)
        raw = run_scenario(args, info.pop("template"), info.pop("histories_list"), work)
        report = report_load.build(args, info, raw)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    report["machine"] = serving_bench.machine()
    report["machine"]["load_average_start"] = load_at_start
    report["machine"]["load_average_end"] = load_average()
    report["versions"] = serving_bench.versions()
    serving_bench.write(report, args.out, report_load.markdown)
    print(report_load.markdown(report))
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
