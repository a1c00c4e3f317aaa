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
4. user tower: the prompted user vector of every cluster; for models whose clusters share
   one tower pass (output prompts, no prompts) split into 4a, the pass, and 4b, the
   prompts applied to it;
5. intent head (reading the shared pass where there is one);
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

With ``--model DIR --data DIR`` the module is a trained model's, built as ``dnc export``
builds it (quota merge at ``--alpha``), and the requests are test users' histories:

    .venv/bin/python bench/request_profile.py --model runs/kr20m-dnc --data runs/kr20m \\
        --alpha 2 --num-results 500 --max-num-results 1000 --out bench/results/X

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
    p.add_argument(
        "--model",
        help="profile this trained model (dnc train --output) instead of the synthetic "
        "catalogue's stand-in towers; its module is built as `dnc export --merge quota "
        "--alpha ALPHA --num-results M --max-num-results ... --max-history ...` builds it, "
        "and the requests are test users' histories of --data",
    )
    p.add_argument("--data", help="with --model: the preprocessing output it was trained on")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "serving-profile-1m"))
    args = p.parse_args(argv)
    if (args.model is None) != (args.data is None):
        p.error("--model and --data go together")
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

        # Request histories vary in length: one trace per shape would be timed as a stage.
        compiled = functools.partial(tf.function, reduce_retracing=True)
        self.module = module
        self.k = module.num_clusters
        self.lookup = compiled(module._tower_history)
        if module.merge != "quota" or not module.per_cluster_k:
            raise ValueError(
                f"the stages are the quota merge's with per-cluster k, not merge={module.merge!r}"
                f" with per_cluster_k={module.per_cluster_k}"
            )
        self.blocked = compiled(lambda seen: tf.sort(seen, axis=-1))
        model = module.model
        shares = getattr(model, "shares_tower_pass", False)
        self.shared = compiled(model.unprompted_embedding) if shares else None
        self.tower = compiled(module._cluster_queries)
        self.intent = compiled(module._intent)
        self.quotas = compiled(
            lambda p, seen, m, alpha: module._first_quotas(p, seen, m, alpha, None)
        )
        self.search = [
            compiled(lambda q, k, index=index: module._search_if_asked(index, q, k))
            for index in module.indexes
        ]
        self.exclude = compiled(lambda found, seen: module._drop_blocked(*stack_lists(found), seen))

        def merge(scores, ids, p, free, quotas, m, alpha):
            merged = module._merge_quotas(scores, ids, p, free, quotas, m, alpha)
            return module._finish(*merged, m)

        self.merge = compiled(merge)
        self.empty = compiled(lambda x: x)
        self.searched: List[int] = []  # clusters searched per request

    def request(self, history: np.ndarray, timed: Callable[[str, Callable[[], Any]], Any]):
        """Runs one request through every stage; ``timed(name, fn)`` runs and times fn."""
        import tensorflow as tf

        module = self.module
        wire = timed("1 gRPC request: encode, parse, make_ndarray", lambda: _request(history))
        h = tf.constant(wire)
        tower, seen = timed("2 vocabulary lookup", lambda: self.lookup(h))
        seen = timed("3 exclusion set (sort)", lambda: self.blocked(seen))
        shared = None
        if self.shared is not None:
            shared = timed("4a user tower: the one shared pass", lambda: self.shared(tower))
            users = timed("4b cluster queries (prompts on the pass)",
                          lambda: self.tower(tower, shared))  # fmt: skip
        else:
            users = timed("4 user tower (K-row batch)", lambda: self.tower(tower, None))
        p = timed("5 intent head", lambda: self.intent(tower, shared))
        m = tf.constant(module.default_num_results, tf.int32)
        alpha = tf.constant(module.default_alpha, tf.float32)
        p, free, quotas, k = timed(
            "5b quotas and each cluster's k (before the search)",
            lambda: self.quotas(p, seen, m, alpha),
        )
        found = []
        for c in range(self.k):
            found.append(
                timed(
                    f"6 index search, cluster {c}",
                    lambda c=c: self.search[c](users[:, c], k[c]),
                )
            )
        scores, ids = timed(
            "7 exclusion of history items (all clusters, one pass)",
            lambda: self.exclude(found, seen),
        )
        out = timed(
            "8 quota merge + output gather",
            lambda: self.merge(scores, ids, p, free, quotas, m, alpha),
        )
        self.searched.append(int(tf.math.count_nonzero(k)))
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


