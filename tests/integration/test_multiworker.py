"""Two-worker ``MultiWorkerMirroredStrategy`` training on loopback (``trainer.multiworker``).

The launcher starts two ``dnc train --strategy multiworker`` processes with their
``TF_CONFIG``; the chief alone writes the model, which loads and evaluates above
popularity (default run) and reaches the validation recall of a one-process run within
noise (``slow``: it adds the one-process run).
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.evaluator import popularity_recall
from trainer.train import load_model

M = (10, 20)
TRAIN_ARGS = [
    "--variant=dnc",
    "--epochs=3",
    "--steps-per-epoch=40",
    "--batch-size=64",
    "--max-len=10",
    "--dim=16",
    "--blocks=1",
    "--eval-users=300",
    "--eval-m=10,20",
]
# Validation recall of two runs on 300 users differs by about 0.04 (one standard
# deviation of a difference of two binomials near 0.4) from the data alone.
TOLERANCE = 0.1


def _launch(data_dir, output, *extra, workers=2, timeout=480):
    """Runs the documented launcher command; returns the finished process."""
    command = [sys.executable, "-m", "trainer.multiworker", f"--workers={workers}"]
    command += ["--log-level=WARNING", "--", f"--data={data_dir}", f"--output={output}"]
    return subprocess.run(
        [*command, *extra], capture_output=True, text=True, timeout=timeout, check=False
    )


def _evaluate(data_dir, model_dir, out):
    args = ["--log-level=WARNING", "evaluate", f"--data={data_dir}", f"--model={model_dir}"]
    args += ["--m=10,20", "--split=validation", "--merge=score", "--alpha=1", f"--json={out}"]
    assert main(args) == 0
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two_workers(tiny_data, tmp_path_factory):
    """(model dir, launcher output) of the two-worker run."""
    multi = str(tmp_path_factory.mktemp("multiworker") / "two-workers")
    proc = _launch(tiny_data, multi, *TRAIN_ARGS)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return multi, proc.stdout


def test_both_workers_train_and_only_the_chief_writes_the_model(two_workers):
    multi, stdout = two_workers
    for worker in (0, 1):
        assert f"[worker {worker}] trained dnc: 3 epochs -> {multi}/model" in stdout
    assert sorted(os.listdir(os.path.join(multi, "model"))) == [
        "checkpoint",
        "model.json",
        "weights.data-00000-of-00001",
        "weights.index",
    ]
    # The non-chief's temporary model and Keras's per-worker temp dirs are gone.
    assert not glob.glob(os.path.join(multi, ".*")), os.listdir(multi)
    assert not glob.glob(os.path.join(multi, "**", "workertemp_*"), recursive=True)
    # TensorBoard logs come from the chief alone: one writer process.
    events = glob.glob(os.path.join(multi, "logs", "*", "events.out.tfevents.*"))
    assert events and len({os.path.basename(e).split(".")[-3] for e in events}) == 1
    with open(os.path.join(multi, "model", "model.json")) as f:
        history = json.load(f)["history"]
    assert len(history) == 3


def test_the_chief_model_loads_and_evaluates_above_popularity(two_workers, tiny_data, tmp_path):
    multi, _ = two_workers
    model, config = load_model(multi)
    assert config.variant == "dnc" and model.num_clusters == 5
    report = _evaluate(tiny_data, multi, str(tmp_path / "two.json"))
    assert report["users"] == 300 and report["variant"] == "dnc"
    for m in M:
        popularity = popularity_recall(tiny_data, m)
        assert report[f"recall@{m}"] > 1.5 * popularity, (m, report[f"recall@{m}"], popularity)


@pytest.mark.slow
def test_two_workers_reach_the_recall_of_one_process(two_workers, tiny_data, tmp_path):
    multi, _ = two_workers
    single = str(tmp_path / "one-process")
    common = ["--log-level=WARNING", "train", f"--data={tiny_data}", f"--output={single}"]
    assert main([*common, *TRAIN_ARGS]) == 0
    two = _evaluate(tiny_data, multi, str(tmp_path / "two.json"))
    one = _evaluate(tiny_data, single, str(tmp_path / "one.json"))
    for m in M:
        popularity = popularity_recall(tiny_data, m)
        assert one[f"recall@{m}"] > 1.5 * popularity, (m, one[f"recall@{m}"], popularity)
        assert abs(two[f"recall@{m}"] - one[f"recall@{m}"]) <= TOLERANCE, (m, two, one)


def test_multiworker_strategy_needs_tf_config(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    args = ["train", f"--data={tiny_data}", f"--output={tmp_path}", "--strategy=multiworker"]
    assert main(args) == 2
    assert "needs TF_CONFIG" in capsys.readouterr().err
