"""Tests of the output prompt's per-cluster low-rank adapter (``prompt_rank``)."""

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from trainer.config import ModelConfig
from trainer.towers import SASRecEncoder, build_user_tower

NUM_ITEMS, DIM, MAX_LEN, K, RANK = 30, 8, 12, 3, 2
HISTORY = np.array([[0, 0, 0, 5, 9, 2, 7, 1], [3, 4, 5, 6, 7, 8, 9, 10]], np.int32)


def make_encoder(rank=RANK, seed=0, randomize=True):
    tf.keras.utils.set_random_seed(seed)
    encoder = SASRecEncoder(
        num_items=NUM_ITEMS, dim=DIM, max_len=MAX_LEN, num_blocks=1, num_heads=2,
        dropout=0.0, conditioning="hadamard", num_tasks=K, prompt_position="output",
        prompt_rank=rank,
    )  # fmt: skip
    encoder(HISTORY)  # builds the blocks
    rng = np.random.default_rng(seed)
    encoder.task_prompts.assign(rng.normal(1.0, 0.5, [K, DIM]))
    if randomize and rank:  # the up-projection starts at zero: make the adapter act
        encoder.adapter_up.assign(rng.normal(0.0, 0.5, [K, rank, DIM]))
    return encoder


def test_adapter_equals_numpy_reference_and_no_task_is_unprompted():
    encoder = make_encoder()
    plain = encoder((HISTORY, tf.fill([2], K))).numpy()  # NO_TASK: no prompt, no adapter
    t = encoder.task_prompts.numpy()
    a, b = encoder.adapter_down.numpy(), encoder.adapter_up.numpy()
    for task in range(K):
        got = encoder((HISTORY, tf.fill([2], task))).numpy()
        want = plain * t[task] + plain @ a[task] @ b[task]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Per-position gating (training path) agrees with the last-position call for mixed tasks.
    task_grid = np.array([[0, 1, 2, 0, 1, 2, 0, 2], [2, 2, 1, 1, 0, 0, K, 1]], np.int32)
    h = encoder.encode_sequence(HISTORY)
    gated = encoder.gate_output(h, task_grid).numpy()
    want = h.numpy() * np.concatenate([t, np.ones([1, DIM])])[task_grid]
    up = np.concatenate([b, np.zeros([1, RANK, DIM])])
    down = np.concatenate([a, np.zeros([1, DIM, RANK])])
    want += np.einsum("bld,bldr,blre->ble", h.numpy(), down[task_grid], up[task_grid])
    np.testing.assert_allclose(gated, want, rtol=1e-5, atol=1e-6)


def test_zero_initialised_adapter_starts_as_the_hadamard_prompt():
    adapted = make_encoder(randomize=False)
    plain = make_encoder(rank=0)
    adapter = (adapted.adapter_down, adapted.adapter_up)
    shared = [v for v in adapted.weights if all(v is not a for a in adapter)]
    for mine, theirs in zip(plain.weights, shared, strict=True):  # same tower weights
        mine.assign(theirs)
    np.testing.assert_array_equal(adapted.adapter_up.numpy(), 0.0)
    for task in range(K + 1):
        tasks = tf.fill([2], task)
        np.testing.assert_allclose(
            adapted((HISTORY, tasks)).numpy(), plain((HISTORY, tasks)).numpy(), atol=1e-6
        )


def test_adapter_gradient_reaches_only_the_used_cluster():
    encoder = make_encoder()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(encoder((HISTORY, tf.fill([2], 1))))
    grads = tape.gradient(loss, [encoder.adapter_down, encoder.adapter_up])
    for grad in grads:
        grad = tf.convert_to_tensor(grad).numpy()
        assert np.abs(grad[1]).sum() > 0
        np.testing.assert_array_equal(grad[[0, 2]], 0.0)


def test_config_and_weights_round_trip(tmp_path):
    encoder = make_encoder()
    config = encoder.get_config()
    assert config["prompt_rank"] == RANK
    clone = SASRecEncoder.from_config(config)
    assert clone.get_config() == config
    clone(HISTORY)
    clone.set_weights(encoder.get_weights())
    tasks = tf.constant([0, 2])
    np.testing.assert_array_equal(clone((HISTORY, tasks)), encoder((HISTORY, tasks)))


def test_builder_passes_rank_only_to_prompted_towers():
    config = ModelConfig(embedding_dim=DIM, prompt_position="output", prompt_rank=4)
    assert build_user_tower(config, "hadamard", NUM_ITEMS, K).prompt_rank == 4
    assert build_user_tower(config, "none", NUM_ITEMS, 0).prompt_rank == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_rank": -1}, "prompt_rank must be >= 0"),
        ({"prompt_rank": 2, "prompt_position": "input"}, "needs the output Hadamard prompt"),
        ({"prompt_rank": 2, "conditioning": "mmoe"}, "needs the output Hadamard prompt"),
    ],
)
def test_invalid_rank_is_rejected(kwargs, message):
    args = dict(num_items=NUM_ITEMS, dim=DIM, conditioning="hadamard", num_tasks=K,
                prompt_position="output")  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SASRecEncoder(**args)
    with pytest.raises(ValueError, match="prompt_rank"):
        ModelConfig(prompt_rank=2, prompt_position="input")
