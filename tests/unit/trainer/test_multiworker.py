"""TF_CONFIG parsing, the chief's write paths and ``save_model`` on chief and non-chief."""

import json
import os
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from trainer import multiworker
from trainer.config import TrainConfig
from trainer.train import MODEL_JSON, MODEL_SUBDIR, save_model


def _tf_config(task_type="worker", index=0, cluster=None):
    cluster = cluster or {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_parse_tf_config_finds_the_task_and_the_chief():
    task = multiworker.parse_tf_config(_tf_config(index=1))
    assert (task.task_type, task.task_id, task.num_workers, task.is_chief) == (
        "worker",
        1,
        2,
        False,
    )
    assert multiworker.parse_tf_config(_tf_config(index=0)).is_chief
    with_chief = {"chief": ["h:1"], "worker": ["h:2"]}
    assert multiworker.parse_tf_config(_tf_config("chief", 0, with_chief)).is_chief
    assert multiworker.parse_tf_config(_tf_config("worker", 0, with_chief)).num_workers == 2


@pytest.mark.parametrize(
    "raw, message",
    [
        (None, "needs TF_CONFIG"),
        ("{not json", "not valid JSON"),
        (json.dumps({"task": {"type": "worker"}}), "'cluster' object"),
        (_tf_config("evaluator"), "task type must be one of"),
        (_tf_config(index=2), "out of range for 2 workers"),
        (_tf_config("chief"), "is not in the cluster"),
    ],
)
def test_parse_tf_config_rejects_bad_values(raw, message):
    with pytest.raises(ValueError, match=message):
        multiworker.parse_tf_config(raw)


def test_current_task_is_none_without_tf_config():
    assert multiworker.current_task({}) is None
    assert multiworker.current_task({"TF_CONFIG": _tf_config(index=1)}).task_id == 1


def test_tf_configs_give_each_worker_its_index_in_one_cluster():
    configs = multiworker.tf_configs(["127.0.0.1:5", "127.0.0.1:6"])
    assert [c["task"] for c in configs] == [
        {"type": "worker", "index": 0},
        {"type": "worker", "index": 1},
    ]
    assert all(c["cluster"] == {"worker": ["127.0.0.1:5", "127.0.0.1:6"]} for c in configs)
    with pytest.raises(ValueError, match="at least one worker"):
        multiworker.tf_configs([])
    ports = multiworker.free_ports(3)
    assert len(set(ports)) == 3


def test_launch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        multiworker.launch(["--data=x"], workers=0)
    with pytest.raises(ValueError, match="set by the launcher"):
        multiworker.launch(["--data=x", "--strategy=mirrored"])


def test_the_first_failing_worker_stops_the_others():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    start = time.monotonic()
    assert multiworker._wait_all([sleeper, failing]) == 3
    assert sleeper.returncode is not None and time.monotonic() - start < 30
    done = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    assert multiworker._wait_all(done) == 0


class _Resolver:
    def __init__(self, task_type, task_id, cluster):
        self.task_type, self.task_id, self._cluster = task_type, task_id, cluster

    def cluster_spec(self):
        return tf.train.ClusterSpec(self._cluster)


class _Strategy:
    """Stands in for a MultiWorkerMirroredStrategy: only its cluster resolver is read."""

    def __init__(self, task_type, task_id, cluster=None):
        cluster = cluster or {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
        self.cluster_resolver = _Resolver(task_type, task_id, cluster)


def test_is_chief_and_write_dir(tmp_path):
    final = str(tmp_path / "model")
    assert multiworker.is_chief(tf.distribute.get_strategy())
    assert multiworker.is_chief(_Strategy("worker", 0))
    assert not multiworker.is_chief(_Strategy("worker", 1))
    assert not multiworker.is_chief(_Strategy("worker", 0, {"chief": ["h:1"], "worker": ["h:2"]}))
    assert multiworker.is_chief(_Strategy("chief", 0, {"chief": ["h:1"], "worker": ["h:2"]}))
    assert multiworker.write_dir(final, _Strategy("worker", 0)) == final
    other = multiworker.write_dir(final, _Strategy("worker", 1))
    assert os.path.dirname(other) == str(tmp_path)
    assert os.path.basename(other).startswith(".model.worker-worker-1-")


def _tiny_model():
    model = tf.keras.Sequential([tf.keras.layers.Dense(2)])
    model.build((None, 3))
    return model


def test_only_the_chief_publishes_the_saved_model(tmp_path):
    config = TrainConfig(data="unused", output=str(tmp_path), variant="dnc")
    history = [{"loss": 1.0}]
    final = os.path.join(str(tmp_path), MODEL_SUBDIR)
    assert save_model(_tiny_model(), config, history, _Strategy("worker", 1)) == final
    assert os.listdir(tmp_path) == []  # wrote to a temporary directory, then removed it
    assert save_model(_tiny_model(), config, history, _Strategy("worker", 0)) == final
    assert os.listdir(tmp_path) == [MODEL_SUBDIR]
    with open(os.path.join(final, MODEL_JSON)) as f:
        assert json.load(f)["history"] == history
