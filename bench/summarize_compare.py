"""Summary of ``bench/compare.py`` reports across data sets (issue 11's results table).

For each data set: the setting of each variant selected on validation (the compare report's
``selected``), its test Recall@M, oracle-cluster (within-cluster) recall and intent top-1,
the relative gap of every variant to the selected ``sasrec`` with its size in standard
errors (each user's held-out item is a hit or not, so a recall over n users has the
binomial standard error sqrt(r (1 - r) / n)), and the strongest baseline
ever measured on that data (given per data set, since older figures live in other reports).
Writes ``OUT.json`` and ``OUT.md``.

    .venv/bin/python bench/summarize_compare.py --out bench/results/issue11-summary \\
        --report "Amazon Beauty=bench/results/compare-issue11-amazon-beauty.json" ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402  (run_metadata, write_outputs)


def _selected(report: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """variant -> its selected run."""
    return {r["variant"]: r for r in report["runs"] if r["selected"]}


def _label(run: Dict[str, Any]) -> str:
    return run["name"].split(",", 1)[1] if run["setting"] else "default regime"


def gap_in_standard_errors(r: float, base: float, users: int) -> float:
    """(r - base) over the standard error of the difference of two recalls measured on
    ``users`` users each, unpaired (the variants share the users, so this overstates the
    noise of the difference somewhat)."""
    if users <= 0:
        raise ValueError(f"users must be > 0, got {users}")
    se = math.sqrt((r * (1 - r) + base * (1 - base)) / users)
    return (r - base) / se if se > 0 else 0.0


def summarize(reports: Dict[str, Dict[str, Any]], strongest: Dict[str, str]) -> Dict[str, Any]:
    """The summary rows: one per (data set, variant), plus the gaps to sasrec."""
    rows: List[Dict[str, Any]] = []
    for data, report in reports.items():
        ms = report["settings"]["m"]
        chosen = _selected(report)
        base = chosen.get("sasrec")
        for variant, run in chosen.items():
            r = run["result"]
            row = {
                "data": data,
                "variant": variant,
                "setting": _label(run),
                "m": ms,
                "validation": run["result"].get("validation_recall"),
                "test": {str(m): r[f"recall@{m}"] for m in ms},
                "oracle_cluster": {str(m): r[f"within_cluster_recall@{m}"] for m in ms},
                "intent_top1": r.get("intent_top1"),
                "merge": r.get("merge") if r.get("merged") else "global",
                "grid_points": sum(1 for x in report["runs"] if x["variant"] == variant),
            }
            if base is not None and variant != "sasrec":
                row["vs_sasrec_percent"] = {
                    str(m): round(100 * (r[f"recall@{m}"] / base["result"][f"recall@{m}"] - 1), 1)
                    for m in ms
                }
                row["vs_sasrec_standard_errors"] = {
                    str(m): round(
                        gap_in_standard_errors(
                            r[f"recall@{m}"], base["result"][f"recall@{m}"], int(r["users"])
                        ),
                        1,
                    )
                    for m in ms
                }
                row["test_users"] = int(r["users"])
            rows.append(row)
    return {"rows": rows, "strongest_baseline": strongest}


def z_scores(row: Dict[str, Any], ms) -> List[float]:
    """The row's gaps to sasrec in standard errors, one per M."""
    return [row["vs_sasrec_standard_errors"][str(m)] for m in ms]


def _fmt(values: Any, ms) -> str:
    if not values:
        return "-"
    return " / ".join(f"{values[str(m)]:.4f}" for m in ms)


def markdown(summary: Dict[str, Any]) -> str:
    head = ["data", "variant", "winning setting", "val", "test", "oracle-cluster", "intent top-1"]
    head += ["vs sasrec", "gap in SE", "grid points"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        ms = row["m"]
        gap = row.get("vs_sasrec_percent")
        cells = [
            row["data"],
            f"`{row['variant']}`",
            row["setting"],
            _fmt(row["validation"], ms),
            _fmt(row["test"], ms),
            _fmt(row["oracle_cluster"], ms),
            "-" if row["intent_top1"] is None else f"{row['intent_top1']:.3f}",
            "-" if gap is None else " / ".join(f"{gap[str(m)]:+.1f}%" for m in ms),
            "-" if gap is None else " / ".join(f"{z:+.1f}" for z in z_scores(row, ms)),
            str(row["grid_points"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Recall pairs are R@20 / R@50 (R@50 / R@100 on the synthetic set)."]
    lines += [
        "*gap in SE*: the test gap to `sasrec` in standard errors of the difference "
        "(binomial, one held-out item per test user, unpaired: an upper bound of the noise); "
        "|gap| < 2 is within the noise of one test split.",
    ]
    lines += ["", "Strongest baseline ever measured on each data set:"]
    for data, text in summary["strongest_baseline"].items():
        lines.append(f"- {data}: {text}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument(
        "--report", action="append", required=True, help="NAME=compare report JSON (repeat)"
    )
    parser.add_argument(
        "--strongest", action="append", default=[], help="NAME=text of its strongest baseline"
    )
    args = parser.parse_args()
    reports, sources = {}, {}
    for spec in args.report:
        name, path = spec.split("=", 1)
        with open(path, encoding="utf-8") as f:
            reports[name] = json.load(f)
        sources[name] = path
    strongest = dict(spec.split("=", 1) for spec in args.strongest)
    summary = {"benchmark": "compare-summary", **summarize(reports, strongest)}
    summary["sources"] = sources
    summary.update(quality.run_metadata())
    quality.write_outputs(args.out, summary, markdown(summary))


if __name__ == "__main__":
    main()
