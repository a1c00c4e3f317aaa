"""Every cluster's user vector at once, from one tower pass where the model allows it."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from tests.unit.trainer.test_allpos import (
    OUTPUT_PROMPT,
    SMALL,
    K,
    _model,
    _random_batch,
    _vary_prompts,
)

ADAPTER = dataclasses.replace(OUTPUT_PROMPT, prompt_rank=2)


def _one_task_at_a_time(model, history, rows):
    """[B, rows, d] from ``user_embedding``, one call per task."""
    b = len(history)
    return np.stack(
        [model.user_embedding(history, np.full(b, task, np.int32)).numpy() for task in range(rows)],
        axis=1,
    )


@pytest.mark.parametrize(
    "variant,config,shares",
    [
        ("dnc", OUTPUT_PROMPT, True),  # Hadamard on the output: one pass, gated K times
        ("dnc", ADAPTER, True),  # ... with the per-cluster adapter
        ("dnc", SMALL, False),  # Hadamard on the input: one pass per cluster
        ("dnc-concat", SMALL, False),
        ("dnc-naive", SMALL, True),  # no prompt: the same vector for every cluster
    ],
)
@pytest.mark.parametrize("with_plain", [False, True])
def test_every_cluster_equals_one_task_at_a_time(variant, config, shares, with_plain):
    model = _model(variant, config=config)
    if model.conditioned and model.variant.conditioning == "hadamard":
        _vary_prompts(model)
    if config.prompt_rank:
        up = model.user_tower.adapter_up
        up.assign(np.random.default_rng(1).normal(size=up.shape).astype(np.float32))
    assert model.shares_tower_pass is shares
    history, _, _ = _random_batch()
    rows = K + 1 if with_plain else K
    got = model.cluster_user_embeddings(history, with_plain=with_plain).numpy()
    assert got.shape == (len(history), rows, config.embedding_dim)
    want = _one_task_at_a_time(model, history, rows)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if shares and model.conditioned:
        # The clusters really differ (else the gating would go untested).
        assert np.abs(want[:, 0] - want[:, 1]).max() > 1e-3
    if shares:
        # Given the pass, the tower does not run again: the same vectors.
        h = model.unprompted_embedding(history)
        again = model.cluster_user_embeddings(history, with_plain=with_plain, unprompted=h)
        np.testing.assert_allclose(again.numpy(), got, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("intent_encoder", ["implied", "tower", "pooled"])
def test_intent_from_the_callers_pass_equals_its_own(intent_encoder):
    model = _model("dnc", intent_encoder=intent_encoder, config=OUTPUT_PROMPT)
    _vary_prompts(model)
    history, _, _ = _random_batch()
    h = model.unprompted_embedding(history)
    np.testing.assert_allclose(
        model.intent(history, unprompted=h).numpy(),
        model.intent(history).numpy(),
        rtol=1e-6,
        atol=1e-7,
    )
    if intent_encoder != "pooled":
        # The tower-reading intents really use the given pass.
        other = model.intent(history, unprompted=tf.zeros_like(h)).numpy()
        assert np.abs(other - model.intent(history).numpy()).max() > 1e-4
