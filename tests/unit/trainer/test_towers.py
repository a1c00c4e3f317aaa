"""Tests of trainer.towers and trainer.mmoe (small dims, CPU, a few seconds)."""

import math

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from trainer.config import ModelConfig
from trainer.mmoe import BlockStack, MMoE, TransformerBlock, causal_attention_mask
from trainer.towers import (
    IntentHead,
    ItemEmbedding,
    ItemTower,
    MFUserTower,
    SASRecEncoder,
    build_item_tower,
    build_user_tower,
)

NUM_ITEMS, DIM, MAX_LEN, K = 30, 8, 12, 3
CONDITIONINGS = ("none", "hadamard", "concat", "mmoe")
HISTORY = np.array([[0, 0, 0, 5, 9, 2, 7, 1], [3, 4, 5, 6, 7, 8, 9, 10]], np.int32)


def make_encoder(conditioning, dropout=0.0, randomize=True, seed=0, **kwargs):
    tf.keras.utils.set_random_seed(seed)
    encoder = SASRecEncoder(
        num_items=NUM_ITEMS,
        dim=DIM,
        max_len=MAX_LEN,
        num_blocks=2,
        num_heads=2,
        dropout=dropout,
        conditioning=conditioning,
        num_tasks=K,
        num_experts=2,
        **kwargs,
    )
    if randomize and conditioning == "hadamard":  # prompts start at ones: make tasks differ
        encoder.task_prompts.assign(np.random.default_rng(seed).normal(1.0, 0.5, [K, DIM]))
    return encoder


def tasks(value, batch=2):
    return tf.fill([batch], value)


def test_item_embedding_pads_with_zero_and_tower_shares_table():
    table = ItemEmbedding(NUM_ITEMS, DIM)
    vectors = table(tf.constant([[0, 1, NUM_ITEMS]])).numpy()
    np.testing.assert_array_equal(vectors[0, 0], 0.0)
    np.testing.assert_allclose(vectors[0, 2], table.embeddings.numpy()[NUM_ITEMS])
    shared = ItemTower(NUM_ITEMS, DIM, item_embedding=table)
    assert shared.item_embedding is table
    assert shared.candidates().shape == (NUM_ITEMS, DIM)
    separate = ItemTower(NUM_ITEMS, DIM, item_embedding=table, share_embeddings=False)
    assert separate.item_embedding is not table
    encoder = build_user_tower(ModelConfig(embedding_dim=DIM), "hadamard", NUM_ITEMS, K, table)
    assert encoder.item_embedding is table
    tower = build_item_tower(ModelConfig(embedding_dim=DIM), NUM_ITEMS, table)
    assert tower.item_embedding is table
    with pytest.raises(ValueError, match="expected 31 x 8"):
        ItemTower(31, DIM, item_embedding=table)


def test_cluster_embeddings_add_the_cluster_vector_and_round_trip():
    rng = np.random.default_rng(3)
    item_cluster = np.concatenate([[-1], rng.integers(0, K, NUM_ITEMS)])
    table = ItemEmbedding(NUM_ITEMS, DIM, item_cluster=item_cluster, num_clusters=K)
    np.testing.assert_array_equal(table.cluster_embeddings.numpy(), 0.0)  # starts plain
    table.cluster_embeddings.assign(rng.normal(size=(K, DIM)))
    ids = np.array([[0, 1, 5, NUM_ITEMS]])
    expected = (
        table.embeddings.numpy()[ids]
        + table.cluster_embeddings.numpy()[np.maximum(item_cluster[ids], 0)]
    )
    expected[0, 0] = 0.0  # PAD_ID
    np.testing.assert_allclose(table(tf.constant(ids)).numpy(), expected, rtol=1e-6)
    tower = ItemTower(NUM_ITEMS, DIM, item_embedding=table)
    np.testing.assert_allclose(tower.candidates().numpy(), table(tf.range(1, NUM_ITEMS + 1)))
    clone = ItemEmbedding.from_config(table.get_config())
    assert clone.get_config() == table.get_config()
    clone.set_weights(table.get_weights())
    np.testing.assert_allclose(clone(tf.constant(ids)).numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="below num_clusters=2"):
        ItemEmbedding(NUM_ITEMS, DIM, item_cluster=item_cluster, num_clusters=2)


