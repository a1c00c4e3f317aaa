"""The run report: Markdown with matplotlib PNG plots, written for every full run.

``ROOT/reports/<run id>/report.md``: executions (cache hits), data statistics,
cluster sizes, training curves, Recall@M per variant and against the popularity
baseline, Recall vs alpha, per-cluster recall, diversity, the blessing and push.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from pipeline.dag import Pipeline
from pipeline.metadata import Metadata


def _load(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _plot(path: str, draw: Any, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    draw(ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return os.path.basename(path)


def _sections(run: Any, out: str) -> List[str]:
    from preprocessing import features

    results = run.results
    lines: List[str] = []
    stats = None
    if "Transform" in results:
        data_dir = results["Transform"].outputs["transformed_examples"].uri
        stats = _load(os.path.join(data_dir, features.STATS_FILE))
    if stats:
        eg = results.get("ExampleGen")
        quarantined = eg.outputs["quarantine"].properties.get("rows", 0) if eg else "?"
        lines += ["## Data", "", "| statistic | value |", "|---|---|"]
        for key in ("rows_read", "interactions", "users", "items", "clusters", "users_too_short"):
            lines.append(f"| {key} | {stats.get(key, '')} |")
        lines += [f"| quarantined rows (ExampleGen) | {quarantined} |", ""]
        sizes, names = stats.get("cluster_sizes", []), stats.get("cluster_names", [])
        png = _plot(
            os.path.join(out, "cluster_sizes.png"),
            lambda ax: ax.bar([str(n) for n in names], sizes),
            "items per cluster",
        )
        lines += ["## Cluster sizes", "", f"![cluster sizes]({png})", ""]
    histories: Dict[str, List[Dict[str, float]]] = {}
    for node, result in results.items():
        if node.startswith("Trainer."):
            info = _load(os.path.join(result.outputs["model"].uri, "model", "model.json"))
            histories[node.split(".", 1)[1]] = (info or {}).get("history", [])
    if histories:

        def curves(ax: Any) -> None:
            for variant, history in histories.items():
                keys = [k for k in (history[0] if history else {}) if k.startswith("val_recall")]
                ax.plot([h["loss"] for h in history], marker="o", label=f"{variant} loss")
                for k in keys[:1]:
                    ax.plot([h[k] for h in history], marker="x", label=f"{variant} {k}")
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)

        png = _plot(os.path.join(out, "training_curves.png"), curves, "training curves")
        lines += ["## Training curves", "", f"![training curves]({png})", ""]
    metrics = None
    if "Evaluator" in results:
        ev = results["Evaluator"].outputs["evaluation"].uri
        metrics = _load(os.path.join(ev, "metrics.json"))
    if metrics:
        lines += _evaluation(metrics, out)
    if "Pusher" in results:
        pushed = results["Pusher"].outputs["pushed_model"]
        state = f"version {pushed.properties.get('version')} at {pushed.uri}"
        lines += ["## Push", "", state if pushed.properties.get("pushed") else "not pushed", ""]
    return lines


def _evaluation(metrics: Dict[str, Any], out: str) -> List[str]:
    m = metrics["m"]
    key = f"recall@{m}"
    variants = metrics["variants"]
    rows = {name: v[key] for name, v in variants.items()}
    rows["popularity"] = metrics["popularity"][key]
    if metrics.get("baseline"):
        rows["pushed (baseline)"] = metrics["baseline"][key]
    lines = ["## Recall (validation split)", "", f"| model | {key} | clusters covered | entropy |"]
    lines.append("|---|---|---|---|")

    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else ""

    for name, value in rows.items():
        v = variants.get(name, {})
        covered, entropy = v.get(f"clusters_covered@{m}"), v.get(f"entropy@{m}")
        lines.append(f"| {name} | {value:.4f} | {cell(covered)} | {cell(entropy)} |")
    png = _plot(
        os.path.join(out, "recall.png"),
        lambda ax: ax.bar(list(rows), list(rows.values())),
        f"{key} per variant",
    )
    lines += ["", f"![recall]({png})", ""]

    def alpha_curves(ax: Any) -> None:
        for name, v in variants.items():
            sel = v.get("alpha_selection") or {}
            points = sorted(
                (float(k.split("[alpha=")[1].rstrip("]")), r)
                for k, r in sel.items()
                if "[alpha=" in k
            )
            if points:
                xs = [str(a) for a, _ in points]
                ax.plot(range(len(xs)), [r for _, r in points], marker="o", label=name)
                ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel("alpha")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    png = _plot(os.path.join(out, "recall_vs_alpha.png"), alpha_curves, f"{key} vs alpha")
    lines += ["## Recall vs alpha", "", f"![recall vs alpha]({png})", ""]

    def per_cluster(ax: Any) -> None:
        width = 0.8 / max(len(variants), 1)
        for i, (name, v) in enumerate(variants.items()):
            pc = v.get("per_cluster_recall", {})
            ax.bar([int(c) + i * width for c in pc], list(pc.values()), width, label=name)
        ax.set_xlabel("cluster of the held-out item")
        ax.legend(fontsize=7)

    png = _plot(os.path.join(out, "per_cluster_recall.png"), per_cluster, f"{key} per cluster")
    lines += ["## Per-cluster recall", "", f"![per-cluster recall]({png})", ""]

    def diversity(ax: Any) -> None:
        names = list(variants)
        ax.bar(names, [variants[n].get(f"entropy@{m}", 0.0) for n in names])
        ax.set_ylabel(f"cluster entropy@{m}")

    png = _plot(os.path.join(out, "diversity.png"), diversity, "diversity of the lists")
    lines += ["## Diversity", "", f"![diversity]({png})", ""]
    lines += _selection(metrics, key)
    lines += ["## Blessing", "", metrics["blessing"]["reason"], ""]
    return lines


def _selection(metrics: Dict[str, Any], key: str) -> List[str]:
    """The served variant: which was asked for, which was chosen, and a better one."""
    selection = metrics.get("selection")
    if not selection:
        return []
    lines = [
        "## Served variant",
        "",
        f"serving.variant `{selection['requested']}` -> `{selection['chosen']}` "
        f"({key} {selection['recalls'][selection['chosen']]:.4f}); best servable on "
        f"validation: `{selection['best']}` ({selection['recalls'][selection['best']]:.4f})",
        "",
    ]
    if selection.get("note"):
        lines += [f"**Note:** {selection['note']}", ""]
    return lines


def write_report(run: Any, pipeline: Pipeline, metadata: Metadata) -> str:
    """Writes the report of ``run``; returns the Markdown path."""
    out = os.path.join(os.path.abspath(pipeline.root), "reports", run.run_id)
    os.makedirs(out, exist_ok=True)
    lines = [f"# Pipeline {pipeline.name}, run {run.run_id}", "", "## Executions", ""]
    lines += ["| component | execution | cache |", "|---|---|---|"]
    for node, result in run.results.items():
        hit = "hit" if result.cached else "ran"
        lines.append(f"| {node} | {result.execution_id} | {hit} |")
    lines.append("")
    lines += _sections(run, out)
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
