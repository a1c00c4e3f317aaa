"""Benchmark: dnc against the strongest SASRec baselines, each tuned on validation (issue 11).

Every variant starts from its default regime (``trainer.config.make_train_config``:
what ``dnc train --variant V`` does with no flags) and gets the same grid budget: the
same number of settings (overrides of that regime) and the same epochs. Per variant the
setting with the best validation recall (the mean of Recall@M over ``--m``, on the whole
validation split, with the merge, alpha and prompt weight that ``dnc evaluate`` selects
there) is selected; test numbers play no part in the choice. Test metrics are reported with
the merge and alpha that ``dnc evaluate`` selects on validation, plus the within-cluster (oracle-
intent) recall, intent top-1 and training throughput. Writes ``OUT.json`` and ``OUT.md``
after every run, so an interrupted run keeps what it finished; ``--include`` merges an
earlier report on the same data into the selection.

    .venv/bin/python bench/compare.py --data runs/amazon-beauty \\
        --grid bench/grids/compare.json --out bench/results/compare-beauty
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# isort: off
import dnc_env  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import quality  # noqa: E402
# isort: on

DEFAULT_GRID: Dict[str, List[Dict[str, Any]]] = {
    "sasrec": [{}],
    "sasrec-mixed": [{}],
    "dnc": [{}],
    "mind": [{}],
    "comirec-sa": [{}],
}


def setting_name(variant: str, setting: Dict[str, Any]) -> str:
    """A short, unique label of one setting (the bare variant name for its default regime)."""
    flat = {**{k: v for k, v in setting.items() if k != "model"}, **setting.get("model", {})}
    return ",".join([variant] + [f"{k}={v}" for k, v in sorted(flat.items())])


def run_setting(args: argparse.Namespace, variant: str, setting: Dict[str, Any]) -> Dict:
    """Trains one setting and evaluates it on test (merge and alpha chosen on validation)."""
    from trainer.alpha import alpha_from_json
    from trainer.config import make_train_config
    from trainer.evaluate_model import evaluate_model
    from trainer.train import train

    name = setting_name(variant, setting).replace("=", "-").replace(",", "_")
    output = os.path.join(args.work, os.path.basename(args.data), name)
    overrides = {k: v for k, v in setting.items() if k != "model"}
    if args.epochs is not None:
        overrides.setdefault("epochs", args.epochs)
    config = make_train_config(
        args.data, output, variant, model_overrides=setting.get("model"), **overrides
    )
    start = time.monotonic()
    result = train(config, verbose=2)
    train_seconds = time.monotonic() - start
    start = time.monotonic()
    hits = os.path.join(output, "test-hits.npz")  # for the paired comparison
    report = evaluate_model(output, args.data, m_values=args.m, progress=False, hits_path=hits)
    report.pop("table")
    # The deployed setting (merge, alpha and prompt weight selected on validation) scored
    # on the whole validation split: what the grid selects on.
    chosen = evaluate_model(
        output,
        args.data,
        m_values=args.m,
        split="validation",
        progress=False,
        merge=report.get("merge"),
        alpha=alpha_from_json(report["alpha"]),
        prompt_weight=report.get("prompt_weight"),
    )
    rates = [epoch["samples_per_second"] for epoch in result.history]
    return {
        **report,
        "config": dataclasses.asdict(config),
        "validation_recall": {str(m): chosen[f"recall@{m}"] for m in args.m},
        "validation": sum(chosen[f"recall@{m}"] for m in args.m) / len(args.m),
        "hits": hits,
        "history": [{k: e[k] for k in e if k.startswith("val_")} for e in result.history],
        "epochs_run": len(result.history),
        "train_seconds": round(train_seconds, 1),
        "evaluate_seconds": round(time.monotonic() - start, 1),
        "train_samples_per_second": round(sorted(rates)[len(rates) // 2], 1),
    }


def select(runs: List[Dict[str, Any]]) -> Dict[str, str]:
    """Per variant, the run with the best validation score (first on ties)."""
    for run in runs:
        run["selected"] = False
    chosen = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        best = max((r for r in runs if r["variant"] == variant), key=lambda r: r["validation"])
        best["selected"] = True
        chosen[variant] = best["name"]
    return chosen


def _fmt(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _validation_cells(run: Dict[str, Any], ms) -> str:
    recall = run["result"].get("validation_recall")
    if recall is None:  # reports written before the whole-split validation pass
        return _fmt(run["validation"])
    return " / ".join(_fmt(recall[str(m)]) for m in ms)


def _merge_cell(r: Dict[str, Any]) -> str:
    if not r.get("merged"):
        return "global"
    return f"{r.get('merge', '-')}, alpha {r['alpha']}, w {r.get('prompt_weight', 1.0)}"


def paired_against_sasrec(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Each selected variant against the selected ``sasrec``, user by user on test
    (``trainer.significance``): variant -> M -> the comparison. Runs without a hits file
    (reports of older code) are left out."""
    from trainer import significance

    best = {r["variant"]: r["result"] for r in runs if r["selected"]}
    base = best.get("sasrec", {}).get("hits")
    out: Dict[str, Dict[str, Any]] = {}
    for variant, result in best.items():
        path = result.get("hits")
        if variant == "sasrec" or not base or not path:
            continue
        if os.path.exists(path) and os.path.exists(base):
            found = significance.compare_files(path, base)
            out[variant] = {str(m): c.to_json() for m, c in found.items()}
    return out


