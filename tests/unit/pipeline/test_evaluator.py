"""The Evaluator's choice of the variant to serve, and the Pusher's wiring to it."""

import pytest

from pipeline.components import Pusher
from pipeline.config import PipelineConfig, from_dict
from pipeline.dag import create_pipeline
from pipeline.evaluator import choose_variant
from pipeline.metadata import ArtifactRef

KEY = "recall@50"


def test_best_is_the_best_servable_variant():
    recalls = {"mf": 0.9, "dnc": 0.30, "sasrec": 0.35}
    selection = choose_variant(recalls, "best", KEY)
    assert selection["chosen"] == selection["best"] == "sasrec"  # mf cannot be served
    assert selection["note"] is None
    assert choose_variant({"dnc": 0.3, "sasrec": 0.3}, "best", KEY)["chosen"] == "dnc"


def test_a_named_variant_is_kept_but_a_better_one_is_reported():
    selection = choose_variant({"dnc": 0.30, "sasrec": 0.35}, "dnc", KEY)
    assert selection["chosen"] == "dnc" and selection["best"] == "sasrec"
    assert "sasrec scores higher" in selection["note"]
    assert "0.3500 vs 0.3000" in selection["note"]
    assert choose_variant({"dnc": 0.40, "sasrec": 0.35}, "dnc", KEY)["note"] is None


@pytest.mark.parametrize(
    "recalls, requested, text",
    [({"mf": 0.5}, "best", "no servable"), ({"dnc": 0.3, "mf": 0.5}, "mf", "'mf'")],
)
def test_choose_variant_errors(recalls, requested, text):
    with pytest.raises(ValueError, match=text):
        choose_variant(recalls, requested, KEY)


def _config(**serving):
    raw = {"trainer": {"variants": ["dnc", "sasrec", "mf"]}, "serving": serving}
    return from_dict(PipelineConfig, raw)


def test_pusher_takes_every_servable_model_with_best_else_the_named_one():
    best = create_pipeline(_config()).node("Pusher")
    assert sorted(k for k in best.inputs if k.startswith("model_")) == ["model_dnc", "model_sasrec"]
    named = create_pipeline(_config(variant="sasrec")).node("Pusher")
    assert sorted(k for k in named.inputs if k.startswith("model_")) == ["model_sasrec"]
    evaluator = create_pipeline(_config()).node("Evaluator")
    assert evaluator.component.candidate == "best"
    assert {"model_dnc", "model_sasrec", "model_mf"} <= set(evaluator.inputs)


def test_pusher_pushes_the_blessed_variant():
    models = {
        "model_dnc": ArtifactRef("Model", "/m/dnc", "f-dnc", id=1),
        "model_sasrec": ArtifactRef("Model", "/m/sasrec", "f-sasrec", id=2),
    }

    def blessing(**properties):
        return {"blessing": ArtifactRef("ModelBlessing", "/b", "b", dict(properties), id=3)}

    chosen = Pusher.chosen_model({**models, **blessing(variant="sasrec")})
    assert chosen == ("sasrec", models["model_sasrec"])
    with pytest.raises(ValueError, match="another model"):
        Pusher.chosen_model({**models, **blessing(variant="dnc", model_fingerprint="f-x")})
    with pytest.raises(ValueError, match="'mf'"):
        Pusher.chosen_model({**models, **blessing(variant="mf")})
    # A blessing recorded before it named its variant, with the one model of that time.
    old = {"model_dnc": models["model_dnc"], **blessing()}
    assert Pusher.chosen_model(old) == ("dnc", models["model_dnc"])


def test_evaluator_and_pusher_export_with_the_evaluator_merge():
    config = from_dict(PipelineConfig, {"evaluator": {"merge": "score", "alpha": 1.0}})
    pipeline = create_pipeline(config)
    pusher = pipeline.node("Pusher").component
    assert (pusher.merge, pusher.alpha) == ("score", 1.0)
    assert pipeline.node("Evaluator").component.section.merge == "score"
