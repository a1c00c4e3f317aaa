"""Where one request's time goes: the serving path split into its stages (issue 14).

The module is ``bench/serving.py``'s: the real ``RetrievalModule`` (vocabulary table, one
index per cluster with the plans ``dnc export`` chooses, per-cluster k, history exclusion,
quota merge) around the synthetic catalogue and the stand-in towers. Each stage runs as its
own ``tf.function`` on the outputs of the one before, in the order the serving graph runs
them, so every stage sees the inputs of a real request:

1. gRPC request: the client's ``PredictRequest`` serialised, parsed by the server and its
   history converted with ``tf.make_ndarray`` (what ``serving.grpc_service.predict`` does);
2. vocabulary lookup of the raw ids and right alignment (``model_ids``);
3. exclusion set: the history sorted and counted per cluster (per-cluster k);
4. user tower: the K-row batch of prompted user vectors;
5. intent head;
6. each cluster's index search, asked for its own k (ScaNN or brute force);
7. exclusion of history items from all clusters' candidates in one pass (stack, search
   the sorted exclusion set, mask, order);
8. quota merge and the output gather;
9. gRPC response: outputs to ``TensorProto``s, serialised and parsed by the client.

Rounds are interleaved (every stage once per request, then the next request), so the
stages share the machine's load. The whole ``serving_default`` call of the same module is
timed in the same rounds. Each separate stage pays one ``tf.function`` dispatch, which the
whole graph pays once: the empty-function row measures that overhead.

    .venv/bin/python bench/request_profile.py --size 1000000 --latent-dim 8 \\
        --out bench/results/serving-profile-1m

Writes OUT.json (figures, machine, versions, settings) and OUT.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # ahead of bench/: ``serving`` is the project's package

import numpy as np  # noqa: E402

import dnc_env  # noqa: E402,F401  (tf-keras before tensorflow)
from bench import serving as bench_serving  # noqa: E402
from bench import serving_catalogue  # noqa: E402
from bench.merge_latency import add_catalogue_args  # noqa: E402

INDEXES = ("scann", "brute-force")
WHOLE = "whole serving_default call"
EMPTY = "dispatch of an empty tf.function"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_catalogue_args(p)
    p.add_argument("--indexes", default=",".join(INDEXES), help="index kinds to profile")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "serving-profile-1m"))
    args = p.parse_args(argv)
    args.indexes = [k for k in args.indexes.split(",") if k]
    unknown = set(args.indexes) - set(INDEXES)
    if unknown or not args.indexes:
        p.error(f"--indexes must name some of {INDEXES}, got {args.indexes}")
    if args.size < args.clusters:
        p.error(f"--size {args.size} must be at least --clusters {args.clusters}")
    return args


class Stages:
    """The serving graph of one ``RetrievalModule`` cut into separately timed stages."""

    def __init__(self, module: Any) -> None:
        import tensorflow as tf

        from serving.retrieval_module import stack_lists
        from trainer.config import PAD_ID
        from trainer.quotas import compute_quotas_tf, merge_per_cluster_tf

        # Request histories vary in length: one trace per shape would be timed as a stage.
        compiled = functools.partial(tf.function, reduce_retracing=True)
        self.module = module
        self.k = module.num_clusters
        self.lookup = compiled(module._tower_history)
        self.blocked = compiled(
            lambda seen: (tf.sort(seen, axis=-1), module._blocked_per_cluster(seen))
        )
        self.tower = compiled(lambda tower: module._cluster_queries(tower, tf.shape(tower)[0]))
        self.intent = compiled(module._intent)
        self.search = [
            compiled(lambda q, k, index=index: module._search(index, q, k))
            for index in module.indexes
        ]
        self.exclude = compiled(lambda found, seen: module._drop_blocked(*stack_lists(found), seen))

        def merge(scores, ids, p, m, alpha):
            capacity = tf.reduce_sum(tf.cast(ids != PAD_ID, tf.int32), axis=-1)
            quotas = compute_quotas_tf(p, m, alpha, capacity)
            return module._finish(*merge_per_cluster_tf(scores, ids, quotas), m)

        self.merge = compiled(merge)
        self.empty = compiled(lambda x: x)

    def request(self, history: np.ndarray, timed: Callable[[str, Callable[[], Any]], Any]):
        """Runs one request through every stage; ``timed(name, fn)`` runs and times fn."""
        import tensorflow as tf

        module = self.module
        wire = timed("1 gRPC request: encode, parse, make_ndarray", lambda: _request(history))
        h = tf.constant(wire)
        tower, seen = timed("2 vocabulary lookup", lambda: self.lookup(h))
        seen, counts = timed(
            "3 exclusion set (sort, per-cluster counts)", lambda: self.blocked(seen)
        )
        users = timed("4 user tower (K-row batch)", lambda: self.tower(tower))
        p = timed("5 intent head", lambda: self.intent(tower))
        m = tf.constant(module.default_num_results, tf.int32)
        found = []
        for c in range(self.k):
            k = module._request_k(module.index_sizes[c], counts[:, c], m)
            found.append(
                timed(
                    f"6 index search, cluster {c}", lambda c=c, k=k: self.search[c](users[:, c], k)
                )
            )
        scores, ids = timed(
            "7 exclusion of history items (all clusters, one pass)",
            lambda: self.exclude(found, seen),
        )
        alpha = tf.constant(module.default_alpha, tf.float32)
        out = timed("8 quota merge + output gather", lambda: self.merge(scores, ids, p, m, alpha))
        timed("9 gRPC response: TensorProtos, encode, parse", lambda: _response(out))
        timed(EMPTY, lambda: self.empty(m))
        return out


def _request(history: np.ndarray) -> np.ndarray:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dnc"
    request.inputs["history"].CopyFrom(tf.make_tensor_proto(history))
    parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    return tf.make_ndarray(parsed.inputs["history"])


def _response(outputs: Dict[str, Any]) -> Dict[str, np.ndarray]:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    response = predict_pb2.PredictResponse()
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
    parsed = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    return {key: tf.make_ndarray(proto) for key, proto in parsed.outputs.items()}


def profile(args: argparse.Namespace, index: str, data: Dict[str, np.ndarray], work: str):
    """Per-stage and whole-request latency (ms) of one index kind."""
    import tensorflow as tf

    ids = serving_catalogue.item_ids(args.size)
    histories = serving_catalogue.synthetic_histories(
        data["item_cluster"], data["sizes"], args.requests, args.min_history,
        args.max_history_len, args.seed,
    )  # fmt: skip
    start = time.monotonic()
    plans = serving_catalogue.index_plans(data, index, args)
    module = serving_catalogue.build_module(data, ids, plans, work, args)
    build = time.monotonic() - start
    stages = Stages(module)
    samples: Dict[str, List[float]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        samples.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    whole = module.serving_default
    for i in range(args.warmup):
        h = histories[i % len(histories)]
        stages.request(h, timed)
        timed(WHOLE, lambda h=h: whole(tf.constant(h)))
    samples.clear()
    begin = time.monotonic()
    for i in range(args.requests):
        if time.monotonic() - begin > args.phase_seconds:
            break
        h = histories[i % len(histories)]
        staged = stages.request(h, timed)
        joined = timed(WHOLE, lambda h=h: whole(tf.constant(h)))
        if not np.array_equal(staged["item_ids"].numpy(), joined["item_ids"].numpy()):
            raise RuntimeError(f"request {i}: the staged path and serving_default disagree")
    return {"index": index, "build_seconds": round(build, 2), "stages": _summarize(samples)}


def _summarize(samples: Dict[str, List[float]]) -> List[Dict[str, Any]]:
    """One row of latency statistics (``bench.serving.summarize``) per stage."""
    return [
        {"stage": name, **bench_serving.summarize(values, 0.0)} for name, values in samples.items()
    ]


def _grouped(stages: List[Dict[str, Any]]) -> List[Tuple[str, float]]:
    """(stage, p50 ms) rows with the per-cluster searches summed into one row."""
    p50 = {r["stage"]: r["p50_ms"] for r in stages}
    search = sum(v for n, v in p50.items() if n.startswith("6 "))
    clusters = sum(1 for n in p50 if n.startswith("6 "))
    rows = [(n, v) for n, v in p50.items() if not n.startswith("6 ")]
    rows.append((f"6 index searches ({clusters} clusters)", search))
    return sorted(rows)


def markdown(report: Dict[str, Any]) -> str:
    """The report as Markdown: one table per index kind."""
    s = report["settings"]
    lines = [
        f"### One request, stage by stage: {s['size']:,} items, K={s['clusters']}, "
        f"d={s['dim']} (latent {s['latent_dim']}), M={s['num_results']}, in-process",
        "",
        "Median ms per stage; *net* subtracts one empty `tf.function` dispatch from each "
        "graph stage (2-8; the searches once per cluster), which the whole graph pays once.",
        "",
    ]
    for result in report["results"]:
        rows = dict(_grouped(result["stages"]))
        whole = rows.pop(WHOLE)
        empty = rows.pop(EMPTY)
        k = report["settings"]["clusters"]
        net = {}
        for name, value in rows.items():
            # 1, 9: Python; 6: one dispatch per cluster; the others: one dispatch.
            calls = 0 if name[0] in "19" else (k if name[0] == "6" else 1)
            net[name] = max(value - calls * empty, 0.0)
        total = sum(net.values())
        lines += [
            f"**{result['index']}** (index build {result['build_seconds']} s)",
            "",
            "| stage | p50 ms | net ms | share of the net |",
            "|---|---:|---:|---:|",
        ]
        for name, value in rows.items():
            share = net[name] / total if total else 0.0
            lines.append(f"| {name} | {value:.3f} | {net[name]:.3f} | {share:.0%} |")
        lines += [
            f"| sum of the stages | {sum(rows.values()):.3f} | {total:.3f} | 100% |",
            f"| whole `serving_default` call (one graph, no gRPC) | {whole:.3f} | | |",
            f"| an empty `tf.function` call | {empty:.3f} | | |",
            "",
        ]
    m = report["machine"]
    lines += [
        f"Load average {m['load_average_start']} at start, {m['load_average_end']} at the end; "
        f"{report['total_seconds']} s in all.",
        "",
    ]
    return "\n".join(lines)


def measure(args: argparse.Namespace, work: str) -> List[Dict[str, Any]]:
    """One profile per index kind, over the same catalogue."""
    data = serving_catalogue.synthetic_items(
        args.size, args.clusters, args.dim, args.noise, args.seed, args.latent_dim
    )
    results = []
    for index in args.indexes:
        print(f"[{args.size:,} items] {index}: building and profiling", flush=True)
        results.append(profile(args, index, data, work))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns the exit code."""
    return bench_serving.run_benchmark("request_profile", parse_args(argv), measure, markdown)


if __name__ == "__main__":
    sys.exit(main())
