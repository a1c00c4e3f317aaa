"""Benchmark: each variant tuned on validation with the same budget (issue 7).

Trains every setting of a grid (loss, training regime, negatives, intent encoder and
weight) for ``sasrec`` and ``dnc`` with the same epoch budget, selects per variant the
setting with the best validation Recall@M (the early-stopping monitor, on
``--eval-users`` validation users), and reports the test metrics of every setting and
of the selected ones (test numbers play no part in the choice). Writes ``OUT.json``
and ``OUT.md``.

    .venv/bin/python bench/tune.py --data runs/bench-synthetic --m 50,100 --epochs 15 \\
        --out bench/results/tune-synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Dict, List

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# isort: off
import dnc_env  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import quality  # noqa: E402
# isort: on

# Settings per variant: TrainConfig overrides. Every setting gets the same epochs.
DEFAULT_GRID: Dict[str, List[Dict[str, Any]]] = {
    "sasrec": [
        {"training": "all-positions", "loss": "bce", "num_negatives": 1},
        {"training": "all-positions", "loss": "sampled-softmax", "num_negatives": 64},
        {"training": "all-positions", "loss": "softmax"},
    ],
    "dnc": [
        {
            "training": "all-positions",
            "loss": "bce",
            "num_negatives": 1,
            "intent_encoder": "pooled-clusters",
            "intent_weight": 1.0,
        },
        {
            "training": "all-positions",
            "loss": "sampled-softmax",
            "num_negatives": 64,
            "intent_encoder": "pooled-clusters",
            "intent_weight": 1.0,
        },
        {"training": "all-positions", "loss": "softmax", "intent_weight": 1.0},
        {
            "training": "all-positions",
            "loss": "softmax",
            "intent_encoder": "pooled-clusters",
            "intent_weight": 1.0,
        },
    ],
}


def setting_name(variant: str, setting: Dict[str, Any]) -> str:
    """A short, unique, file-name-safe label of one setting."""
    parts = [variant] + [f"{k}={v}" for k, v in sorted(setting.items())]
    return ",".join(parts)


def best_validation(result: Dict[str, Any], m: int) -> float:
    """Best per-epoch validation Recall@m (what early stopping restored)."""
    return max(epoch[f"val_recall@{m}"] for epoch in result["history"])


def markdown(report: Dict[str, Any]) -> str:
    """Every setting with its validation score; the selected one per variant in bold."""
    m_values, monitor = report["settings"]["m"], report["monitor"]
    head = ["variant", "training", "loss", "N", "intent", "intent w", f"val R@{monitor}"]
    head += [f"R@{m}" for m in m_values] + [f"within R@{m_values[0]}", "intent top-1"]
    head += ["epochs", "samples/s", "minutes"]
    lines = [f"### {report['title']}", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for row in report["runs"]:
        s, r = row["setting"], row["result"]
        bold = "**" if row["selected"] else ""
        cells = [
            row["variant"],
            s.get("training", "prefix"),
            s.get("loss", "bce") + (f" ({s['softmax_scope']})" if "softmax_scope" in s else ""),
            "-" if s.get("loss") == "softmax" else str(s.get("num_negatives", 1)),
            s.get("intent_encoder", "pooled")
            + (f" (recency {s['intent_recency']})" if s.get("intent_recency") else ""),
            str(s.get("intent_weight", 0.1)),
            f"{bold}{row['validation']:.4f}{bold}",
        ]
        cells += [f"{bold}{r[f'recall@{m}']:.4f}{bold}" for m in m_values]
        cells += [f"{r[f'within_cluster_recall@{m_values[0]}']:.4f}"]
        cells += [f"{r['intent_top1']:.3f}" if r.get("intent_top1") is not None else "-"]
        cells += [
            str(r["epochs_run"]),
            f"{r['train_samples_per_second']:,.0f}",
            f"{r['train_seconds'] / 60:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Selected on validation (bold):"]
    for variant, name in report["selected"].items():
        lines.append(f"- `{variant}`: {name}")
    return "\n".join(lines) + "\n"


def load_runs(path: str, args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The runs of an earlier tune report, checked to share this run's data and budget."""
    with open(path, encoding="utf-8") as f:
        earlier = json.load(f)
    for key in ("epochs", "patience", "batch_size", "learning_rate", "max_len", "dim", "seed"):
        if earlier["settings"][key] != getattr(args, key):
            raise SystemExit(f"{path}: {key}={earlier['settings'][key]} != {getattr(args, key)}")
    if os.path.abspath(earlier["data"]["dir"]) != os.path.abspath(args.data):
        raise SystemExit(f"{path} was run on {earlier['data']['dir']}, not {args.data}")
    return earlier["runs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dnc preprocess --output")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--grid", help="JSON file {variant: [overrides, ...]} (default: built in)")
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        help="earlier tune JSON whose runs join the selection (same data and budget)",
    )
    parser.add_argument("--variants", default="sasrec,dnc")
    parser.add_argument("--m", default="20,50")
    parser.add_argument("--title", default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    quality.add_model_arguments(parser)
    args = parser.parse_args()
    args.m = tuple(int(m) for m in args.m.split(","))
    # Fields quality._config reads; the grid overrides them per setting.
    args.loss, args.training, args.num_negatives = "bce", "prefix", 1
    args.mixed_ratio, args.intent_weight, args.steps_per_epoch = 0.5, 0.1, None
    grid = DEFAULT_GRID
    if args.grid:
        with open(args.grid, encoding="utf-8") as f:
            grid = json.load(f)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in grid]
    if unknown:
        raise SystemExit(f"no grid for {unknown}; the grid has {sorted(grid)}")
    monitor = max(args.m)
    work = tempfile.mkdtemp(prefix="dnc-tune-")
    # Earlier runs join every selection; read (and checked) once, before any training.
    earlier = [run for path in args.include for run in load_runs(path, args)]
    runs: List[Dict[str, Any]] = []
    for variant in variants:
        for setting in grid[variant]:
            name = setting_name(variant, setting)
            print(f"=== {name}", flush=True)
            result = quality.run_variant(
                args, variant, work, name=name.replace("=", "-"), **setting
            )
            runs.append(
                {
                    "variant": variant,
                    "name": name,
                    "setting": setting,
                    "validation": best_validation(result, monitor),
                    "selected": False,
                    "result": result,
                }
            )
            summary = {k: v for k, v in result.items() if k != "history"}
            print(json.dumps({"validation": runs[-1]["validation"], **summary}), flush=True)
            # After every run, so that a run cut off later keeps what it finished.
            write_report(args, monitor, earlier + runs)
    write_report(args, monitor, earlier + runs, final=True)


def write_report(
    args: argparse.Namespace, monitor: int, runs: List[Dict[str, Any]], final: bool = False
) -> None:
    """Selects per variant on validation among ``runs`` and writes OUT.json/.md."""
    for run in runs:
        run["selected"] = False
    selected = {}
    for variant in sorted({r["variant"] for r in runs}, key=lambda v: v != "sasrec"):
        best = max((r for r in runs if r["variant"] == variant), key=lambda r: r["validation"])
        best["selected"] = True
        selected[variant] = best["name"]
    with open(os.path.join(args.data, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    report = {
        "benchmark": "tune",
        "complete": final,
        "title": args.title or f"{stats['source']}: each variant tuned on validation",
        "data": {"dir": args.data, **{k: stats[k] for k in ("source", "users", "items")}},
        "monitor": monitor,
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "grid": {v: [r["setting"] for r in runs if r["variant"] == v] for v in selected},
        "selected": selected,
        "runs": runs,
        **quality.run_metadata(),
    }
    quality.write_outputs(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
