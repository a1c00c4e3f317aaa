"""Training, saving, resuming and evaluating every variant on tiny data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from pipeline.cli import main
from pipeline.evaluator import popularity_recall
from trainer import data, evaluation, sequence_data, significance
from trainer.config import VARIANTS, ModelConfig, TrainConfig, make_train_config
from trainer.samplers import ClusterTable, NegativeSampler
from trainer.train import (
    MONITOR,
    MONITOR_PROMPT_WEIGHTS,
    ModelScorer,
    load_model,
    mean_recall,
    train,
)

SMALL = ModelConfig(embedding_dim=16, max_len=10, num_blocks=1, dropout=0.0)


def _config(tiny_data, output, variant, **kw):
    defaults = dict(
        model=SMALL, epochs=1, batch_size=32, steps_per_epoch=3, eval_users=40, eval_m=(5, 10)
    )
    defaults.update(kw)
    return TrainConfig(data=tiny_data, output=str(output), variant=variant, **defaults)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains_and_reports_validation_recall(tiny_data, tmp_path, variant):
    result = train(_config(tiny_data, tmp_path, variant), verbose=0)
    (epoch,) = result.history
    assert np.isfinite(epoch["loss"]) and epoch["loss"] > 0
    assert 0.0 <= epoch["val_recall@5"] <= epoch["val_recall@10"] <= 1.0
    # the early-stopping monitor: the mean over the list sizes
    assert np.isclose(epoch[MONITOR], (epoch["val_recall@5"] + epoch["val_recall@10"]) / 2)
    assert epoch["samples_per_second"] > 0
    assert os.path.exists(os.path.join(result.model_dir, "model.json"))


def test_the_dnc_monitor_keeps_the_best_prompt_weight(tiny_data, tmp_path):
    """Merged variants' monitor: the score merge at weights 1 and 0, the better one (the
    epoch's weights are the saved ones: one epoch, restored best = last)."""
    config = _config(tiny_data, tmp_path, "dnc", steps_per_epoch=5)
    (epoch,) = train(config, verbose=0).history
    model, _ = load_model(str(tmp_path))
    items = data.load_items(tiny_data)
    ev = data.evaluation_data(
        tiny_data, "validation", SMALL.max_len, max_users=config.eval_users, seed=config.seed
    )
    means = {}
    for w in MONITOR_PROMPT_WEIGHTS:
        result = evaluation.evaluate(
            ModelScorer(model), ev.histories, ev.targets, ev.exclude, items.item_cluster,
            m_values=(5, 10), merge="score", prompt_weight=w, progress=False,
        )  # fmt: skip
        means[w] = mean_recall(result.recall)
    assert epoch["val_prompt_weight"] in means
    assert np.isclose(epoch[MONITOR], max(means.values()), atol=1e-6)
    assert np.isclose(epoch[MONITOR], means[epoch["val_prompt_weight"]], atol=1e-6)


def test_save_load_gives_the_same_user_embeddings(tiny_data, tmp_path):
    result = train(_config(tiny_data, tmp_path, "dnc", steps_per_epoch=5), verbose=0)
    assert result.model_dir == str(tmp_path / "model")
    model, _ = load_model(str(tmp_path))
    items = data.load_items(tiny_data)
    ev = data.evaluation_data(tiny_data, "test", SMALL.max_len, max_users=16)
    tasks = np.arange(16, dtype=np.int32) % (items.num_clusters + 1)  # K = no task
    reloaded = ModelScorer(model).user_embeddings(ev.histories, tasks)
    again, _ = load_model(str(tmp_path))
    np.testing.assert_allclose(ModelScorer(again).user_embeddings(ev.histories, tasks), reloaded)
    # The reloaded weights are the trained ones, not a fresh initialisation.
    fresh_config = _config(tiny_data, tmp_path / "other", "dnc", steps_per_epoch=1, seed=7)
    other = train(fresh_config, verbose=0)
    other_model, _ = load_model(other.model_dir)
    assert not np.allclose(ModelScorer(other_model).user_embeddings(ev.histories, tasks), reloaded)


