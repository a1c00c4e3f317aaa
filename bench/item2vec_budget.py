"""Benchmark: what cutting item2vec's epochs (``token_budget``) costs the clustering.

On a synthetic set with planted categories, at KuaiRand's density of about 190
training tokens per item but a smaller catalogue, trains the project's item2vec +
K-means (``preprocessing.clustering.fit_clusters``, all other settings at their
defaults) with 1, 2, 5 and 10 epochs, and reports each clustering's agreement with
the planted categories (adjusted Rand index, normalised mutual information), the
largest cluster's share of the items, and the time. One epoch is what the default
``token_budget`` gives a 20M-token corpus.

    .venv/bin/python bench/item2vec_budget.py [--users 5166 --items 21605 \\
        --mean-length 780 --clusters 15 --epochs 1,2,5,10] [--out PREFIX]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, List, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from preprocess import _machine, _versions, add_size_arguments, synthetic_config  # noqa: E402
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from preprocessing.clustering import fit_clusters  # noqa: E402
from preprocessing.config import ClusteringConfig, SyntheticConfig  # noqa: E402
from preprocessing.sources import synthetic  # noqa: E402


def _train_sequences(config: SyntheticConfig) -> Tuple[List[List[str]], Dict[str, str]]:
    """Every user's training items (all but the last two), as ``dnc preprocess`` splits."""
    world = synthetic.build_world(config)
    sequences = []
    for user in tqdm(range(config.num_users), desc="generate", unit="user"):
        items, _ = synthetic.generate_user_arrays(world, user)
        if len(items) >= 3:
            sequences.append(world.item_ids[items[:-2]].tolist())
    return sequences, synthetic.true_categories(world)


def _run(sequences, truth: Dict[str, str], epochs: int, clusters: int) -> Dict[str, Any]:
    config = ClusteringConfig(num_clusters=clusters, epochs=epochs, token_budget=0)
    items = sorted({item for seq in sequences for item in seq})
    start = time.monotonic()
    assignment = fit_clusters(sequences, items, {}, {}, config)
    seconds = time.monotonic() - start
    labels = [assignment.item_to_cluster[item] for item in items]
    planted = [truth[item] for item in items]
    return {
        "epochs": epochs,
        "seconds": round(seconds, 1),
        "ari": round(adjusted_rand_score(planted, labels), 4),
        "nmi": round(normalized_mutual_info_score(planted, labels), 4),
        "largest_cluster_share": round(max(assignment.sizes()) / len(items), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, users=5_166, items=21_605, categories=15, mean_length=780)
    parser.add_argument("--clusters", type=int, default=15)
    parser.add_argument("--epochs", default="1,2,5,10")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "item2vec-budget"))
    args = parser.parse_args()

    data = synthetic_config(args)
    sequences, truth = _train_sequences(data)
    tokens = sum(len(s) for s in sequences)
    runs = []
    for epochs in (int(e) for e in args.epochs.split(",")):
        runs.append(_run(sequences, truth, epochs, args.clusters))
        print(json.dumps(runs[-1]), flush=True)
    report = {
        "benchmark": "item2vec_budget",
        "data": {"synthetic": dataclasses.asdict(data), "train_tokens": tokens},
        "settings": vars(args),
        "runs": runs,
        "machine": _machine(),
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    lines = [
        f"# item2vec epochs against the planted categories ({tokens:,} training tokens, "
        f"{args.items:,} items, K = {args.clusters})",
        "",
        "| epochs | ARI | NMI | largest cluster | seconds |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['epochs']} | {r['ari']:.4f} | {r['nmi']:.4f} | {r['largest_cluster_share']:.1%} "
        f"| {r['seconds']:.1f} |"
        for r in runs
    ]
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
