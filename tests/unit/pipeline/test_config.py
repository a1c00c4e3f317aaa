"""The pipeline config: defaults, descriptions, YAML/TOML loading, unknown keys."""

import dataclasses

import pytest

from pipeline.config import (
    PipelineConfig,
    demo_config,
    describe,
    from_dict,
    load_config,
    to_dict,
)
from pipeline.dag import create_pipeline


def test_every_field_has_a_default_and_a_description():
    described = describe()
    assert len(described) > 40
    missing = [key for key, (_, text) in described.items() if not text]
    assert missing == []
    assert described["trainer.model.max_len"][0] is None  # unset: the variant's regime
    assert "regime" in described["trainer.model.max_len"][1]
    assert describe(demo_config())["trainer.model.max_len"][0] == 50
    assert described["example_gen.synthetic.num_users"][0] == 1000


def test_defaults_are_the_demo():
    config = load_config(None)
    assert config == demo_config()
    assert config.trainer.variants == ("dnc", "sasrec")
    assert config.serving.variant == "best"
    # The demo's small, fast model is set explicitly; the rest is each variant's regime.
    dnc = config.trainer.train_config("dnc", "d", "o")
    assert (dnc.epochs, dnc.eval_users) == (2, 500)
    assert (dnc.model.embedding_dim, dnc.model.max_len, dnc.model.num_blocks) == (32, 50, 1)
    from trainer.config import make_train_config

    regime = make_train_config("d", "o", "dnc")
    assert (dnc.loss, dnc.training, dnc.num_negatives) == (
        regime.loss,
        regime.training,
        regime.num_negatives,
    )
    # A config file's unset knobs are the regime's, not the demo's.
    assert PipelineConfig().trainer.train_config("dnc", "d", "o") == regime
    assert config.transform.clustering.num_clusters == 8
    assert config.serving_dir.endswith("serving/dnc")
    assert config.beam.args()[0] == "--runner=DirectRunner"


def test_yaml_and_toml_give_the_same_config(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "root: /tmp/x\ntrainer:\n  epochs: 3\n  eval_m: [5, 10]\n  model:\n    max_len: 20\n"
        "beam:\n  options: ['--direct_num_workers=2']\n"
    )
    (tmp_path / "c.toml").write_text(
        'root = "/tmp/x"\n[trainer]\nepochs = 3\neval_m = [5, 10]\n[trainer.model]\nmax_len = 20\n'
        '[beam]\noptions = ["--direct_num_workers=2"]\n'
    )
    a, b = load_config(str(tmp_path / "c.yaml")), load_config(str(tmp_path / "c.toml"))
    assert a == b
    assert a.trainer.eval_m == (5, 10) and a.trainer.model.max_len == 20
    assert a.trainer.model.embedding_dim is None  # unset: the variant's regime
    assert a.trainer.train_config("dnc", "d", "o").model.embedding_dim == 100
    assert a.trainer.train_config("sasrec", "d", "o").model.embedding_dim == 50
    assert a.beam.args() == ("--runner=DirectRunner", "--direct_num_workers=2")


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"trainr": {}}, "'trainr'"),
        ({"trainer": {"epoch": 3}}, "'trainer.epoch'"),
        ({"example_gen": {"synthetic": {"users": 3}}}, "'example_gen.synthetic.users'"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(raw, key):
    with pytest.raises(ValueError, match=key):
        from_dict(PipelineConfig, raw)


@pytest.mark.parametrize(
    "raw, text",
    [
        ({"trainer": {"epochs": "three"}}, "trainer.epochs"),
        ({"trainer": {"variants": ["nope"]}}, "nope"),
        ({"serving": {"variant": "sasrec"}, "trainer": {"variants": ["dnc"]}}, "serving.variant"),
        ({"validation": {"on_anomalies": "ignore"}}, "on_anomalies"),
        ({"example_gen": {"source": "csv"}}, "example_gen.input"),
        ({"trainer": {"model": {"dropout": 2.0}}}, "dropout"),
        ({"trainer": {"loss": "hinge"}}, "trainer.loss: 'hinge'"),
        ({"trainer": {"preset": "fast"}}, "fast"),
        ({"trainer": {"epochs": "none"}}, "trainer.epochs"),
        ({"trainer": {"model": {"num_heads": 3}}}, "divisible"),
        ({"serving": {"variant": "nope"}}, "serving.variant 'nope'"),
        ({"trainer": {"variants": ["mf"]}}, "can be served"),
        ({"evaluator": {"merge": "max"}}, "evaluator.merge"),
    ],
)
def test_invalid_values_are_errors(raw, text):
    with pytest.raises(ValueError, match=text):
        from_dict(PipelineConfig, raw)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="yaml"):
        load_config(str(path))


def test_create_pipeline_is_pure_and_ordered(tmp_path):
    config = dataclasses.replace(PipelineConfig(), root=str(tmp_path / "never"))
    pipeline = create_pipeline(config)
    assert pipeline.node_ids == (
        "ExampleGen",
        "StatisticsGen",
        "SchemaGen",
        "ExampleValidator",
        "Transform",
        "Trainer.dnc",
        "Trainer.sasrec",
        "Evaluator",
        "Pusher",
    )
    assert not (tmp_path / "never").exists()
    assert to_dict(config)["trainer"]["variants"] == ["dnc", "sasrec"]


def test_beam_options_do_not_enter_the_cache_key():
    from pipeline.runner import cache_key

    a = create_pipeline(PipelineConfig()).node("Transform")
    other = dataclasses.replace(
        PipelineConfig(), beam=dataclasses.replace(PipelineConfig().beam, runner="FlinkRunner")
    )
    b = create_pipeline(other).node("Transform")
    assert cache_key(a, {}) == cache_key(b, {})
    changed = dataclasses.replace(
        PipelineConfig(),
        transform=dataclasses.replace(PipelineConfig().transform, num_shards=2),
    )
    assert cache_key(create_pipeline(changed).node("Transform"), {}) != cache_key(a, {})
