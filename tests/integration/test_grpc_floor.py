"""bench/grpc_floor.py end to end: a bare gRPC echo and ``dnc serve``'s server in child
processes, asked through the real ``tensorflow-serving-api`` stub and ``PredictClient``."""

from __future__ import annotations

import json

from bench import grpc_floor


def test_the_floor_benchmark_times_every_phase_and_the_server_answers(tmp_path):
    out = tmp_path / "floor"
    argv = ["--requests", "20", "--warmup", "2", "--serving-report", "", "--out", str(out)]
    assert grpc_floor.main(argv) == 0
    report = json.loads((tmp_path / "floor.json").read_text())
    phases = report["results"]["phases"]
    assert set(phases) == set(grpc_floor.PHASES)
    for stats in phases.values():
        assert stats["requests"] == 20 and 0 < stats["p50_ms"] <= stats["p99_ms"]
    assert "bound" not in report["results"]  # no serving report was given
    assert "load_average_end" in report["machine"]
    assert "| `dnc_serve_client` |" in (tmp_path / "floor.md").read_text()
