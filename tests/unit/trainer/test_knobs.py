"""trainer.knobs: one knob per TrainConfig/ModelConfig field, and configs built from them."""

import argparse
import dataclasses

import pytest

from trainer import knobs
from trainer.config import PRESETS, VARIANTS, ModelConfig, TrainConfig, make_train_config


def test_every_field_is_a_knob_or_named_as_not_one():
    names = {k.name for k in knobs.knobs()}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert train_fields - set(knobs.NOT_KNOBS) | model_fields == names
    assert set(knobs.NOT_KNOBS) <= train_fields
    assert {k.name for k in knobs.knobs() if k.model} == model_fields


def test_knobs_carry_type_help_and_choices():
    for k in knobs.knobs():
        assert k.help, f"{k.name} has no description in its class's Attributes: section"
        assert k.kind in knobs.KINDS
        assert k.flags[-1] == "--" + k.name.replace("_", "-")
        if k.kind == "str":
            assert k.choices, f"{k.name}: no {k.name.upper()}S constant in trainer.config"
    assert knobs.knob("embedding_dim").flags == ("--dim", "--embedding-dim")
    assert knobs.knob("embedding_dim").dest == "dim"
    assert knobs.knob("num_blocks").flags[0] == "--blocks"
    assert knobs.knob("num_heads").flags[0] == "--heads"
    assert knobs.knob("share_item_embeddings").negation == "--separate-item-embeddings"
    assert knobs.knob("eval_users").optional and knobs.knob("steps_per_epoch").optional
    assert knobs.knob("eval_m").kind == "ints"
    assert knobs.knob("loss").choices == ("bce", "sampled-softmax", "softmax")
    with pytest.raises(ValueError, match="'nope'"):
        knobs.knob("nope")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("preset", PRESETS)
def test_no_values_is_the_regime(variant, preset):
    assert knobs.build_config("d", "o", variant, preset) == make_train_config(
        "d", "o", variant, preset
    )
    unset = {k.name: None for k in knobs.knobs()}
    assert knobs.build_config("d", "o", variant, preset, unset) == make_train_config(
        "d", "o", variant, preset
    )


def test_values_override_the_regime_and_none_is_explicit():
    config = knobs.build_config(
        "d", "o", "dnc", "paper", {"embedding_dim": 24, "loss": "softmax", "eval_users": "none"}
    )
    assert config.model.embedding_dim == 24 and config.model.max_len == 200
    assert config.loss == "softmax" and config.training == "prefix"
    assert config.eval_users is None
    assert knobs.config_values(config)["eval_users"] == knobs.NONE
    back = knobs.build_config("d", "o", "dnc", "paper", knobs.config_values(config))
    assert back == config


@pytest.mark.parametrize(
    "values, text",
    [
        ({"embeddingdim": 3}, "embeddingdim"),
        ({"epochs": "none"}, "epochs"),
        ({"loss": "hinge"}, "hinge"),
        ({"num_heads": 3}, "divisible"),
    ],
)
def test_bad_values_raise_naming_them(values, text):
    with pytest.raises(ValueError, match=text):
        knobs.build_config("d", "o", "dnc", "default", values)


def test_parse_and_convert():
    epochs, eval_m, users = knobs.knob("epochs"), knobs.knob("eval_m"), knobs.knob("eval_users")
    assert epochs.parse("7") == 7 and eval_m.parse("5,10") == (5, 10)
    assert users.parse("none") == knobs.NONE and users.parse("All") == knobs.NONE
    with pytest.raises(argparse.ArgumentTypeError, match="'seven'"):
        epochs.parse("seven")
    assert epochs.convert(7, "trainer.epochs") == 7 and epochs.convert(None, "k") is None
    assert knobs.knob("dropout").convert(0, "k") == 0.0
    assert eval_m.convert([5, 10], "k") == (5, 10)
    assert users.convert("none", "k") == knobs.NONE
    for k, bad in ((epochs, 7.5), (epochs, True), (eval_m, []), (knobs.knob("loss"), "hinge")):
        with pytest.raises(ValueError, match="trainer.x"):
            k.convert(bad, "trainer.x")


def test_regime_help_shows_both_presets():
    text = knobs.regime_help("num_negatives")
    assert text == "regime: default: 128; paper: 1"
    assert knobs.regime_help("loss").endswith("softmax for dnc; paper: bce")
    assert "pooled for mf/sasrec/sasrec-mixed" in knobs.regime_help("intent_encoder")
    assert knobs.common_default("max_len") == 50 and knobs.common_default("max_len", "paper") == 200
    with pytest.raises(ValueError, match="intent_encoder"):
        knobs.common_default("intent_encoder")


def test_add_arguments_defaults_to_unset():
    parser = argparse.ArgumentParser()
    knobs.add_arguments(parser)
    args = parser.parse_args([])
    assert all(v is None for v in knobs.values_from_args(args).values())
    args = parser.parse_args(["--dim", "24", "--separate-item-embeddings", "--eval-m", "5"])
    values = knobs.values_from_args(args)
    assert values["embedding_dim"] == 24 and values["share_item_embeddings"] is False
    assert values["eval_m"] == (5,)
    assert parser.parse_args(["--embedding-dim", "24"]).dim == 24
    assert parser.parse_args(["--share-item-embeddings"]).share_item_embeddings is True


def test_old_model_json_configs_still_load():
    from trainer.train import config_from_json

    # A model.json of an older version: none of the later fields, one since removed.
    old = {
        "data": "d",
        "output": "o",
        "variant": "dnc",
        "model": {"embedding_dim": 16, "max_len": 10, "num_blocks": 1, "num_heads": 1},
        "loss": "bce",
        "num_negatives": 1,
        "epochs": 1,
        "batch_size": 32,
        "learning_rate": 0.001,
        "eval_m": [5, 10],
        "eval_users": 40,
        "patience": 3,
        "seed": 42,
        "retired_field": 1,
    }
    config = config_from_json(old)
    # Missing fields are the dataclass defaults (what those models were trained with),
    # not a regime.
    assert config == TrainConfig(
        data="d",
        output="o",
        variant="dnc",
        model=ModelConfig(embedding_dim=16, max_len=10, num_blocks=1, num_heads=1),
        eval_m=(5, 10),
        eval_users=40,
        epochs=1,
        batch_size=32,
    )
    current = make_train_config("d", "o", "dnc-mmoe", eval_users=None)
    assert config_from_json(dataclasses.asdict(current)) == current
