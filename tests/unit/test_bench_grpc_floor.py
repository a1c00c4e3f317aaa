"""bench/grpc_floor.py: the bound its floor sets on a serving report."""

from bench.grpc_floor import bound, to_markdown


def _phases(client_p50: float, in_process_p50: float) -> dict:
    return {
        "grpc_echo": {"p50_ms": 0.7, "p90_ms": 0.9, "p99_ms": 1.2},
        "dnc_serve_stub": {"p50_ms": 1.5, "p90_ms": 1.8, "p99_ms": 2.5},
        "dnc_serve_client": {"p50_ms": client_p50, "p90_ms": 2.0, "p99_ms": 2.8},
        "in_process": {"p50_ms": in_process_p50, "p90_ms": 0.7, "p99_ms": 0.9},
    }


def _serving_report(scann_in_process: float, brute_grpc: float) -> dict:
    return {
        "results": [
            {
                "items": 1000,
                "index": "brute-force",
                "in_process": {"p50_ms": 15.0},
                "sequential": {"p50_ms": brute_grpc},
            },
            {
                "items": 1000,
                "index": "scann",
                "in_process": {"p50_ms": scann_in_process},
                "sequential": {"p50_ms": 2.8},
            },
        ]
    }


def test_the_best_grpc_p50_adds_the_trivial_models_overhead():
    # overhead 1.8 - 0.5 = 1.3 ms; best 1.4 + 1.3 = 2.7; needed 17.5 / 10 = 1.75.
    (row,) = bound(_phases(1.8, 0.5), _serving_report(1.4, 17.5), 10.0)
    assert row["index"] == "scann"
    assert row["floor_overhead_ms"] == 1.3
    assert row["best_grpc_p50_ms"] == 2.7
    assert row["needed_grpc_p50_ms"] == 1.75
    assert row["reachable"] is False


def test_a_fast_enough_index_is_reachable():
    (row,) = bound(_phases(0.6, 0.5), _serving_report(0.2, 17.5), 10.0)
    assert row["best_grpc_p50_ms"] == 0.3
    assert row["reachable"] is True


def test_the_report_says_where_the_trivial_model_stands():
    report = {
        "date": "d",
        "machine": {"cpus": 2, "load_average_start": [1, 1, 1], "load_average_end": [1, 1, 1]},
        "settings": {"requests": 10, "history_length": 50, "ratio": 10.0},
        "results": {"phases": _phases(1.8, 0.5), "serving_report": "r.json"},
    }
    report["results"]["bound"] = bound(_phases(1.8, 0.5), _serving_report(1.4, 17.5), 10.0)
    text = to_markdown(report)
    assert "| `dnc_serve_client` | 1.800 |" in text
    assert "answers in 1.80 ms over gRPC (p50): above the 1.75 ms needed" in text
