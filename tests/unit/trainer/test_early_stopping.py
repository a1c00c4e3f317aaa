"""Early stopping waits ``min_steps`` optimizer steps, however short an epoch is."""

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from trainer.config import TrainConfig
from trainer.train import early_stopping_start


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
