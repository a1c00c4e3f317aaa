"""Benchmark report of models trained and evaluated with the plain commands.

For runs made with ``dnc train`` and ``dnc evaluate --json`` (rather than a benchmark
driver), this collects each run's test figures, its validation selection and its training
log (epochs, best epoch, monitor recall, median targets/s from ``model.json``) into one
JSON + Markdown table, with the machine and library versions.

    .venv/bin/python bench/report_runs.py --title "Amazon Beauty, default regimes" \\
        --run dnc=runs/i11/beauty-dnc:runs/i11/beauty-dnc-eval.json \\
        --run sasrec=runs/i11/beauty-sasrec:runs/i11/beauty-sasrec-eval.json \\
        --out bench/results/runs-beauty

``--include`` starts from an earlier report's rows (their figures as recorded: the model
directories may be gone); ``--rename 'OLD=>NEW'`` relabels one of them in place, and a
``--run`` of the same name replaces it in place (new names are appended).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402


def _training(model_dir: str) -> Dict[str, Any]:
    with open(os.path.join(model_dir, "model", "model.json"), encoding="utf-8") as f:
        raw = json.load(f)
    history, config = raw["history"], raw["config"]
    # Models trained before the mean-recall monitor logged only val_recall@M.
    monitor = "val_recall" if "val_recall" in history[0] else f"val_recall@{config['eval_m'][0]}"
    best = max(range(len(history)), key=lambda i: history[i].get(monitor, -1.0))
    rates = sorted(e["samples_per_second"] for e in history)
    return {
        "config": config,
        "epochs_run": len(history),
        "best_epoch": best + 1,
        "validation": {k: v for k, v in history[best].items() if k.startswith("val_")},
        "median_targets_per_second": rates[len(rates) // 2],
    }


def collect(specs: List[str]) -> Dict[str, Any]:
    """name=MODEL_DIR:EVAL_JSON specs -> name -> {training, test}."""
    runs = {}
    for spec in specs:
        name, _, paths = spec.rpartition("=")
        model_dir, _, eval_json = paths.partition(":")
        if not (name and model_dir and eval_json):
            raise ValueError(f"--run must be NAME=MODEL_DIR:EVAL_JSON, got {spec!r}")
        with open(eval_json, encoding="utf-8") as f:
            test = json.load(f)
        test.pop("table", None)
        runs[name] = {"training": _training(model_dir), "test": test}
    return runs


def merge_runs(
    included: Dict[str, Any], renames: List[str], fresh: Dict[str, Any]
) -> Dict[str, Any]:
    """Earlier rows, relabelled by ``OLD=>NEW`` renames, then updated by ``fresh`` in place."""
    runs = dict(included)
    for spec in renames:
        old, sep, new = spec.partition("=>")
        if not (sep and old and new):
            raise ValueError(f"--rename must be 'OLD=>NEW', got {spec!r}")
        if old not in runs:
            raise ValueError(f"--rename: no included run named {old!r}; have {sorted(runs)}")
        runs = {(new if k == old else k): v for k, v in runs.items()}
    runs.update(fresh)
    return runs


def markdown(title: str, runs: Dict[str, Any], m: Tuple[int, int] = (20, 50)) -> str:
    """The runs' table at the list sizes ``m`` (small, large)."""
    a, b = m
    lines = [f"### {title}", ""]
    lines.append(
        f"| run | epochs (best) | val R@{a} / R@{b} (monitor) | test R@{a} | test R@{b} | "
        f"oracle-cluster R@{a} / R@{b} | intent top-1 | merge, alpha, w | targets/s |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, run in runs.items():
        t, v = run["test"], run["training"]["validation"]
        intent = t.get("intent_top1")
        lines.append(
            f"| {name} | {run['training']['epochs_run']} ({run['training']['best_epoch']}) | "
            f"{v.get(f'val_recall@{a}', 0):.4f} / {v.get(f'val_recall@{b}', 0):.4f} | "
            f"{t[f'recall@{a}']:.4f} | {t[f'recall@{b}']:.4f} | "
            f"{t[f'within_cluster_recall@{a}']:.4f} / {t[f'within_cluster_recall@{b}']:.4f} | "
            f"{'-' if intent is None else f'{intent:.3f}'} | "
            f"{t['merge']}, {t['alpha']}, {t.get('prompt_weight', 1.0)} | "
            f"{run['training']['median_targets_per_second']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="NAME=MODEL_DIR:EVAL_JSON")
    parser.add_argument("--include", action="append", default=[], help="earlier report JSON")
    parser.add_argument("--rename", action="append", default=[], help="'OLD=>NEW' row label")
    parser.add_argument("--title", required=True)
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--m", default="20,50", help="the two list sizes of the table")
    args = parser.parse_args()
    small, large = (int(x) for x in args.m.split(","))
    included: Dict[str, Any] = {}
    for path in args.include:
        with open(path, encoding="utf-8") as f:
            included.update(json.load(f)["runs"])
    runs = merge_runs(included, args.rename, collect(args.run))
    if not runs:
        raise SystemExit("nothing to report: give --run or --include")
    report = {"benchmark": "runs", "title": args.title, "runs": runs, **quality.run_metadata()}
    quality.write_outputs(args.out, report, markdown(args.title, runs, (small, large)))


if __name__ == "__main__":
    main()