def synthetic_module(
    args: argparse.Namespace, index: str, data: Dict[str, np.ndarray], work: str
) -> Tuple[Any, List[np.ndarray]]:
    """``bench/serving.py``'s module over the synthetic catalogue, and its requests."""
    ids = serving_catalogue.item_ids(args.size)
    histories = serving_catalogue.synthetic_histories(
        data["item_cluster"], data["sizes"], args.requests, args.min_history,
        args.max_history_len, args.seed,
    )  # fmt: skip
    plans = serving_catalogue.index_plans(data, index, args)
    return serving_catalogue.build_module(data, ids, plans, work, args), histories


def trained_module(args: argparse.Namespace, index: str, work: str) -> Tuple[Any, List[np.ndarray]]:
    """The module ``dnc export`` builds for ``args.model`` (quota merge), and test users'
    histories of ``args.data`` as requests."""
    from bench.serving_trained import test_histories
    from serving.export import ExportConfig, build_module

    cfg = ExportConfig(
        model_dir=args.model,
        data_dir=args.data,
        output=os.path.join(work, "unused"),
        index=index,
        max_num_results=args.max_num_results,
        default_num_results=args.num_results,
        alpha=args.alpha,
        merge="quota",
        max_history=args.max_history,
        scann_min_size=args.scann_min_size,
        leaves_fraction=args.leaves_fraction,
    )
    module, _ = build_module(cfg)
    return module, test_histories(args.data, args.requests, args.max_history, args.seed)


def profile(args: argparse.Namespace, index: str, data: Optional[Dict[str, np.ndarray]], work: str):
    """Per-stage and whole-request latency (ms) of one index kind."""
    import tensorflow as tf

    start = time.monotonic()
    if data is None:
        module, histories = trained_module(args, index, work)
    else:
        module, histories = synthetic_module(args, index, data, work)
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
        if not _same_lists(staged, joined):
            raise RuntimeError(f"request {i}: the staged path and serving_default disagree")
    searched = stages.searched[args.warmup :]
    return {
        "index": index,
        "build_seconds": round(build, 2),
        "clusters_searched_mean": round(float(np.mean(searched)), 2) if searched else None,
        "stages": _summarize(samples),
    }


def _same_lists(staged: Dict[str, Any], joined: Dict[str, Any]) -> bool:
    """Nearly the same lists: each stage is compiled on its own, so a query can differ
    from the whole graph's in the last bits (seen on the trained KuaiRand-size model),
    and items whose scores differ by that much may swap places or, at a quota's cut,
    one may take the other's slot. The sorted scores must agree to 1e-4 and 99% of the
    items must be the same; the exact equality of the serving paths is tested in
    ``tests/integration/test_per_cluster_k.py``."""
    a, b = staged["item_ids"].numpy(), joined["item_ids"].numpy()
    shared = sum(len(set(x) & set(y)) for x, y in zip(a, b, strict=True))
    scores = [np.sort(staged["scores"].numpy(), -1), np.sort(joined["scores"].numpy(), -1)]
    return shared >= 0.99 * a.size and np.allclose(*scores, rtol=1e-4, atol=1e-5)


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
        f"Served: {report['model']}.",
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
            f"**{result['index']}** (index build {result['build_seconds']} s; clusters "
            f"searched per request: {result.get('clusters_searched_mean')} of {k} on average)",
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


def _describe_trained(args: argparse.Namespace) -> None:
    """Puts the trained catalogue's size, K and d into ``args`` (the report's settings)."""
    from trainer import data
    from trainer.train import read_model_json

    items = data.load_items(args.data)
    args.size, args.clusters = items.num_items, items.num_clusters
    config = read_model_json(args.model)["config"]
    args.dim = config["model"]["embedding_dim"]
    args.latent_dim = "trained"
    args.variant = config["variant"]


def measure(args: argparse.Namespace, work: str) -> List[Dict[str, Any]]:
    """One profile per index kind, over the same catalogue (or trained model)."""
    data = None
    if args.model is None:
        data = serving_catalogue.synthetic_items(
            args.size, args.clusters, args.dim, args.noise, args.seed, args.latent_dim
        )
    results = []
    for index in args.indexes:
        print(f"[{args.model or f'{args.size:,} items'}] {index}: building and profiling")
        results.append(profile(args, index, data, work))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns the exit code."""
    args = parse_args(argv)
    if args.model is None:
        return bench_serving.run_benchmark("request_profile", args, measure, markdown)
    _describe_trained(args)
    served = f"trained `{args.variant}` model {args.model} (test histories of {args.data})"
    return bench_serving.run_benchmark("request_profile", args, measure, markdown, model=served)


if __name__ == "__main__":
    sys.exit(main())
