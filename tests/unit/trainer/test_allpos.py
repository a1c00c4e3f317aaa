"""All-position training: windows, per-position outputs == per-prefix outputs, full softmax."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from trainer import data, sequence_data
from trainer.config import VARIANTS, ModelConfig
from trainer.losses import FullSoftmaxLoss
from trainer.model import RetrievalModel

N, K, L = 30, 3, 6
RNG = np.random.default_rng(0)
ITEM_CLUSTER = np.concatenate([[-1], RNG.integers(0, K, size=N)]).astype(np.int32)
SMALL = ModelConfig(embedding_dim=8, max_len=L, num_blocks=2, num_heads=2, dropout=0.0)


@pytest.mark.parametrize("n", [1, 2, 5, L + 1, L + 2, 3 * L + 4])
def test_windows_cover_every_target_once_with_its_causal_history(n):
    items = np.arange(1, n + 1, dtype=np.int32) * 3 % 97 + 1
    clusters = items % K
    w = {k: v.numpy() for k, v in sequence_data.sequence_windows(items, clusters, L).items()}
    mask = w[data.MASK].astype(bool)
    targets = w[data.TARGET][mask]
    assert sorted(targets.tolist()) == sorted(items[1:].tolist())
    assert (w[data.TARGET_CLUSTER][mask] == targets % K).all()
    assert (w[data.TARGET][~mask] == 0).all()
    prefixes = data.prefix_windows(items, L).numpy()
    for r, j in zip(*np.nonzero(mask), strict=True):
        t = int(np.nonzero(items == w[data.TARGET][r, j])[0][0])
        seen = w[data.HISTORY][r, : j + 1]
        seen = seen[seen != 0]
        np.testing.assert_array_equal(seen, items[t - len(seen) : t])  # causal, contiguous
        if n <= L + 1 or (r == 0 and j == L - 1):  # exactly the per-prefix history
            np.testing.assert_array_equal(seen, prefixes[t - 1][prefixes[t - 1] != 0])


def _model(variant, loss="bce", intent_encoder="pooled", config=SMALL):
    return RetrievalModel(
        VARIANTS[variant],
        config,
        num_items=N,
        num_clusters=K,
        num_users=5,
        loss=loss,
        intent_encoder=intent_encoder,
        item_cluster=ITEM_CLUSTER,
    )


def _random_batch(b=5):
    history = RNG.integers(1, N + 1, size=(b, L)).astype(np.int32)
    for r, pad in enumerate([0, 2, L - 1, 1, 3][:b]):
        history[r, :pad] = 0  # left padding
    mask = (history != 0).astype(np.float32)
    target_cluster = np.where(mask > 0, RNG.integers(0, K, size=(b, L)), 0).astype(np.int32)
    return history, target_cluster, mask


def _vary_prompts(model):
    """Hadamard prompts start as ones: make them differ so that they matter."""
    prompts = model.user_tower.task_prompts
    prompts.assign(RNG.normal(1.0, 0.5, size=prompts.shape).astype(np.float32))
    return prompts


def _batch(history, target, target_cluster, mask):
    return {
        data.HISTORY: history,
        data.TARGET: target,
        data.TARGET_CLUSTER: target_cluster,
        data.MASK: mask,
        data.USER: np.zeros(len(history), np.int32),
    }


def _prefix(history_row, j):
    """History cut after position j, right-aligned to L."""
    out = np.zeros(L, np.int32)
    out[L - 1 - j :] = history_row[: j + 1]
    return out


OUTPUT_PROMPT = dataclasses.replace(SMALL, prompt_position="output")


@pytest.mark.parametrize(
    "variant,intent_encoder,config",
    [
        ("sasrec", "pooled", SMALL),
        ("dnc-naive", "pooled", SMALL),
        ("dnc", "pooled", SMALL),
        ("dnc", "pooled-clusters", SMALL),
        ("dnc", "pooled-clusters", OUTPUT_PROMPT),
        ("dnc", "tower", OUTPUT_PROMPT),
        ("dnc-concat", "tower", SMALL),
        ("dnc-mmoe", "pooled", SMALL),
    ],
)
def test_all_position_outputs_equal_per_prefix_outputs(variant, intent_encoder, config):
    model = _model(variant, intent_encoder=intent_encoder, config=config)
    if VARIANTS[variant].conditioning == "hadamard":
        _vary_prompts(model)
    history, target_cluster, mask = _random_batch()
    got = model.sequence_user_embeddings(history, target_cluster, mask).numpy()
    intent = model.sequence_intent(history).numpy()
    rows, cols = np.nonzero(mask)
    prefixes = np.stack([_prefix(history[r], j) for r, j in zip(rows, cols, strict=True)])
    conditioned = VARIANTS[variant].conditioning != "none"
    tasks = target_cluster[rows, cols] if conditioned else np.full(len(rows), K)
    want = model.user_embedding(prefixes, tasks).numpy()
    np.testing.assert_allclose(got[rows, cols], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[mask == 0], 0.0)
    np.testing.assert_allclose(
        intent[rows, cols], model.intent(prefixes).numpy(), rtol=1e-4, atol=1e-6
    )
    if conditioned:  # the prompt really matters: another cluster gives another output
        other = model.sequence_user_embeddings(history, (target_cluster + 1) % K, mask).numpy()
        assert not np.allclose(other[rows, cols], got[rows, cols])


@pytest.mark.parametrize(
    "variant,config",
    [("sasrec", SMALL), ("dnc", SMALL), ("dnc", OUTPUT_PROMPT), ("dnc-concat", SMALL)],
)
def test_trimming_shared_left_padding_changes_no_output_nor_the_loss(variant, config):
    model = _model(variant, loss="softmax", config=config)
    if VARIANTS[variant].conditioning == "hadamard":
        _vary_prompts(model)
    history, target_cluster, mask = _random_batch()
    history[:, :2], target_cluster[:, :2], mask[:, :2] = 0, 0, 0.0  # 2 padding columns
    target = np.where(mask > 0, RNG.integers(1, N + 1, size=history.shape), 0).astype(np.int32)
    batch = _batch(history, target, target_cluster, mask)
    trimmed = {k: np.asarray(v) for k, v in sequence_data.trim_padding(batch).items()}
    assert trimmed[data.HISTORY].shape == (len(history), L - 2)
    full = model.sequence_user_embeddings(history, target_cluster, mask).numpy()
    cut = model.sequence_user_embeddings(
        trimmed[data.HISTORY], trimmed[data.TARGET_CLUSTER], trimmed[data.MASK]
    ).numpy()
    np.testing.assert_allclose(cut, full[:, 2:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        model.sequence_intent(trimmed[data.HISTORY]).numpy(),
        model.sequence_intent(history).numpy()[:, 2:],
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        model.compute_loss(trimmed).numpy(), model.compute_loss(batch).numpy(), rtol=1e-5
    )


def test_length_buckets_budget_and_steps():
    buckets = sequence_data.LengthBuckets.for_budget(max_len=50, batch_size=128, num_buckets=5)
    assert buckets.widths == (10, 20, 30, 40, 50)
    assert buckets.batch_sizes == (640, 320, 213, 160, 128)
    lengths = np.array([1, 10, 11, 50, 50, 49])
    np.testing.assert_array_equal(buckets.bucket_of(lengths), [0, 0, 1, 4, 4, 4])
    assert buckets.steps_per_epoch(np.full(1280, 7)) == 2
    assert buckets.steps_per_epoch(np.full(256, 50)) == 2
    with pytest.raises(ValueError, match="window lengths"):
        buckets.bucket_of(np.array([51]))
    with pytest.raises(ValueError, match="ascending"):
        sequence_data.LengthBuckets((5, 5), (1, 1))


def _log_softmax_over(logits, allowed, target):
    z = np.where(allowed, logits, -np.inf)
    return z[np.arange(len(target)), target] - np.logaddexp.reduce(z, axis=-1)


def test_in_cluster_full_softmax_normalises_only_over_the_target_cluster():
    b = 7
    logits = tf.Variable(RNG.normal(size=(b, N + 1)).astype(np.float32))
    target = RNG.integers(1, N + 1, size=b).astype(np.int32)
    allowed = ITEM_CLUSTER[None, :] == ITEM_CLUSTER[target][:, None]
    with tf.GradientTape() as tape:
        loss = FullSoftmaxLoss()(logits, target, allowed)
    grad = tape.gradient(loss, logits).numpy()
    assert (grad[~allowed] == 0.0).all()  # exactly zero outside the target's cluster
    assert (np.abs(grad[allowed]) > 0).all()
    ref = -_log_softmax_over(logits.numpy(), allowed, target)
    np.testing.assert_allclose(loss.numpy(), ref.mean(), rtol=1e-5)
    per = FullSoftmaxLoss(reduction="none")(logits, target, allowed).numpy()
    np.testing.assert_allclose(per, ref, rtol=1e-5)


@pytest.mark.parametrize(
    "variant,scope,in_cluster",
    [
        ("dnc", "auto", True),
        ("sasrec", "auto", False),
        ("dnc", "all", False),
        ("sasrec", "cluster", True),
    ],
)
def test_model_softmax_loss_scope(variant, scope, in_cluster):
    model = RetrievalModel(
        VARIANTS[variant],
        SMALL,
        N,
        K,
        5,
        loss="softmax",
        item_cluster=ITEM_CLUSTER,
        softmax_scope=scope,
    )
    s = 9
    user = tf.constant(RNG.normal(size=(s, SMALL.embedding_dim)).astype(np.float32))
    target = RNG.integers(1, N + 1, size=s).astype(np.int32)
    cluster = ITEM_CLUSTER[target]
    table = model.item_embedding.embeddings
    with tf.GradientTape() as tape:
        loss = model._retrieval_loss(user, target, cluster, None, None, None)
    grad = tf.convert_to_tensor(tape.gradient(loss, table)).numpy()
    logits = user.numpy() @ table.numpy().T
    if in_cluster:
        allowed = ITEM_CLUSTER[None, :] == cluster[:, None]
    else:
        allowed = np.broadcast_to(np.arange(N + 1)[None, :] > 0, logits.shape)
    ref = -_log_softmax_over(logits, allowed, target).mean()
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-5)
    touched = np.abs(grad).sum(-1) > 0
    assert not touched[0]  # PAD never enters the softmax
    if in_cluster:
        np.testing.assert_array_equal(touched[1:], np.isin(ITEM_CLUSTER[1:], cluster))


def test_pooled_clusters_intent_reads_the_history_clusters():
    model = _model("dnc", intent_encoder="pooled-clusters")
    history, _, _ = _random_batch()
    before = model.intent(history).numpy()
    table = model.cluster_embedding.embeddings
    table.assign(table.numpy() + RNG.normal(size=table.shape).astype(np.float32))
    assert not np.allclose(model.intent(history).numpy(), before)
    with pytest.raises(ValueError, match="needs item_cluster"):
        RetrievalModel(VARIANTS["dnc"], SMALL, N, K, 5, intent_encoder="pooled-clusters")


def test_output_prompt_gates_the_unconditioned_output():
    """prompt_position=output: e_uk = SASRec(history) * t_k, NO_TASK = plain SASRec."""
    model = _model("dnc", config=OUTPUT_PROMPT)
    prompts = _vary_prompts(model)
    history, _, _ = _random_batch()
    plain = model.user_embedding(history, np.full(len(history), K)).numpy()
    for k in range(K):
        got = model.user_embedding(history, np.full(len(history), k)).numpy()
        np.testing.assert_allclose(got, plain * prompts.numpy()[k], rtol=1e-5, atol=1e-6)


def test_output_prompt_tower_intent_loss_equals_two_separate_passes():
    """The shared pass (output prompts + tower intent) gives the loss of separate passes."""
    model = _model("dnc", loss="softmax", intent_encoder="tower", config=OUTPUT_PROMPT)
    _vary_prompts(model)
    history, target_cluster, mask = _random_batch()
    target = np.where(mask > 0, RNG.integers(1, N + 1, size=history.shape), 0).astype(np.int32)
    target_cluster = np.where(mask > 0, ITEM_CLUSTER[np.maximum(target, 0)], 0).astype(np.int32)
    batch = _batch(history, target, target_cluster, mask)
    got = model.compute_loss(batch).numpy()
    user = model.sequence_user_embeddings(history, target_cluster, mask)
    intent = model.sequence_intent(history)
    where = np.argwhere(mask > 0)
    pick = lambda x: tf.gather_nd(x, where)  # noqa: E731
    want = model._retrieval_loss(
        pick(user), pick(target), pick(target_cluster), None, None, None
    ) + model.intent_weight * model.intent_loss(pick(intent), pick(target_cluster))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
