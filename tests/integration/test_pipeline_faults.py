"""Crash safety: every pipeline component SIGKILLed in turn, then the run resumed.

``dnc pipeline run`` subprocesses on a tiny config, with the test hook
``DNC_FAULT_KILL_AT=<node>:<point>`` (``pipeline/faults.py``). The default run is
one chain: each run is killed at the next (node, point) of ``CHAIN`` and resumes
the previous one, then a last run finishes. After every kill: the process died
by SIGKILL at that point, the killed execution is RUNNING with no recorded
outputs, every COMPLETE artifact's content equals its recorded fingerprint
(nothing half-written is marked finished), and the serving path shows only
complete versions. At the end: each node finished exactly once over all runs,
the Pusher did not push the same model twice, and every artifact equals the one
of an uninterrupted run in another root.

"Equal" is the sha256 of the artifact's files after removing what depends on
where and when it was written (``stable_fingerprint``): absolute paths (the
SavedModels of TFT and of the export embed their asset paths, the JSON files
their input paths), execution ids and staging suffixes in those paths, timings
(``elapsed_seconds``, ``samples_per_second``, ``exported_at``, and
``data_fingerprint``, a hash over a file holding timings), TensorBoard event
files (named by time, host and pid) and the SavedModel ``fingerprint.pb`` (a
hash of ``saved_model.pb``). TF checkpoints (the trained weights, a SavedModel's
variables) are compared tensor by tensor: the checkpoint also stores Keras'
layer names, numbered per process (``item_embedding_3`` in a process that built
three models before). Of a ``saved_model.pb`` only the signatures are
compared (in text format): TensorFlow names traced functions with a process-wide
counter and orders a function's nodes differently from one process to another,
so the same graph serializes differently in a resumed process that ran other
components before (or none). The SavedModels' variables and assets, and the
transformed records the TFT graph produced, are compared byte for byte, like
everything else: examples, quarantine, statistics, schema, vocabularies,
clusters, the trained weights (training is seeded and bit-reproducible on CPU
across processes), the evaluation and the blessing. MLMD's own fingerprints are
raw content hashes, so they differ between roots by those paths and timings.

The full matrix (every node at every point) is marked ``slow``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
import yaml

from pipeline.config import load_config, to_dict
from pipeline.dag import create_pipeline
from pipeline.faults import ENV, POINTS, kill_target
from pipeline.metadata import fingerprint_path
from pipeline.runner import open_metadata
from tests.integration.test_pipeline import _config, _write_csv

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
NODES = create_pipeline(_config("ROOT", "CSV")).node_ids

# Every node that writes data or models killed, every point at least once; the
# Pusher twice (killed while its version is half-written, then after publishing it
# but before MLMD knows). StatisticsGen and ExampleValidator, which write one small
# file each, are in the slow matrix, which kills every node at every point.
CHAIN = (
    ("ExampleGen", "mid_write"),
    ("SchemaGen", "before_run"),
    ("Transform", "mid_write"),
    ("Trainer.dnc", "mid_write"),
    ("Evaluator", "after_run"),
    ("Pusher", "mid_write"),
    ("Pusher", "after_run"),
)
VOLATILE_KEYS = frozenset(
    {
        "elapsed_seconds",
        "interactions_per_second",
        "samples_per_second",
        "exported_at",
        "data_fingerprint",
    }
)
CHECKPOINT_DATA = re.compile(r"\.data-[0-9]+-of-[0-9]+$")
SAVED_MODEL_FILES = ("saved_model.pb", "variables/variables.index", "assets.extra")


def _write_config(base, name: str, csv_path: str) -> str:
    """The tiny config of ``test_pipeline`` (its model is blessed: it beats popularity)."""
    path = str(base / f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(_config(str(base / name), csv_path)), f)
    return path


def run_dnc(config_path: str, kill_at: Optional[Tuple[str, str]] = None):
    """``dnc pipeline run --no-serve`` in a subprocess (killed at ``kill_at``)."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if kill_at:
        env[ENV] = ":".join(kill_at)
    command = [sys.executable, "-m", "pipeline", "--log-level=INFO", "pipeline", "run"]
    return subprocess.run(  # noqa: S603
        [*command, "--config", config_path, "--no-serve"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


# --------------------------------------------------------------------------- state checks


def _normalize(data: bytes, root: str) -> bytes:
    data = data.replace(os.path.abspath(root).encode(), b"<ROOT>")
    data = re.sub(rb"<ROOT>/([^/\s'\"]+)/[0-9]+/", rb"<ROOT>/\1/<EXECUTION>/", data)
    return re.sub(rb"/\.([\w.]+)\.staging-[0-9a-f]{8}", rb"/\1", data)


def _saved_model_text(data: bytes) -> bytes:
    """The signatures of a SavedModel proto (module doc: why not its whole graph)."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    message = saved_model_pb2.SavedModel.FromString(data)
    texts = []
    for meta_graph in message.meta_graphs:
        for key in sorted(meta_graph.signature_def):
            signature = text_format.MessageToString(meta_graph.signature_def[key], as_utf8=True)
            texts.append(f"{key}\n{signature}")
    return "\n".join(texts).encode()


def _checkpoint_tensors(prefix: str) -> bytes:
    """A TF checkpoint's tensors by key (without the object graph, which holds
    Keras' per-process layer names such as ``item_embedding_3``)."""
    import numpy as np
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    parts = []
    for key in sorted(reader.get_variable_to_shape_map()):
        if key == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        value = np.asarray(reader.get_tensor(key))
        if value.dtype == object:
            raw = b"\0".join(bytes(v) for v in value.ravel())
        else:
            raw = value.tobytes()
        parts.append(f"{key}:{value.dtype}:{value.shape}:".encode() + raw)
    return b"\n".join(parts)


def _drop_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


def stable_fingerprint(uri: str, root: str) -> str:
    """sha256 of an artifact without paths, execution ids and timings (module doc)."""
    digest = hashlib.sha256()
    files = []
    for parent, dirs, names in os.walk(uri):
        dirs.sort()
        for name in sorted(names):
            if name.startswith("events.out.tfevents") or name == "fingerprint.pb":
                continue
            if CHECKPOINT_DATA.search(name):
                continue  # read through its .index
            files.append(os.path.join(parent, name))
    for full in files:
        with open(full, "rb") as f:
            data = f.read()
        if full.endswith(".index"):
            data = _checkpoint_tensors(full[: -len(".index")])
        elif os.path.basename(full) == "saved_model.pb":
            data = _saved_model_text(data)
        data = _normalize(data, root)
        if full.endswith(".json"):
            data = json.dumps(_drop_volatile(json.loads(data)), sort_keys=True).encode()
        digest.update(os.path.relpath(full, uri).encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


@dataclasses.dataclass
class State:
    """What a run left behind: MLMD executions with outputs, problems found, versions."""

    executions: List[Dict[str, Any]]
    problems: List[str]
    versions: Dict[str, List[str]]


def _version_problems(serving_dir: str) -> Tuple[Dict[str, List[str]], List[str]]:
    from serving.model_config import parse_version_dir

    versions, problems = {}, []
    if not os.path.isdir(serving_dir):
        return versions, problems
    for name in sorted(os.listdir(serving_dir)):
        path = os.path.join(serving_dir, name)
        if parse_version_dir(name) is None:
            if not name.startswith("."):
                problems.append(f"serving path holds a non-hidden non-version entry {name}")
            continue
        versions[name] = sorted(os.listdir(path))
        for required in SAVED_MODEL_FILES:
            if not os.path.exists(os.path.join(path, required)):
                problems.append(f"version {name} visible without {required}")
    return versions, problems


def inspect(config_path: str) -> State:
    """MLMD and serving-path state of a root, with every crash-safety violation found."""
    config = load_config(config_path)
    metadata = open_metadata(config)
    executions, problems = [], []
    for execution in metadata.executions():
        outputs = metadata.outputs_of(execution["id"])
        executions.append({**execution, "outputs": outputs})
        if execution["state"] in ("RUNNING", "FAILED", "CANCELED") and outputs:
            problems.append(f"unfinished execution {execution['id']} has recorded outputs")
        if execution["state"] != "COMPLETE":
            continue
        for key, artifact in outputs.items():
            if not os.path.exists(artifact.uri):
                problems.append(f"{execution['node']}.{key}: {artifact.uri} is missing")
            elif fingerprint_path(artifact.uri) != artifact.fingerprint:
                problems.append(f"{execution['node']}.{key}: {artifact.uri} changed after finish")
    versions, version_problems = _version_problems(config.serving_dir)
    return State(executions, problems + version_problems, versions)


def final_fingerprints(config_path: str) -> Dict[Tuple[str, str], str]:
    """(node, output) -> stable fingerprint of the latest finished artifacts."""
    config = load_config(config_path)
    metadata = open_metadata(config)
    found = {}
    for node in NODES:
        outputs = metadata.latest_outputs(node)
        assert outputs is not None, f"{node} never finished"
        for key, artifact in outputs.items():
            found[(node, key)] = stable_fingerprint(artifact.uri, config.root)
    return found


def run_chain(config_path: str, chain) -> Dict[str, Any]:
    """Runs killed at each step of ``chain`` in turn, then once to the end."""
    steps = []
    for kill_at in chain:
        start = time.monotonic()
        proc = run_dnc(config_path, kill_at)
        elapsed = time.monotonic() - start
        steps.append(
            {"kill_at": kill_at, "proc": proc, "state": inspect(config_path), "seconds": elapsed}
        )
    final = run_dnc(config_path)
    return {"steps": steps, "final": final, "state": inspect(config_path)}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    csv_path = str(base / "interactions.csv")
    _write_csv(csv_path)
    reference = _write_config(base, "reference", csv_path)
    proc = run_dnc(reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"base": base, "csv": csv_path, "reference": reference}


@pytest.fixture(scope="module")
def reference_fingerprints(setup):
    return final_fingerprints(setup["reference"])


@pytest.fixture(scope="module")
def chain(setup):
    config_path = _write_config(setup["base"], "chain", setup["csv"])
    return {"config": config_path, **run_chain(config_path, CHAIN)}


# --------------------------------------------------------------------------- checks


def check_kills(result, chain_steps) -> None:
    for step, kill_at in zip(result["steps"], chain_steps, strict=True):
        proc = step["proc"]
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr[-2000:])
        assert f"fault injection: SIGKILL at {kill_at[1]}" in proc.stderr
        node_executions = [e for e in step["state"].executions if e["node"] == kill_at[0]]
        last = node_executions[-1]
        assert last["state"] == "RUNNING" and not last["outputs"], (kill_at, last)
        assert step["state"].problems == [], (kill_at, step["state"].problems)


def check_resumed(result, config_path, reference) -> None:
    final = result["final"]
    assert final.returncode == 0, final.stderr[-3000:]
    state = result["state"]
    assert state.problems == []
    for node in NODES:  # resume never redoes finished work
        complete = [e for e in state.executions if e["node"] == node and e["state"] == "COMPLETE"]
        assert len(complete) == 1, (node, [e["state"] for e in state.executions])
    assert list(state.versions) == ["1"]  # pushed once: no duplicate version
    assert final_fingerprints(config_path) == reference


def test_every_kill_leaves_nothing_half_written_marked_finished(chain):
    check_kills(chain, CHAIN)


def test_half_written_version_is_never_visible_to_the_server(chain):
    steps = {step["kill_at"]: step["state"] for step in chain["steps"]}
    assert steps[("Pusher", "mid_write")].versions == {}
    staging = os.path.join(load_config(chain["config"]).serving_dir)
    assert any(".staging-" in name for name in os.listdir(staging))  # left hidden
    assert list(steps[("Pusher", "after_run")].versions) == ["1"]


def test_resumed_run_equals_an_uninterrupted_run(chain, reference_fingerprints):
    check_resumed(chain, chain["config"], reference_fingerprints)


def test_stable_fingerprint_ignores_timings_but_not_content(setup, tmp_path):
    import shutil

    metadata = open_metadata(load_config(setup["reference"]))
    model = metadata.latest_outputs("Trainer.dnc")["model"].uri
    root = os.path.dirname(setup["reference"])
    copy = str(tmp_path / "model")
    shutil.copytree(model, copy)
    assert stable_fingerprint(copy, root) == stable_fingerprint(model, root)
    model_json = os.path.join(copy, "model", "model.json")
    with open(model_json) as f:
        raw = json.load(f)
    raw["history"][0]["samples_per_second"] = -1.0
    with open(model_json, "w") as f:
        json.dump(raw, f)
    assert stable_fingerprint(copy, root) == stable_fingerprint(model, root)
    raw["history"][0]["loss"] = -1.0
    with open(model_json, "w") as f:
        json.dump(raw, f)
    assert stable_fingerprint(copy, root) != stable_fingerprint(model, root)


@pytest.mark.parametrize("value", ["NoSuchNode:after_run", "Pusher:later", "Pusher"])
def test_invalid_kill_target_is_refused(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=f"{ENV}={value!r}: expected <node>:<point>"):
        kill_target(NODES)
    monkeypatch.setenv(ENV, "Trainer.dnc:mid_write")
    assert kill_target(NODES) == ("Trainer.dnc", "mid_write")


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_every_node_killed_at_every_point(setup, reference_fingerprints, point):
    config_path = _write_config(setup["base"], f"matrix-{point}", setup["csv"])
    steps = tuple((node, point) for node in NODES)
    result = run_chain(config_path, steps)
    check_kills(result, steps)
    check_resumed(result, config_path, reference_fingerprints)
