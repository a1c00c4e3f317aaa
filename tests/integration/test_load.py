"""The server under load and faults: shortened ``bench/load.py`` scenarios on the tiny model.

Real servers (in-process for the soak, ``python -m pipeline serve`` children for the kill),
real gRPC stubs and REST connections; versions are published by staging + rename while the
load runs, one of them corrupt.
"""

from __future__ import annotations

import pytest

from bench import load, loadgen, report_load

# Histories of realistic lengths (the tiny model reverses them; ids need not exist).
HISTORIES = [[f"i{j}" for j in range(n)] for n in (1, 2, 5, 9, 17, 31, 48, 80, 150)]
INFO = {"model": "tiny", "histories": "fixed", "history_lengths": {}}


def _report(tmp_path, templates, *flags):
    args = load.parse_args(["--poll-seconds=0.2", "--probes=3", "--load-timeout=120", *flags])
    raw = load.run_scenario(args, templates[1], HISTORIES, str(tmp_path))
    return report_load.build(args, INFO, raw)


def test_loopback_only():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert loadgen.require_loopback(host) == host
    for host in ("0.0.0.0", "10.0.0.1", "example.com", "192.168.1.1"):
        with pytest.raises(ValueError, match="loopback"):
            loadgen.require_loopback(host)
    assert load.main(["--host=10.1.2.3"]) == 2


def test_soak_short(tmp_path, templates):
    report = _report(
        tmp_path,
        templates,
        "--scenario=soak",
        "--server=in-process",
        "--clients=8",
        "--requests=1500",
        "--rate=200",  # about 7.5 s: the pushes resolve within the load
        "--time-limit=120",
    )
    r = report["results"]
    assert (r["sent"], r["answered"], r["failed"]) == (1500, 1500, 0), r["failed_by_code"]
    assert r["by_protocol"]["rest"]["answered"] > 0 and r["by_protocol"]["grpc"]["answered"] > 0
    pushes = [(p["version"], bool(p["corrupt"]), p["state"]) for p in report["pushes"]]
    assert pushes == [(2, False, "AVAILABLE"), (3, True, "END"), (4, False, "AVAILABLE")]
    assert "truncated" in report["pushes"][1]["corrupt"] and report["pushes"][1]["error"]
    answered = r["versions_answered_grpc"]
    assert "3" not in answered and {"1", "2"} <= set(answered), answered
    assert "3" not in report["versions_seen_available_s"]
    final = report["final"]
    assert final["serving_version"] == 4
    assert final["probes"] == [{"code": "OK", "version": 4}] * 3
    assert {s["version"]: s["state"] for s in final["status"]}[3] == "END"
    assert all(report["checks"].values()), report["checks"]


def test_sigkill_and_restart(tmp_path, templates):
    report = _report(
        tmp_path,
        templates,
        "--scenario=kill",
        "--clients=4",
        "--requests=1500",
        "--kill-at=0.3",
        "--retry-backoff=0.25",
        "--time-limit=150",
    )
    kill, r = report["kill"], report["results"]
    assert set(r["failed_by_code"]) == {"UNAVAILABLE"}, r["failed_by_code"]
    assert kill["killed_s"] < kill["ready_s"] and kill["pids"][0] != kill["pids"][1]
    assert kill["first_failure_s"] >= kill["killed_s"]
    assert kill["last_failure_s"] <= kill["ready_s"] + loadgen.RECONNECT_SLACK_SECONDS + 1
    assert kill["versions_answered_after_restart"].keys() == {2}  # not 3 (corrupt), not 1
    assert report["final"]["serving_version"] == 2
    assert sum(kill["failures_by_protocol"]["rest"].values()) > 0
    assert all(report["checks"].values()), report["checks"]


@pytest.mark.slow
def test_soak_full_size(tmp_path, templates):
    """The issue's soak: 32 clients, 20,000 requests, `dnc serve` child, 3 pushed versions."""
    report = _report(
        tmp_path,
        templates,
        "--scenario=soak",
        "--clients=32",
        "--requests=20000",
        "--time-limit=1200",
    )
    r = report["results"]
    assert (r["sent"], r["answered"], r["failed"]) == (20000, 20000, 0), r["failed_by_code"]
    assert "3" not in r["versions_answered_grpc"] and r["versions_answered_grpc"].get("4")
    assert report["final"]["serving_version"] == 4
    assert report["server"]["rss_mb_end"] < 2 * report["server"]["rss_mb_start"]
    assert all(report["checks"].values()), report["checks"]
