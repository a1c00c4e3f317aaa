"""Figures, checks, JSON and Markdown of a ``bench/load.py`` run."""

from __future__ import annotations

import argparse
import collections
from typing import Any, Dict, List, Optional, Sequence

from bench import loadgen
from bench import serving as serving_bench

SETTINGS = (
    "scenario",
    "server",
    "clients",
    "requests",
    "time_limit",
    "rate",
    "rest_share",
    "request_timeout",
    "retry_backoff",
    "pushes",
    "corrupt_kind",
    "kill_at",
    "down_seconds",
    "poll_seconds",
    "distinct_histories",
    "max_history_len",
)


def _latency(outcomes: Sequence[loadgen.Outcome], wall: float) -> Dict[str, Any]:
    ok = [o.end - o.start for o in outcomes if o.code == "OK"]
    stats = serving_bench.summarize(ok, wall)
    failed = collections.Counter(o.code for o in outcomes if o.code != "OK")
    return {
        "sent": len(outcomes),
        "answered": len(ok),
        "failed": sum(failed.values()),
        "failed_by_code": dict(sorted(failed.items())),
        "latency_ms": {k: stats[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms")}
        if ok
        else {},
        "throughput_rps": round(len(ok) / wall, 1) if wall > 0 else None,
    }


def _rss(monitor: Any, t0: float, points: int = 120) -> Dict[str, Any]:
    samples = [(round(t - t0, 2), v) for t, v in monitor.rss]
    step = max(1, len(samples) // points)
    return {
        "max_mb": max((v for _, v in samples), default=None),
        "samples_s_mb": samples[::step],
    }


def _monotonic(outcomes: Sequence[loadgen.Outcome]) -> bool:
    last: Dict[int, int] = {}
    for o in outcomes:  # ordered by start time
        if o.version is None:
            continue
        if o.version < last.get(o.client, 0):
            return False
        last[o.client] = o.version
    return True


def _kill_figures(
    kill: Dict[str, Any], outcomes: Sequence[loadgen.Outcome], good: int
) -> Dict[str, Any]:
    killed, ready = kill["killed_s"], kill["ready_s"]
    failures = [o for o in outcomes if o.code != "OK"]
    ok_before = [o.end for o in outcomes if o.code == "OK" and o.end <= killed]
    ok_after = [o.end for o in outcomes if o.code == "OK" and o.start >= killed]
    late = [o.start - ready for o in failures if o.start > ready]
    after_ready = [o for o in outcomes if o.code == "OK" and o.start > ready and o.version]
    return {
        **kill,
        "server_down_s": round(ready - killed, 3),
        "last_answer_before_kill_s": round(max(ok_before), 3) if ok_before else None,
        "first_answer_after_kill_s": round(min(ok_after), 3) if ok_after else None,
        "client_outage_s": round(min(ok_after) - killed, 3) if ok_after else None,
        "first_failure_s": round(min(o.end for o in failures), 3) if failures else None,
        "last_failure_s": round(max(o.end for o in failures), 3) if failures else None,
        "failures_started_after_ready": len(late),
        "max_failure_start_after_ready_s": round(max(late), 3) if late else 0.0,
        "failures_by_protocol": {
            p: dict(collections.Counter(o.code for o in failures if o.protocol == p))
            for p in ("grpc", "rest")
        },
        "versions_answered_after_restart": dict(
            collections.Counter(o.version for o in after_ready)
        ),
        "checks": {
            "only_unavailable": all(o.code == "UNAVAILABLE" for o in failures),
            "failures_only_while_down": all(
                o.end >= killed - 0.01 and o.start <= ready + loadgen.RECONNECT_SLACK_SECONDS
                for o in failures
            ),
            "back_on_latest_good": bool(after_ready)
            and all(o.version == good for o in after_ready),
        },
    }


def build(args: argparse.Namespace, info: Dict[str, Any], raw: Dict[str, Any]) -> Dict[str, Any]:
    """The report of one run (figures and the scenario's checks)."""
    run, events, monitor = raw["run"], raw["events"], raw["monitor"]
    outcomes = run.all_outcomes()
    final = raw["final"]
    pushes: List[Dict[str, Any]] = events.pushes
    corrupt = {p["version"] for p in pushes if p["corrupt"]}
    good = max([1] + [p["version"] for p in pushes if not p["corrupt"]])
    answered_versions = collections.Counter(o.version for o in outcomes if o.version)
    status = {s["version"]: s for s in final["status"]}
    ever_available = {v: round(t - run.t0, 3) for v, t in monitor.available_since.items()}
    report: Dict[str, Any] = {
        "benchmark": "load",
        "scenario": args.scenario,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        **{k: v for k, v in info.items()},
        "results": {
            **_latency(outcomes, run.wall),
            "wall_seconds": round(run.wall, 2),
            "load_started_s": round(run.started, 3),
            "by_protocol": {
                p: _latency([o for o in outcomes if o.protocol == p], run.wall)
                for p in ("grpc", "rest")
            },
            "versions_answered_grpc": {str(k): v for k, v in sorted(answered_versions.items())},
        },
        "server": {
            "pids": raw["pids"],
            "start_seconds": raw["server_start_seconds"],
            "rss_mb_start": raw["rss_mb_start"],
            "rss_mb_end": raw["rss_mb_end"],
            **_rss(monitor, run.t0),
            "exit_code_on_sigterm": raw["exit_code"],
        },
        "pushes": pushes,
        "versions_seen_available_s": {str(k): v for k, v in sorted(ever_available.items())},
        "final": final,
        "events_error": events.error,
    }
    checks: Dict[str, bool] = {
        "all_requests_sent": report["results"]["sent"] == args.requests,
        "events_ran": not events.error
        and all(p.get("state") in ("AVAILABLE", "END") for p in pushes),
        "soak_pushes_during_load": all(
            run.started <= p["pushed_s"] and p["resolved_s"] <= run.started + run.wall
            for p in pushes
            if p["at_fraction"] > 0 and "resolved_s" in p
        ),
        "final_version_serving": final["serving_version"] == good
        and all(p == {"code": "OK", "version": good} for p in final["probes"]),
        "corrupt_never_served": not (corrupt & set(answered_versions))
        and not (corrupt & set(ever_available))
        and all(status.get(v, {}).get("state") != "AVAILABLE" for v in corrupt),
        "versions_monotonic_per_client": _monotonic(outcomes),
    }
    if args.scenario == "kill":
        if "ready_s" in events.kill:
            report["kill"] = _kill_figures(events.kill, outcomes, good)
            checks.update(report["kill"]["checks"])
        else:
            report["kill"] = events.kill
            checks["restarted"] = False
    else:
        checks["zero_failures"] = report["results"]["failed"] == 0
    report["checks"] = checks
    return report


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def markdown(report: Dict[str, Any]) -> str:
    """A short Markdown summary."""
    r, s, server = report["results"], report["settings"], report["server"]
    lat, machine = r["latency_ms"], report["machine"]
    lines = [
        f"# Serving under load: `{report['scenario']}`",
        "",
        f"{report.get('date', '')}; {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"load average {machine['load_average_start']} -> {machine['load_average_end']}. "
        f"Model: {report['model']}. Histories: "
        f"{report['histories']} ({report['history_lengths']}).",
        f"{s['clients']} clients ({s['rest_share']:.0%} REST), {s['requests']:,} requests, "
        f"server `{s['server']}` (`dnc serve`), version polling every {s['poll_seconds']} s.",
        "",
        "| sent | answered | failed | p50 ms | p90 ms | p99 ms | max ms | req/s "
        "| RSS start MiB | RSS end MiB | RSS max MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['sent']:,} | {r['answered']:,} | {r['failed']:,} {r['failed_by_code'] or ''} "
        f"| {_fmt(lat.get('p50_ms'))} | {_fmt(lat.get('p90_ms'))} | {_fmt(lat.get('p99_ms'))} "
        f"| {_fmt(lat.get('max_ms'))} | {_fmt(r['throughput_rps'])} "
        f"| {_fmt(server['rss_mb_start'])} | {_fmt(server['rss_mb_end'])} "
        f"| {_fmt(server['max_mb'])} |",
        "",
    ]
    for p in report["pushes"]:
        kind = f"corrupt ({p['corrupt']})" if p["corrupt"] else "good"
        rss = f" (server RSS {p['rss_mb_before']} MiB before)" if p.get("rss_mb_before") else ""
        lines.append(
            f"* pushed version {p['version']} ({kind}) at {p.get('pushed_s', '-')} s{rss}: "
            f"{p.get('state')} at {p.get('resolved_s', '-')} s"
        )
    lines.append(f"* answers by version (gRPC): {r['versions_answered_grpc']}")
    if "kill" in report and "server_down_s" in report["kill"]:
        k = report["kill"]
        lines.append(
            f"* SIGKILL at {k['killed_s']} s, restarted at {k['restarted_s']} s, serving again at "
            f"{k['ready_s']} s (server down {k['server_down_s']} s; clients without an answer "
            f"{k['client_outage_s']} s); failures {r['failed_by_code']}, the last at "
            f"{k['last_failure_s']} s; answers after the restart by version: "
            f"{k['versions_answered_after_restart']}"
        )
    lines.append(f"* checks: {report['checks']}")
    return "\n".join(lines) + "\n"
