"""Benchmark report: paired significance of model A against model B on each data set.

Each pair is two ``dnc evaluate --hits`` files of the same data directory and split (one
held-out item per user, so each model's recall is a mean of per-user hits). For every list
size M the report gives both recalls, the relative difference A / B - 1 with its paired
bootstrap confidence interval, the discordant users, McNemar's exact p-value, and whether
issue 11's +5% target lies inside the interval (``trainer.significance``).

    .venv/bin/dnc evaluate --data D --model MODEL_A --hits runs/a.npz
    .venv/bin/dnc evaluate --data D --model MODEL_B --hits runs/b.npz
    .venv/bin/python bench/paired.py --pair "Amazon Beauty=runs/a.npz,runs/b.npz" \\
        --out bench/results/paired-issue11
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402  (run_metadata, write_outputs)

TARGET = 0.05  # issue 11: dnc at least 5% (relative) above the strongest sasrec


def _parse_pair(text: str) -> tuple:
    """``NAME=A.npz,B.npz``, or with one file per training seed ``NAME=A1+A2,B1+B2``."""
    name, sep, files = text.partition("=")
    sides = [side.split("+") for side in files.split(",")]
    if not sep or len(sides) != 2 or len(sides[0]) != len(sides[1]) or not all(sum(sides, [])):
        raise argparse.ArgumentTypeError(
            f"--pair wants NAME=A.npz,B.npz or NAME=A1+A2,B1+B2, got {text!r}"
        )
    return name, list(zip(*sides, strict=True))


def compare(pairs: List[tuple], confidence: float, n_resamples: int) -> List[Dict[str, Any]]:
    """One row per (data set, M)."""
    from trainer import significance

    rows = []
    for name, files in pairs:
        meta_a = significance.read_hits(files[0][0]).meta
        meta_b = significance.read_hits(files[0][1]).meta
        found = significance.compare_seeds(files, confidence=confidence, n_resamples=n_resamples)
        for m, c in found.items():
            rows.append(
                {
                    "data": name,
                    "m": m,
                    "a": {"files": [a for a, _ in files], **meta_a},
                    "b": {"files": [b for _, b in files], **meta_b},
                    **c.to_json(),
                    "target_in_interval": c.ci_low <= TARGET <= c.ci_high,
                }
            )
    return rows


def _p(p_value: Any) -> str:
    return "-" if p_value is None else f"{p_value:.2g}"


def markdown(rows: List[Dict[str, Any]], confidence: float) -> str:
    level = f"{confidence:.0%}"
    lines = [
        f"| data | M | users | seeds | A | B | recall A | recall B | A / B - 1 | "
        f"{level} interval | only A / only B | McNemar p | +5% in interval |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['m']} | {r['users']:,} | {r['seeds']} | "
            f"`{r['a'].get('variant', '?')}` | "
            f"`{r['b'].get('variant', '?')}` | {r['recall_a']:.4f} | {r['recall_b']:.4f} | "
            f"{r['relative']:+.1%} | [{r['ci_low']:+.1%}, {r['ci_high']:+.1%}] | "
            f"{r['only_a']} / {r['only_b']} | {_p(r['p_value'])} | "
            f"{'yes' if r['target_in_interval'] else 'no'} |"
        )
    lines += [
        "",
        "A / B - 1 is the relative recall difference (of the recalls averaged over the seeds); "
        "the interval is a paired percentile bootstrap over users (with several seeds, each "
        "user resampled with all its seeds); McNemar's exact test uses the users only one "
        "model hits (one seed only; '-' when pooled).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pair",
        action="append",
        type=_parse_pair,
        required=True,
        help="NAME=A.npz,B.npz (or NAME=A1+A2,B1+B2: one file per training seed)",
    )
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--resamples", type=int, default=10_000)
    args = parser.parse_args()
    rows = compare(args.pair, args.confidence, args.resamples)
    report = {
        "benchmark": "paired",
        "settings": {"confidence": args.confidence, "resamples": args.resamples},
        "target": TARGET,
        "rows": rows,
        **quality.run_metadata(),
    }
    quality.write_outputs(args.out, report, markdown(rows, args.confidence))
    print(markdown(rows, args.confidence))


if __name__ == "__main__":
    main()
