"""bench/compare.py and bench/paired.py: the paired comparison of the selected runs."""

import argparse

import numpy as np
import pytest

from bench.compare import markdown, paired_against_sasrec
from bench.paired import _parse_pair
from bench.paired import compare as paired_rows
from trainer import significance


def _hits(tmp_path, name, values):
    path = str(tmp_path / f"{name}.npz")
    significance.write_hits(path, np.arange(len(values[20])), values, variant=name)
    return path


def _run(variant, selected, hits, recall20):
    result = {"hits": hits, "recall@20": recall20, "within_cluster_recall@20": 0.5}
    result.update(intent_top1=None, epochs_run=1, train_samples_per_second=1.0, train_seconds=60)
    return {"variant": variant, "name": variant, "setting": {}, "selected": selected,
            "validation": 0.1, "result": {**result, "validation_recall": {"20": 0.1}}}  # fmt: skip


def test_selected_variants_are_compared_with_the_selected_sasrec(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.2
    better = base | (rng.random(400) < 0.1)
    runs = [
        _run("sasrec", True, _hits(tmp_path, "sasrec", {20: base}), base.mean()),
        _run("dnc", True, _hits(tmp_path, "dnc", {20: better}), better.mean()),
        _run("dnc", False, _hits(tmp_path, "other", {20: base}), base.mean()),
        _run("sasrec-mixed", True, None, 0.2),  # an older report without hits
    ]
    paired = paired_against_sasrec(runs)
    assert list(paired) == ["dnc"]
    got = paired["dnc"]["20"]
    assert got["only_b"] == 0 and got["only_a"] == int((better & ~base).sum())
    assert got["relative"] == pytest.approx(better.mean() / base.mean() - 1)
    assert got["p_value"] < 1e-6 and got["ci_low"] > 0
    text = markdown({"title": "t", "settings": {"m": [20]}, "runs": runs, "paired": paired})
    assert "paired 95% interval" in text


def test_the_paired_report_reads_pairs_of_files(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.random(300) < 0.3, rng.random(300) < 0.3
    pa = _hits(tmp_path, "dnc", {20: a, 50: a | b})
    pb = _hits(tmp_path, "sasrec", {20: b, 50: b})
    rows = paired_rows([("set", [(pa, pb)])], confidence=0.9, n_resamples=200)
    assert [(r["data"], r["m"]) for r in rows] == [("set", 20), ("set", 50)]
    assert rows[0]["a"]["variant"] == "dnc" and rows[0]["confidence"] == 0.9
    assert rows[1]["only_b"] == 0


def test_pair_arguments_with_seeds():
    assert _parse_pair("x=a.npz,b.npz") == ("x", [("a.npz", "b.npz")])
    assert _parse_pair("x=a1+a2,b1+b2") == ("x", [("a1", "b1"), ("a2", "b2")])
    for bad in ("x", "x=a.npz", "x=a1+a2,b1", "x=a,"):
        with pytest.raises(argparse.ArgumentTypeError):
            _parse_pair(bad)
