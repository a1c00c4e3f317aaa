"""Early stopping and the learning-rate decay wait ``min_steps`` optimizer steps, however
short an epoch is."""

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from trainer.config import TrainConfig
from trainer.train import ReduceLROnPlateauFrom, early_stopping_start, mean_recall


@pytest.mark.parametrize(
    "min_steps,steps,start", [(1000, 9, 112), (1000, 176, 6), (1000, 1000, 1), (0, 50, 0)]
)
def test_start_epoch_covers_min_steps(min_steps, steps, start):
    assert early_stopping_start(min_steps, steps) == start
    assert start * steps >= min_steps


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        early_stopping_start(10, 0)
    with pytest.raises(ValueError, match="min_steps"):
        TrainConfig(data="d", output="o", min_steps=-1)


def test_keras_early_stopping_ignores_a_stall_before_the_start_epoch():
    """The warm-up the start epoch buys: a stall in epochs 0-3 does not stop training."""
    callback = tf.keras.callbacks.EarlyStopping(
        monitor="r", mode="max", patience=1, start_from_epoch=early_stopping_start(40, 10)
    )
    model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
    model.build((None, 1))
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, value in enumerate([0.3, 0.2, 0.1, 0.1, 0.5, 0.4, 0.3]):
        callback.on_epoch_end(epoch, {"r": value})
        if model.stop_training:
            break
    assert epoch == 5 and np.isclose(callback.best, 0.5)


def test_the_monitor_is_the_mean_recall_over_the_list_sizes():
    assert mean_recall({20: 0.5035, 50: 0.7315}) == pytest.approx(0.6175)
    with pytest.raises(ValueError, match="at least one"):
        mean_recall({})


def test_the_mean_monitor_keeps_training_while_one_list_size_stalls():
    """The ML-1M-sized case: R@20 flat for three epochs, R@50 still rising."""
    r20, r50 = [0.49, 0.5035, 0.5035, 0.5035, 0.5035], [0.69, 0.709, 0.7185, 0.7205, 0.7315]
    stops = {}
    for name, series in {
        "r20": r20,
        "mean": [mean_recall({20: a, 50: b}) for a, b in zip(r20, r50, strict=True)],
    }.items():
        callback = tf.keras.callbacks.EarlyStopping(monitor="r", mode="max", patience=3)
        model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
        model.build((None, 1))
        callback.set_model(model)
        callback.on_train_begin()
        for epoch, value in enumerate(series):
            callback.on_epoch_end(epoch, {"r": value})
        stops[name] = model.stop_training
    assert stops == {"r20": True, "mean": False}


def _lr_after(callback, values):
    model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
    model.build((None, 1))
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=0.004), loss="mse")
    callback.set_model(model)
    callback.on_train_begin()
    rates = []
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {"r": value})
        rates.append(float(tf.keras.backend.get_value(model.optimizer.learning_rate)))
    return rates


def test_lr_decay_halves_the_rate_after_each_epoch_without_improvement():
    callback = ReduceLROnPlateauFrom(0, monitor="r", mode="max", factor=0.5, patience=1)
    rates = _lr_after(callback, [0.3, 0.4, 0.35, 0.38, 0.5, 0.2])
    assert rates == pytest.approx([0.004, 0.004, 0.002, 0.001, 0.001, 0.0005])


def test_lr_decay_ignores_a_stall_before_the_start_epoch():
    """The same stall as early stopping's: epochs 0-3 do not cut the rate."""
    callback = ReduceLROnPlateauFrom(
        early_stopping_start(40, 10), monitor="r", mode="max", factor=0.5, patience=1
    )
    rates = _lr_after(callback, [0.3, 0.2, 0.1, 0.1, 0.5, 0.4])
    assert rates == pytest.approx([0.004] * 5 + [0.002])


@pytest.mark.parametrize("factor", [0.0, -0.5, 1.5])
def test_lr_decay_outside_0_1_is_rejected(factor):
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(data="d", output="o", lr_decay=factor)


def test_lr_decay_logs_the_rate_of_every_epoch_in_a_real_fit():
    """History rows stay aligned: the rate is logged before the start epoch too."""
    model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=0.004), loss="mse")
    x = np.ones((8, 1), np.float32)
    callback = ReduceLROnPlateauFrom(2, monitor="loss", mode="min", factor=0.5, patience=1)
    fit = model.fit(x, x, epochs=4, verbose=0, callbacks=[callback])
    assert len(fit.history["lr"]) == len(fit.history["loss"]) == 4
    assert fit.history["lr"][0] == pytest.approx(0.004)
