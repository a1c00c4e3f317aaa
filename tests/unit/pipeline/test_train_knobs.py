"""One definition of the training knobs: ``dnc train`` flags, the pipeline's ``trainer:``
section and the benchmarks all give the same TrainConfig (``make_train_config`` + knobs)."""

import os
import sys

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import ModelSection, PipelineConfig, TrainerSection, from_dict, load_config
from trainer import knobs
from trainer.cli import train_config
from trainer.config import VARIANTS, make_train_config

BASE = ["train", "--data", "d", "--output", "o"]
# Values the generic rule below would get wrong (constraints between fields).
_CHOSEN = {
    "embedding_dim": 24,
    "num_heads": 2,
    "dropout": 0.35,
    "mixed_ratio": 0.25,
    "lr_decay": 0.5,
}
# Flags a knob needs beside it when it is the only one given (dnc's default loss is the full
# in-cluster softmax, which draws no negatives to share).
_NEEDS = {"shared_negatives": ["--loss", "sampled-softmax"]}
# Knobs that cannot take a non-default value beside another knob's non-default value: the
# low-rank adapter needs the output prompt. In the all-knobs-at-once test such a knob keeps
# its default (the one-knob-at-a-time test covers it).
_CONFLICTS = {"prompt_rank": ("prompt_position", "input")}


def _parse(*flags):
    return build_parser().parse_args([*BASE, *flags])


def non_default(k, variant="dnc", preset="default"):
    """A valid value of knob ``k`` that differs from ``variant``'s ``preset`` regime."""
    regime = make_train_config("d", "o", variant, preset)
    current = getattr(regime.model if k.model else regime, k.name)
    if k.name in _CHOSEN:
        value = _CHOSEN[k.name]
    elif k.kind == "bool":
        value = not current
    elif k.kind == "str":
        value = next(c for c in k.choices if c != current)
    elif k.kind == "ints":
        value = tuple(x + 1 for x in current)
    elif k.kind == "int":
        value = (current or 0) + 3
    else:
        value = current + 0.5
    assert value != current, k.name
    return value


def cli_flags(k, value):
    if k.kind == "bool":
        return [k.flags[0] if value else "--no-" + k.flags[0][2:]]
    text = ",".join(map(str, value)) if k.kind == "ints" else str(value)
    return [k.flags[0], text]


def config_file_trainer(variant, preset, values):
    raw = {"variants": [variant], "preset": preset, "model": {}}
    for k in knobs.knobs():
        if k.name in values:
            value = list(values[k.name]) if k.kind == "ints" else values[k.name]
            (raw["model"] if k.model else raw)[k.name] = value
    return raw


def test_every_field_is_a_flag_and_a_config_key():
    section_keys = {f for f in TrainerSection.__dataclass_fields__}
    model_keys = {f for f in ModelSection.__dataclass_fields__}
    for k in knobs.knobs():
        assert k.name in (model_keys if k.model else section_keys), k.key
        value = non_default(k)
        config = train_config(_parse(*cli_flags(k, value), *_NEEDS.get(k.name, [])))
        got = getattr(config.model if k.model else config, k.name)
        assert got == value, k.flags
    # The fields that are not knobs: --data, --output, --variant; trainer.variants.
    config = train_config(_parse("--variant", "sasrec"))
    assert (config.data, config.output, config.variant) == ("d", "o", "sasrec")
    assert {"variants", "preset", "model"} <= section_keys


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_flags_is_the_variants_regime(variant):
    assert train_config(_parse("--variant", variant)) == make_train_config("d", "o", variant)
    section = from_dict(PipelineConfig, {"trainer": {"variants": [variant, "dnc"]}}).trainer
    assert section.train_config(variant, "d", "o") == make_train_config("d", "o", variant)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_preset_paper_is_the_papers_regime(variant):
    config = train_config(_parse("--variant", variant, "--preset", "paper"))
    assert config == make_train_config("d", "o", variant, "paper")
    assert (config.training, config.loss, config.num_negatives) == ("prefix", "bce", 1)
    assert config.model.max_len == 200


