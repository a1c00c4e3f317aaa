"""The TFX-style pipeline end to end on tiny CSV data (one shared sequence of runs).

Runs, in order (module fixture): an interrupted run (Trainer killed after
Transform), its resumption, the demo path (unchanged config: all cache hits, then
serve + gRPC queries), and a run with a changed training parameter that makes
the model worse (learning rate 0: untrained weights) and must not be pushed.
"""

import dataclasses
import io
import os

import numpy as np
import pytest
import yaml

from pipeline import components
from pipeline.config import PipelineConfig, from_dict
from pipeline.dag import create_pipeline
from pipeline.demo import run_demo
from pipeline.kfp_compile import compile_kfp, step_name
from pipeline.runner import open_metadata, run_pipeline

BAD_ROWS = ["u_bad,,5,c0", "u_bad2,i1,not-a-time,c0"]


def _write_csv(path, users=200, items=150, categories=5, seed=3):
    """Users walk forward through the items of one or two categories (learnable order)."""
    rng = np.random.default_rng(seed)
    per_cat = items // categories
    lines = ["user_id,item_id,timestamp,category"]
    for u in range(users):
        cats = rng.choice(categories, size=rng.integers(1, 3), replace=False)
        pos = {c: int(rng.integers(0, per_cat)) for c in cats}
        for t in range(int(rng.integers(12, 25))):
            c = int(rng.choice(cats))
            pos[c] = (pos[c] + int(rng.integers(1, 3))) % per_cat
            lines.append(f"u{u},i{c * per_cat + pos[c]},{t},c{c}")
    lines[5:5] = BAD_ROWS
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _config(root, csv_path, **trainer):
    raw = {
        "name": "test",
        "root": str(root),
        "example_gen": {"source": "csv", "input": str(csv_path)},
        "transform": {"clustering": {"num_clusters": 5, "epochs": 2, "embedding_dim": 16}},
        "trainer": {
            "variants": ["dnc"],
            "model": {"embedding_dim": 16, "max_len": 10, "num_blocks": 1, "dropout": 0.0},
            "epochs": 2,
            "steps_per_epoch": 20,
            "batch_size": 32,
            "learning_rate": 5e-3,
            "eval_users": 40,
            "eval_m": [10],
            **trainer,
        },
        "evaluator": {"m": 10, "alpha": 1.0},
        "serving": {"index": "brute-force"},
    }
    return from_dict(PipelineConfig, raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    csv_path = base / "interactions.csv"
    _write_csv(csv_path)
    config = _config(base / "root", csv_path)
    out = {"config": config, "csv": str(csv_path)}

    def killed(self, inputs, output_dirs):
        raise KeyboardInterrupt("simulated kill after Transform")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(components.Trainer, "run", killed)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(config, run_id="interrupted")
    out["resumed"] = run_pipeline(config, run_id="resumed")
    printed = io.StringIO()
    out["demo"] = run_demo(config, printed)
    out["demo_output"] = printed.getvalue()
    worse = _config(base / "root", csv_path, learning_rate=0.0)
    out["worse"] = run_pipeline(worse, run_id="worse")
    out["metadata"] = open_metadata(config)
    return out


def _executions(metadata, node, run_id=None):
    return [e for e in metadata.executions(run_id) if e["node"] == node]


def test_interrupted_run_resumes_without_redoing_transform(runs):
    md = runs["metadata"]
    interrupted = {e["node"]: e["state"] for e in md.executions("interrupted")}
    assert interrupted["Transform"] == "COMPLETE"
    assert interrupted["Trainer.dnc"] == "CANCELED"
    assert "Evaluator" not in interrupted
    resumed = runs["resumed"]
    assert resumed.cache_hits["Transform"] and resumed.cache_hits["ExampleGen"]
    assert not resumed.cache_hits["Trainer.dnc"]
    # Transform ran exactly once over all runs; the resumed run reused its artifact.
    ran = [e for e in _executions(md, "Transform") if e["state"] == "COMPLETE"]
    assert len(ran) == 1
    first = md.outputs_of(ran[0]["id"])["transformed_examples"]
    assert resumed.results["Transform"].outputs["transformed_examples"].id == first.id
    assert [e["state"] for e in _executions(md, "Trainer.dnc", "resumed")] == ["COMPLETE"]


def test_full_run_records_lineage_and_pushes_version_1(runs):
    config, resumed = runs["config"], runs["resumed"]
    md = runs["metadata"]
    pushed = resumed.results["Pusher"].outputs["pushed_model"]
    assert pushed.properties["pushed"] == 1 and pushed.properties["version"] == 1
    assert pushed.uri == os.path.join(os.path.abspath(config.serving_dir), "1")
    blessing = resumed.results["Evaluator"].outputs["blessing"]
    assert blessing.properties["blessed"] == 1, blessing.properties["reason"]
    lineage = md.lineage(pushed.id)
    types = {a.type_name for a in lineage}
    assert {"Model", "ModelBlessing", "TransformedExamples", "Examples"} <= types
    sources = [a for a in lineage if a.type_name == "ExternalArtifact"]
    assert [a.uri for a in sources] == [runs["csv"]]
    quarantine = resumed.results["ExampleGen"].outputs["quarantine"]
    assert quarantine.properties["rows"] == len(BAD_ROWS)
    report = resumed.report
    assert os.path.exists(report)
    text = open(report).read()
    for png in ("cluster_sizes", "training_curves", "recall", "recall_vs_alpha", "diversity"):
        assert f"{png}.png" in text
        assert os.path.exists(os.path.join(os.path.dirname(report), f"{png}.png"))


def test_unchanged_second_run_is_all_cache_hits_and_demo_queries_the_server(runs):
    demo = runs["demo"]
    assert all(demo.cache_hits.values()), demo.cache_hits
    states = {e["state"] for e in runs["metadata"].executions(demo.run_id)}
    assert states == {"CACHED"}
    printed = runs["demo_output"]
    assert printed.count("history [") == 3
    assert "rank  item_id" in printed and "server stopped" in printed


def test_changed_training_parameter_reruns_trainer_and_downstream_only(runs):
    hits = runs["worse"].cache_hits
    upstream = ("ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Transform")
    assert all(hits[n] for n in upstream), hits
    assert not any(hits[n] for n in ("Trainer.dnc", "Evaluator", "Pusher")), hits


def test_worse_model_is_not_blessed_nor_pushed(runs):
    worse = runs["worse"]
    blessing = worse.results["Evaluator"].outputs["blessing"]
    assert blessing.properties["blessed"] == 0
    assert "vs pushed" in blessing.properties["reason"]
    assert worse.results["Pusher"].outputs["pushed_model"].properties["pushed"] == 0
    assert sorted(os.listdir(runs["config"].serving_dir)) == ["1"]


def test_kfp_compile_has_one_step_per_component_in_order(runs, tmp_path):
    config = dataclasses.replace(
        runs["config"],
        trainer=dataclasses.replace(runs["config"].trainer, variants=("dnc", "sasrec")),
    )
    path = tmp_path / "pipeline.yaml"
    compile_kfp(config, str(path))
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    expected = [step_name(n) for n in create_pipeline(config).node_ids]
    assert sorted(tasks) == sorted(expected)
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert deps["examplegen"] == set()
    assert deps["transform"] == {"examplegen", "examplevalidator"}
    assert deps["evaluator"] == {"transform", "trainer-dnc", "trainer-sasrec"}
    # serving.variant "best": the Pusher takes every servable model, the blessing says which.
    assert deps["pusher"] == {"evaluator", "trainer-dnc", "trainer-sasrec", "transform"}
    # Every dependency precedes its dependant in the pipeline order.
    for name, before in deps.items():
        assert all(expected.index(b) < expected.index(name) for b in before)
    executors = spec["deploymentSpec"]["executors"]
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == config.kfp.image
        assert container["command"] == ["dnc"]
        assert container["args"][:2] == ["pipeline", "run"]
