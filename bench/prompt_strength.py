"""Analysis: what the output prompts of a trained ``dnc`` model do (issue 11).

With ``prompt_position=output`` the cluster-k user vector is ``h * t_k``. This script
reports, for one trained model:

1. the prompts' shape: per cluster the mean and the spread (std / mean) of ``t_k``; a
   small spread means the prompt is close to a scalar, an in-cluster inverse temperature
   that changes no ranking inside the cluster;
2. a prompt-strength sweep: ``t_k(w) = 1 + w (t_k - 1)`` for w in ``--strengths`` (w = 1
   is the trained model, w = 0 the unprompted tower), each evaluated exactly with the
   score merge, alpha selected on validation, and the test Recall@M and within-cluster
   recall;
3. the plain global ranking of the unprompted output ``h`` (no merge).

It changes nothing in the model. Writes ``OUT.json`` and ``OUT.md``::

    .venv/bin/python bench/prompt_strength.py --model runs/X/model --data runs/lastfm \\
        --out bench/results/prompt-strength-lastfm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import dnc_env  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

SCORE_ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0)


class SoftPromptScorer:
    """A ``trainer.evaluation.Scorer`` whose output prompts are scaled towards ones.

    Args:
        base: the trained model's ``ModelScorer``.
        prompts: ``[K + 1, d]`` trained Hadamard prompts (last row ones).
        strength: w; the prompt used is ``1 + w (t_k - 1)``.
    """

    def __init__(self, base: Any, prompts: np.ndarray, strength: float) -> None:
        self.base = base
        self.prompts = 1.0 + strength * (prompts - 1.0)
        self.num_tasks = base.num_tasks

    def item_embeddings(self) -> np.ndarray:
        return self.base.item_embeddings()

    def user_embeddings(self, history: np.ndarray, task: np.ndarray, users=None) -> np.ndarray:
        h = self.base.user_embeddings(history, np.full(len(task), self.num_tasks, np.int32))
        return h * self.prompts[task]

    def intent(self, history: np.ndarray) -> np.ndarray:
        return self.base.intent(history)


def analyse(args: argparse.Namespace) -> Dict[str, Any]:
    from preprocessing import features
    from trainer import data, evaluation, merge_selection
    from trainer.train import ModelScorer, load_model

    model, config = load_model(args.model, args.data)
    if getattr(model.user_tower, "late_prompt", False) is not True:
        raise ValueError(f"{args.model} does not gate the tower output (prompt_position=output)")
    items = data.load_items(args.data)
    base = ModelScorer(model)
    prompts = model.user_tower.prompts.numpy()
    trained = prompts[:-1].astype(np.float64)
    val = data.evaluation_data(args.data, features.VALIDATION, config.model.max_len)
    test = data.evaluation_data(args.data, features.TEST, config.model.max_len)

    def run(scorer, merged=True, alpha=None):
        kwargs = dict(m_values=(20, 50), merged=merged)
        if merged:
            kwargs.update(alpha=alpha, merge="score")
        splits = [
            evaluation.evaluate(
                scorer, s.histories, s.targets, s.exclude, items.item_cluster, **kwargs
            )
            for s in (val, test)
        ]
        return {
            "val_recall@50": round(splits[0].recall[50], 4),
            "test_recall@20": round(splits[1].recall[20], 4),
            "test_recall@50": round(splits[1].recall[50], 4),
            "test_within_cluster_recall@50": round(splits[1].within_cluster_recall[50], 4),
        }

    sweep = {}
    for w in args.strengths:
        scorer = SoftPromptScorer(base, prompts, w)
        sel = merge_selection.select_merge(
            scorer, val.histories, val.targets, val.exclude, items.item_cluster,
            grids={"score": SCORE_ALPHAS}, m=50,
        )  # fmt: skip
        sweep[str(w)] = {"alpha": sel.alpha, **run(scorer, alpha=sel.alpha)}
        print(f"strength {w}: {sweep[str(w)]}", flush=True)
    return {
        "benchmark": "prompt_strength",
        "model": os.path.abspath(args.model),
        "data": os.path.abspath(args.data),
        "variant": config.variant,
        "intent_encoder": config.intent_encoder,
        "prompts": {
            "mean": np.round(trained.mean(axis=1), 3).tolist(),
            "relative_spread": np.round(
                trained.std(axis=1) / np.abs(trained.mean(axis=1)), 3
            ).tolist(),
        },
        "sweep": sweep,
        "unprompted_global_ranking": run(base, merged=False),
    }


def markdown(report: Dict[str, Any]) -> str:
    p = report["prompts"]
    lines = [
        f"### Output prompts of `{report['variant']}` ({report['intent_encoder']} intent), "
        f"{os.path.basename(report['data'])}",
        "",
        f"Prompt mean per cluster: {p['mean']}; relative spread (std / mean): "
        f"{p['relative_spread']}.",
        "",
        "| prompt strength w | alpha (val) | val R@50 | test R@20 | test R@50 "
        "| within-cluster R@50 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for w, r in report["sweep"].items():
        lines.append(
            f"| {w} | {r['alpha']} | {r['val_recall@50']:.4f} | {r['test_recall@20']:.4f} "
            f"| {r['test_recall@50']:.4f} | {r['test_within_cluster_recall@50']:.4f} |"
        )
    g = report["unprompted_global_ranking"]
    lines.append(
        f"| unprompted h, global top-M | - | {g['val_recall@50']:.4f} | {g['test_recall@20']:.4f} "
        f"| {g['test_recall@50']:.4f} | {g['test_within_cluster_recall@50']:.4f} |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="dnc train --output (or its model/)")
    parser.add_argument("--data", required=True, help="the preprocessing output it was trained on")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument(
        "--strengths", default="0,0.5,1", type=lambda s: [float(x) for x in s.split(",")]
    )
    args = parser.parse_args()
    report = analyse(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
