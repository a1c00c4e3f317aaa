"""bench/defaults.py: the table names the machine's load, which moves its minutes 1.3x."""

from bench.defaults import markdown


def _report(**machine):
    conv = {"minutes": 14.69, "epochs_run": 28, "best_epoch": 25, "val_recall": 0.7695}
    return {
        "title": "default regimes",
        "throughput": {
            "targets_per_second": {"sasrec": 26406.0, "dnc": 31399.0},
            "ratio_dnc_over_sasrec": 1.189,
        },
        "convergence": {"dnc": conv},
        "machine": {"cpus": 2, **machine},
    }


def test_the_table_holds_both_rates_and_the_convergence():
    text = markdown(_report())
    assert "| `dnc` | 31,399 | 14.7 | 28 (25) | 0.7695 |" in text
    assert "| `sasrec` | 26,406 | - | - | - |" in text
    assert "dnc / sasrec throughput: 1.189" in text
    assert "Load average" not in text  # reports from before it was recorded


def test_the_load_average_is_reported_when_recorded():
    text = markdown(_report(load_average_start=[0.4, 0.3, 0.2], load_average_end=[2.1, 2.0, 1.9]))
    assert "Load average at the start [0.4, 0.3, 0.2], at the end [2.1, 2.0, 1.9]." in text