@pytest.mark.parametrize("variant", ["dnc", "sasrec"])
@pytest.mark.parametrize("preset", ["default", "paper"])
def test_config_file_and_cli_flags_give_the_same_config(tmp_path, variant, preset):
    values = {k.name: non_default(k, variant, preset) for k in knobs.knobs()}
    for name, (other, value) in _CONFLICTS.items():
        if values[other] == value:
            del values[name]
    given = [k for k in knobs.knobs() if k.name in values]
    flags = ["--variant", variant, "--preset", preset]
    for k in given:
        flags += cli_flags(k, values[k.name])
    from_cli = train_config(_parse(*flags))
    # Every knob given differs from the regime.
    regime = make_train_config("d", "o", variant, preset)
    for k in given:
        got = getattr(from_cli.model if k.model else from_cli, k.name)
        assert got == values[k.name] != getattr(regime.model if k.model else regime, k.name)
    path = tmp_path / "pipeline.yaml"
    raw = {"trainer": config_file_trainer(variant, preset, values)}
    path.write_text(yaml.safe_dump(raw))
    section = load_config(str(path)).trainer
    assert section.train_config(variant, "d", "o") == from_cli
    # And back: the section written out as plain data loads to the same config.
    from pipeline.config import to_dict

    again = from_dict(PipelineConfig, {"trainer": to_dict(section)}).trainer
    assert again == section


def test_explicit_none_and_aliases():
    config = train_config(_parse("--eval-users", "none", "--steps-per-epoch", "all"))
    assert config.eval_users is None and config.steps_per_epoch is None
    section = from_dict(PipelineConfig, {"trainer": {"eval_users": "none"}}).trainer
    assert section.train_config("dnc", "d", "o").eval_users is None
    assert make_train_config("d", "o", "dnc").eval_users is not None  # so none is explicit
    a = train_config(_parse("--dim", "24", "--blocks", "3", "--heads", "2"))
    b = train_config(_parse("--embedding-dim", "24", "--num-blocks", "3", "--num-heads", "2"))
    assert a == b and a.model.num_blocks == 3
    separate = train_config(_parse("--separate-item-embeddings"))
    assert separate == train_config(_parse("--no-share-item-embeddings"))
    assert not separate.model.share_item_embeddings


def test_invalid_flags_fail_in_parsing_or_in_the_config():
    with pytest.raises(SystemExit):
        _parse("--loss", "hinge")
    with pytest.raises(SystemExit):
        _parse("--epochs", "none")
    with pytest.raises(ValueError, match="divisible"):
        train_config(_parse("--heads", "3"))


def test_help_says_unset_flags_take_the_regime(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "--variant's regime under --preset" in text
    assert "[regime: default: 128; paper: 1]" in text
    for flag in ("--dim", "--blocks", "--heads", "--separate-item-embeddings", "--preset"):
        assert flag in text


def test_pipeline_trainer_component_uses_the_section():
    from pipeline.components import Trainer

    section = from_dict(PipelineConfig, {"trainer": {"epochs": 4}}).trainer
    trainer = Trainer("dnc", section)
    assert trainer.train_config("d", "o") == make_train_config("d", "o", "dnc", epochs=4)
    # The cache key holds the effective config: independent of the other variants.
    other = from_dict(PipelineConfig, {"trainer": {"epochs": 4, "variants": ["dnc"]}}).trainer
    assert Trainer("dnc", other).cache_config() == trainer.cache_config()
    assert Trainer("sasrec", section).cache_config() != trainer.cache_config()


def test_benchmarks_build_through_the_knobs():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench"))
    import argparse

    import quality

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    quality.add_model_arguments(parser)  # as bench/tune.py does
    args = parser.parse_args(["--dim", "24"])
    args.data, args.m = "d", (50,)
    config = quality._config(args, "dnc", "o", loss="bce")
    expected = make_train_config(
        "d", "o", "dnc", epochs=10, eval_m=(50,), loss="bce", model_overrides={"embedding_dim": 24}
    )
    assert config == expected


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--data", "d", "--model", "m"],
        ["export", "--data", "d", "--model", "m", "--output", "o"],
    ],
)
def test_evaluate_and_export_take_the_merge(command):
    assert build_parser().parse_args(command).merge is None  # selected on validation
    assert build_parser().parse_args([*command, "--merge", "score"]).merge == "score"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--merge", "max"])