class _Interrupt(tf.keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("simulated interruption")


def test_interrupted_run_resumes_from_the_last_epoch(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path, "sasrec", epochs=3, patience=10)
    with pytest.raises(KeyboardInterrupt):
        train(config, verbose=0, extra_callbacks=[_Interrupt()])
    assert not os.path.exists(tmp_path / "model")
    resumed = train(config, verbose=0)
    assert len(resumed.history) == 1  # only the third epoch was left


MIRRORED = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import trainer
from trainer.config import ModelConfig, TrainConfig
from trainer.train import train
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
config = TrainConfig(
    data=sys.argv[1], output=sys.argv[2], variant="dnc", epochs=1, batch_size=32,
    steps_per_epoch=4, eval_users=20, eval_m=(5,),
    model=ModelConfig(embedding_dim=16, max_len=10, num_blocks=1, dropout=0.0),
)
result = train(config, strategy=strategy, verbose=0)
print("LOSS", result.history[0]["loss"])
"""


def test_trains_under_mirrored_strategy_on_two_logical_cpus(tiny_data, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED, tiny_data, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = float(proc.stdout.split("LOSS")[1])
    assert np.isfinite(loss) and loss > 0


def test_cli_train_then_evaluate_writes_the_contract_json(tiny_data, tmp_path):
    model_dir = str(tmp_path / "m")
    common = ["--log-level=WARNING"]
    train_args = [
        "train",
        f"--data={tiny_data}",
        f"--output={model_dir}",
        "--variant=dnc",
        "--epochs=1",
        "--steps-per-epoch=3",
        "--batch-size=32",
        "--max-len=10",
        "--dim=16",
        "--blocks=1",
        "--eval-users=30",
        "--eval-m=5",
    ]
    assert main(common + train_args) == 0
    out = str(tmp_path / "eval.json")
    eval_args = ["evaluate", f"--data={tiny_data}", f"--model={model_dir}", "--m=5,10"]
    hits = str(tmp_path / "hits.npz")
    assert main(common + eval_args + [f"--json={out}", f"--hits={hits}"]) == 0
    with open(out) as f:
        report = json.load(f)
    per_user = significance.read_hits(hits)
    assert per_user.users.size == report["users"] and per_user.meta["variant"] == "dnc"
    for m in (5, 10):  # the recall is the mean of the per-user hits
        assert per_user.hits[m].mean() == pytest.approx(report[f"recall@{m}"])
    for key in ("recall@5", "recall@10", "within_cluster_recall@5", "alpha", "variant", "users"):
        assert key in report
    assert report["variant"] == "dnc" and report["users"] == 300
    assert report["recall@5"] <= report["recall@10"]
    grid = report["alpha_selection"]
    assert grid["m"] == 10 and any(k.startswith("recall@10[alpha=") for k in grid)


def test_training_samples_cover_every_prefix_once_per_epoch(tiny_data):
    total = data.count_training_samples(tiny_data)
    dataset = data.training_dataset(tiny_data, 10, batch_size=1, repeat=False, shuffle_buffer=10)
    targets = [int(b[data.TARGET][0]) for b in dataset]
    assert len(targets) == total
    # Every training sequence of n items gives n - 1 targets: its items after the first.
    expected = []
    for record in data.read_split(tiny_data, "train").as_numpy_iterator():
        expected.extend(record["items"][1:].tolist())
    assert sorted(targets) == sorted(expected)


def test_the_in_memory_split_yields_the_records_in_order(tiny_data):
    split = data.load_train_split(tiny_data, read_batch=7)  # several read batches
    got = list(split.dataset().as_numpy_iterator())
    want = list(data.read_split(tiny_data, "train").as_numpy_iterator())
    assert len(got) == len(want) == len(split.lengths)
    for a, b in zip(got, want, strict=True):
        assert a[data.USER] == b[data.USER]
        np.testing.assert_array_equal(a["items"], b["items"])
        np.testing.assert_array_equal(a["clusters"], b["clusters"])


def test_train_reads_the_training_records_once(tiny_data, tmp_path, monkeypatch):
    splits = []
    read_split = data.read_split

    def counting(data_dir, split):
        splits.append(split)
        return read_split(data_dir, split)

    monkeypatch.setattr(data, "read_split", counting)
    train(_config(tiny_data, tmp_path, "sasrec", training="all-positions", epochs=2), verbose=0)
    assert splits.count("train") == 1, splits


def test_evaluation_data_holds_out_the_last_item(tiny_data):
    ev = data.evaluation_data(tiny_data, "test", 10)
    validation = data.evaluation_data(tiny_data, "validation", 10)
    assert len(ev.users) == len(validation.users) == 300
    for i in range(5):
        # The validation target is the last element of the test history.
        assert ev.exclude[i][-1] == validation.targets[i]
        assert ev.histories[i][-1] == validation.targets[i]
    with pytest.raises(ValueError, match="not train"):
        data.evaluation_data(tiny_data, "train", 10)


@pytest.mark.parametrize("loss", ["bce", "sampled-softmax", "softmax"])
@pytest.mark.parametrize("variant", ["sasrec", "dnc"])
def test_all_position_training_runs_with_every_loss(tiny_data, tmp_path, variant, loss):
    config = _config(
        tiny_data,
        tmp_path,
        variant,
        training="all-positions",
        loss=loss,
        steps_per_epoch=2,
        batch_size=8,
        eval_users=20,
    )
    (epoch,) = train(config, verbose=0).history
    assert np.isfinite(epoch["loss"]) and epoch["loss"] > 0
    assert epoch["samples_per_second"] > 0


def test_bucketed_windows_cover_every_target_once_within_the_position_budget(tiny_data):
    buckets = sequence_data.LengthBuckets.for_budget(max_len=10, batch_size=4, num_buckets=3)
    dataset = sequence_data.sequence_dataset(
        tiny_data, 10, batch_size=4, repeat=False, shuffle_buffer=10, buckets=buckets
    )
    targets, widths = [], set()
    for batch in dataset:
        mask = batch[data.MASK].numpy() > 0
        width = mask.shape[1]
        widths.add(width)
        assert mask[:, 0].any()  # trimmed: no all-padding leading column
        bucket = int(buckets.bucket_of(np.array([width]))[0])
        assert width <= buckets.widths[bucket] and len(mask) <= buckets.batch_sizes[bucket]
        targets += batch[data.TARGET].numpy()[mask].tolist()
    want = []
    for record in data.read_split(tiny_data, "train").as_numpy_iterator():
        want += record["items"][1:].tolist()
    assert sorted(targets) == sorted(want)
    assert len(widths) > 1


def test_all_position_windows_cover_every_target_once_per_epoch(tiny_data):
    dataset = sequence_data.sequence_dataset(
        tiny_data, 10, batch_size=1, repeat=False, shuffle_buffer=10
    )
    targets = []
    for batch in dataset:
        mask = batch[data.MASK].numpy()[0] > 0
        targets += batch[data.TARGET].numpy()[0][mask].tolist()
        assert batch[data.NEGATIVES].shape == (1, 10, 1) if data.NEGATIVES in batch else True
    assert len(targets) == data.count_training_samples(tiny_data)
    assert sequence_data.count_training_windows(tiny_data, 10) == len(list(dataset))


def test_all_position_epochs_draw_the_windows_in_a_new_seeded_order(tiny_data):
    def epochs(seed, count=2):
        dataset = sequence_data.sequence_dataset(
            tiny_data, 10, batch_size=1, repeat=False, seed=seed
        )
        return [
            [tuple(row) for b in dataset for row in b[data.TARGET].numpy().tolist()]
            for _ in range(count)
        ]

    first, second = epochs(seed=7)
    assert sorted(first) == sorted(second) and first != second  # reshuffled each epoch
    assert epochs(seed=7, count=1)[0] == first  # the seed fixes the order
    assert epochs(seed=8, count=1)[0] != first


def test_window_hits_equal_the_broadcast_check_of_the_sampler(tiny_data):
    items = data.load_items(tiny_data)
    sampler = NegativeSampler(ClusterTable(items.item_cluster[1:], items.num_clusters), "mixed")
    batch = next(iter(sequence_data.sequence_dataset(tiny_data, 10, 8, repeat=False)))
    seed = tf.constant([5, 6], tf.int64)
    by_table = sequence_data._add_sequence_negatives(batch, seed, sampler, 16, max_windows=8)
    by_compare = sequence_data._add_sequence_negatives(batch, seed, sampler, 16)
    for key in (data.NEGATIVES, data.NEGATIVES_VALID, data.NEGATIVES_LOG_Q):
        np.testing.assert_array_equal(by_table[key], by_compare[key])
    valid = by_table[data.NEGATIVES_VALID].numpy()
    assert valid.any() and not valid.all()  # some draws hit the window's items
    negatives, history = by_table[data.NEGATIVES].numpy(), batch[data.HISTORY].numpy()
    for b in range(len(history)):
        inputs = set(history[b][history[b] != 0].tolist())
        target = batch[data.TARGET].numpy()[b][:, None]
        hit = np.isin(negatives[b], list(inputs)) | (negatives[b] == target)
        np.testing.assert_array_equal(valid[b], ~hit)


def test_gathered_windows_equal_the_windows_cut_per_user(tiny_data):
    split = data.load_train_split(tiny_data)
    windows = sequence_data.training_windows(split, 10)
    rows = sequence_data.gather_windows(windows, tf.range(windows[data.USER].shape[0]))
    start = 0
    for record in split.dataset().take(20):
        cut = sequence_data.sequence_windows(record["items"], record["clusters"], 10)
        n = int(cut[data.MASK].shape[0])
        for key in (data.HISTORY, data.TARGET, data.TARGET_CLUSTER, data.MASK):
            np.testing.assert_array_equal(rows[key][start : start + n], cut[key])
        assert set(rows[data.USER][start : start + n].numpy()) == {int(record[data.USER])}
        start += n


@pytest.mark.parametrize(
    "variant, margin", [("sasrec", 2.0), ("dnc", 2.0), ("comirec-sa", 2.0), ("mind", 1.5)]
)
def test_default_regime_learns_well_beyond_popularity(tiny_data, tmp_path, variant, margin):
    """The default regime (small model) must learn: ``margin`` x the popularity baseline.

    Measured: popularity 0.107, sasrec 0.41 and dnc 0.35 at Recall@10 after 180 steps, mind
    0.18 (it learns slowest, docs/multi-interest.md); a model that learns nothing sits at or
    below popularity.
    """
    config = make_train_config(
        tiny_data, str(tmp_path), variant, model_overrides=dict(embedding_dim=16, max_len=10,
        num_blocks=1), epochs=6, steps_per_epoch=30, batch_size=32, eval_users=None,
        eval_m=(10,), min_steps=0,
    )  # fmt: skip
    history = train(config, verbose=0).history
    popularity = popularity_recall(tiny_data, 10)
    best = max(e["val_recall@10"] for e in history)
    assert best >= margin * popularity, (history, popularity)