def test_hadamard_inputs_equal_numpy_product():
    encoder = make_encoder("hadamard")
    task = np.array([1, K], np.int32)
    got = encoder.input_embeddings(HISTORY, task, training=False).numpy()
    emb = encoder.item_embedding.embeddings.numpy()
    prompts = np.concatenate([encoder.task_prompts.numpy(), np.ones([1, DIM])])
    assert np.any(prompts[1] != 1.0)
    valid = HISTORY != 0
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    want = emb[HISTORY] * prompts[task][:, None, :] * math.sqrt(DIM)
    want = (want + encoder.position_embeddings.numpy()[positions]) * valid[..., None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(encoder.prompts.numpy()[K], 1.0)
    assert encoder.prompts.shape == (K + 1, DIM)


@pytest.mark.parametrize("conditioning", ["hadamard", "concat"])
def test_no_task_equals_unconditioned_sasrec_with_same_weights(conditioning, tmp_path):
    encoder = make_encoder(conditioning)
    plain = make_encoder("none", seed=1)
    encoder((HISTORY, tasks(0)))
    plain((HISTORY, tasks(0)))
    path = tf.train.Checkpoint(encoder=encoder).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(encoder=plain).read(path).expect_partial()
    want = plain.encode_sequence(HISTORY).numpy()
    got = encoder.encode_sequence(HISTORY, tasks(K)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(encoder(HISTORY).numpy(), want[:, -1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(encoder.encode_sequence(HISTORY, tasks(0)).numpy(), want, atol=1e-4)


def test_concat_adds_exactly_one_token():
    encoder = make_encoder("concat")
    length = HISTORY.shape[1]
    for task in (0, K):
        assert encoder.input_embeddings(HISTORY, tasks(task)).shape == (2, length + 1, DIM)
        assert encoder.encode_sequence(HISTORY, tasks(task)).shape == (2, length, DIM)
        full = encoder.encode_sequence(HISTORY, tasks(task), keep_prompt=True)
        assert full.shape == (2, length + 1, DIM)
    # The NO_TASK prompt slot is masked like padding: zero input and zero output.
    np.testing.assert_array_equal(encoder.input_embeddings(HISTORY, tasks(K))[:, 0], 0.0)
    np.testing.assert_array_equal(full[:, 0], 0.0)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_causality(conditioning):
    encoder = make_encoder(conditioning)
    j = 5
    changed = HISTORY.copy()
    changed[:, j] = (changed[:, j] % NUM_ITEMS) + 1
    task = np.array([0, 2], np.int32)
    before = encoder.encode_sequence(HISTORY, task).numpy()
    after = encoder.encode_sequence(changed, task).numpy()
    np.testing.assert_allclose(before[:, :j], after[:, :j], rtol=1e-5, atol=1e-6)
    assert not np.allclose(before[:, j:], after[:, j:], atol=1e-4)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_padding_invariance_and_prefix_consistency(conditioning):
    encoder = make_encoder(conditioning)
    task = np.array([1, K], np.int32)
    padded = np.concatenate([np.zeros([2, 4], np.int32), HISTORY], axis=1)
    np.testing.assert_allclose(
        encoder((HISTORY, task)).numpy(), encoder((padded, task)).numpy(), rtol=1e-5, atol=1e-5
    )
    sequence = encoder.encode_sequence(HISTORY, task).numpy()
    np.testing.assert_array_equal(sequence[0, :3], 0.0)  # padded positions are zero
    i = 5  # output at position i == output for the history cut after i (left-padded)
    prefix = np.concatenate(
        [np.zeros([2, HISTORY.shape[1] - i - 1], np.int32), HISTORY[:, : i + 1]], 1
    )
    np.testing.assert_allclose(
        sequence[:, i], encoder((prefix, task)).numpy(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_tasks_change_the_output_unless_unconditioned(conditioning):
    encoder = make_encoder(conditioning)
    outputs = [encoder((HISTORY, tasks(t))).numpy() for t in range(K + 1)]
    for other in outputs[1:]:
        if conditioning == "none":
            np.testing.assert_array_equal(outputs[0], other)
        else:
            assert not np.allclose(outputs[0], other, atol=1e-4)


def test_dropout_only_in_training():
    encoder = make_encoder("hadamard", dropout=0.5)
    a = encoder((HISTORY, tasks(0)), training=False).numpy()
    np.testing.assert_array_equal(a, encoder((HISTORY, tasks(0))).numpy())
    assert not np.allclose(a, encoder((HISTORY, tasks(0)), training=True).numpy())


def test_prompt_gradient_reaches_only_the_used_task():
    encoder = make_encoder("hadamard")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(encoder((HISTORY, tasks(1))) ** 2)
    grad = tape.gradient(loss, encoder.task_prompts)
    grad = tf.convert_to_tensor(grad).numpy()
    assert np.any(grad[1] != 0)
    np.testing.assert_array_equal(grad[[0, 2]], 0.0)


def test_intent_head_and_gates_are_distributions():
    probs = IntentHead(K)(tf.random.normal([4, DIM])).numpy()
    assert probs.shape == (4, K)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    encoder = make_encoder("mmoe")
    gates = encoder.gate_weights(HISTORY, np.array([0, K], np.int32)).numpy()
    assert gates.shape == (2, HISTORY.shape[1], 2)
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
    assert np.all(gates >= 0)


def test_mf_user_tower():
    tower = MFUserTower(5, DIM)
    vectors = tower(tf.constant([0, 4, -1])).numpy()
    assert vectors.shape == (3, DIM)
    np.testing.assert_array_equal(vectors[2], 0.0)  # OOV_INDEX
    assert np.any(vectors[0] != vectors[1])


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="'gru'"):
        SASRecEncoder(NUM_ITEMS, DIM, conditioning="gru", num_tasks=K)
    with pytest.raises(ValueError, match="num_tasks >= 1, got 0"):
        SASRecEncoder(NUM_ITEMS, DIM, conditioning="hadamard", num_tasks=0)
    with pytest.raises(ValueError, match="num_items or item_embedding"):
        SASRecEncoder(dim=DIM)
    with pytest.raises(ValueError, match="exceeds max_len 12"):
        make_encoder("none")(np.ones([1, MAX_LEN + 1], np.int32))
    with pytest.raises(ValueError, match="has no Hadamard prompts"):
        _ = make_encoder("concat").prompts
    with pytest.raises(ValueError, match="has no MMoE gates"):
        make_encoder("none").gate_weights(HISTORY)
    with pytest.raises(ValueError, match="num_heads 3"):
        TransformerBlock(DIM, num_heads=3)


def _all_layers():
    table = ItemEmbedding(NUM_ITEMS, DIM)
    layers = [
        table,
        ItemTower(NUM_ITEMS, DIM, item_embedding=table),
        TransformerBlock(DIM, 2, 0.1),
        BlockStack(DIM, 3, 2, 0.1),
        MMoE(DIM, K, 3, 1, 2, 0.1),
        IntentHead(K),
        MFUserTower(7, DIM),
    ]
    return layers + [make_encoder(c, dropout=0.1) for c in CONDITIONINGS]


def test_config_round_trip_for_every_layer():
    for layer in _all_layers():
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config, type(layer).__name__
        restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
        assert type(restored) is type(layer)


def _wrap(encoder):
    history = tf.keras.Input([None], dtype=tf.int32, name="history")
    task = tf.keras.Input([], dtype=tf.int32, name="task")
    return tf.keras.Model([history, task], encoder((history, task)))


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_save_weights_into_rebuilt_model(conditioning, tmp_path):
    encoder = make_encoder(conditioning, dropout=0.2)
    model = _wrap(encoder)
    task = np.array([0, K], np.int32)
    want = model([HISTORY, task]).numpy()
    model.save_weights(str(tmp_path / "weights"))
    rebuilt = _wrap(SASRecEncoder.from_config(encoder.get_config()))
    assert not np.allclose(rebuilt([HISTORY, task]).numpy(), want)
    rebuilt.load_weights(str(tmp_path / "weights")).assert_consumed()
    np.testing.assert_allclose(rebuilt([HISTORY, task]).numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("conditioning", ["hadamard", "mmoe"])
def test_saved_model_round_trip(conditioning, tmp_path):
    encoder = make_encoder(conditioning, dropout=0.2)
    module = tf.Module()
    module.encoder = encoder
    module.serve = tf.function(
        lambda history, task: {"user": encoder((history, task), training=False)},
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="history"),
            tf.TensorSpec([None], tf.int32, name="task"),
        ],
    )
    task = np.array([2, K], np.int32)
    want = encoder((HISTORY, task)).numpy()
    tf.saved_model.save(
        module, str(tmp_path / "saved"), signatures={"serving_default": module.serve}
    )
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    got = loaded.signatures["serving_default"](history=tf.constant(HISTORY), task=tf.constant(task))
    np.testing.assert_allclose(got["user"].numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        loaded.serve(HISTORY, task)["user"].numpy(), want, rtol=1e-5, atol=1e-6
    )


def test_causal_attention_mask():
    valid = tf.constant([[False, True, True]])
    mask = causal_attention_mask(valid).numpy()[0]
    want = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1]], bool)
    np.testing.assert_array_equal(mask, want)