def markdown(report: Dict[str, Any]) -> str:
    """Selected settings first (with the relative gap to the best sasrec), then every run."""
    ms = report["settings"]["m"]
    recall = " / ".join(f"R@{m}" for m in ms)
    head = ["variant", "setting", f"val {recall}"] + [f"R@{m}" for m in ms]
    head += [f"oracle-cluster {recall}", "intent top-1", "merge"]
    head += ["epochs", "targets/s", "train min"]
    lines = [f"### {report['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    runs = sorted(report["runs"], key=lambda r: not r["selected"])
    for run in runs:
        r = run["result"]
        bold = "**" if run["selected"] else ""
        label = run["name"].split(",", 1)[1] if run["setting"] else "default regime"
        cells = [f"{bold}{run['variant']}{bold}", label, _validation_cells(run, ms)]
        cells += [f"{bold}{_fmt(r[f'recall@{m}'])}{bold}" for m in ms]
        cells += [" / ".join(_fmt(r[f"within_cluster_recall@{m}"]) for m in ms)]
        cells += [_fmt(r.get("intent_top1"), 3), _merge_cell(r)]
        cells += [str(r["epochs_run"]), f"{r['train_samples_per_second']:,.0f}"]
        cells += [f"{r['train_seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    best = {r["variant"]: r["result"] for r in report["runs"] if r["selected"]}
    if "sasrec" in best:
        for other in [v for v in best if v != "sasrec"]:
            lines += ["", f"{other} vs the selected sasrec (relative, test):"]
            for m in ms:
                ours, base = best[other][f"recall@{m}"], best["sasrec"][f"recall@{m}"]
                line = f"- R@{m}: {ours:.4f} vs {base:.4f} ({100 * (ours / base - 1):+.1f}%)"
                paired = report.get("paired", {}).get(other, {}).get(str(m))
                if paired:
                    line += (
                        f"; paired 95% interval [{paired['ci_low']:+.1%}, "
                        f"{paired['ci_high']:+.1%}], McNemar p {paired['p_value']:.2g}"
                    )
                lines.append(line)
    if report.get("strongest_baseline"):
        strongest = report["strongest_baseline"]
        lines += ["", f"Strongest baseline ever measured on this data: {strongest}"]
    return "\n".join(lines) + "\n"


def write_report(args: argparse.Namespace, runs: List[Dict[str, Any]], final: bool) -> None:
    with open(os.path.join(args.data, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    selected = select(runs)
    report = {
        "benchmark": "compare",
        "complete": final,
        "title": args.title or f"{os.path.basename(args.data)}: tuned on validation",
        "data": {"dir": args.data, **{k: stats.get(k) for k in ("source", "users", "items")}},
        "cluster_sizes": stats.get("cluster_sizes"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "selected": selected,
        "strongest_baseline": args.strongest_baseline,
        "runs": runs,
        "paired": paired_against_sasrec(runs) if final else {},
        **quality.run_metadata(),
    }
    quality.write_outputs(args.out, report, markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dnc preprocess --output")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--grid", help="JSON {variant: [overrides, ...]} (default: each regime)")
    parser.add_argument("--variants", default="sasrec,sasrec-mixed,dnc")
    parser.add_argument("--include", action="append", default=[], help="earlier report JSON")
    parser.add_argument("--m", default="20,50")
    parser.add_argument(
        "--epochs", type=int, default=None, help="maximum epochs (default: the regime's)"
    )
    parser.add_argument("--title", default=None)
    parser.add_argument("--strongest-baseline", default=None, help="text for the table")
    parser.add_argument("--work", default="runs/compare", help="model directories")
    args = parser.parse_args()
    args.m = tuple(int(m) for m in args.m.split(","))
    grid = DEFAULT_GRID
    if args.grid:
        with open(args.grid, encoding="utf-8") as f:
            grid = json.load(f)
    variants = [v for v in args.variants.split(",") if v]
    sizes = {len(grid.get(v, [])) for v in variants}
    if len(sizes) != 1 or 0 in sizes:
        raise SystemExit(f"every variant needs the same number of settings, got {sizes}")
    runs: List[Dict[str, Any]] = []
    for path in args.include:
        with open(path, encoding="utf-8") as f:
            runs += json.load(f)["runs"]
    done = {r["name"] for r in runs}
    for variant in variants:
        for setting in grid[variant]:
            name = setting_name(variant, setting)
            if name in done:
                continue
            print(f"=== {name}", flush=True)
            result = run_setting(args, variant, setting)
            run = {"variant": variant, "name": name, "setting": setting, "result": result}
            runs.append({**run, "validation": result["validation"], "selected": False})
            write_report(args, runs, final=False)
    write_report(args, runs, final=True)


if __name__ == "__main__":
    main()
