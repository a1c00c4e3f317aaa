"""Model components: Trainer (one per variant), Evaluator (choice, blessing) and Pusher."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from pipeline.components.base import Component, Output
from pipeline.config import EvaluatorSection, ServingSection, TrainerSection, to_dict
from pipeline.metadata import ArtifactRef, Metadata
from trainer.alpha import alpha_to_json

log = logging.getLogger(__name__)

BLESSED_FILE, NOT_BLESSED_FILE = "BLESSED", "NOT_BLESSED"
METRICS_FILE = "metrics.json"


@dataclasses.dataclass(frozen=True)
class Trainer(Component):
    """Trains one variant (``trainer.train``) on the transformed examples.

    Attributes:
        variant: the variant name.
        section: the training settings.
    """

    variant: str
    section: TrainerSection

    inputs: ClassVar[Dict[str, str]] = {"transformed_examples": "TransformedExamples"}
    outputs: ClassVar[Dict[str, str]] = {"model": "Model"}

    def train_config(self, data_dir: str, output: str) -> Any:
        """The ``TrainConfig`` of this trainer (the variant's regime + the set knobs)."""
        return self.section.train_config(self.variant, data_dir, output)

    def cache_config(self) -> Dict[str, Any]:
        # The effective config, not the section: an unset knob takes the regime that
        # trainer.config defines, so a change of the regime retrains, and a change of
        # trainer.variants does not retrain the other variants. The data-sized default
        # width and learning rate (trainer.sizing) follow the input, whose
        # fingerprint is part of the cache key.
        config = to_dict(self.train_config("", ""))
        del config["data"], config["output"]
        return {"variant": self.variant, "train_config": config}

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        from trainer.train import train

        config = self.train_config(inputs["transformed_examples"].uri, output_dirs["model"])
        result = train(config, verbose=0)
        last = result.history[-1] if result.history else {}
        key = f"val_recall@{config.eval_m[0]}"
        return {
            "model": Output(
                {"variant": self.variant, "epochs": len(result.history), key: last.get(key, 0.0)}
            )
        }


# --------------------------------------------------------------------------- Evaluator, Pusher


@dataclasses.dataclass(frozen=True)
class Evaluator(Component):
    """Evaluates every trained variant on validation and blesses the one to serve.

    The one to serve is ``serving.variant``, or with ``best`` the servable variant with
    the best validation Recall@M (``pipeline.evaluator.choose_variant``; the report and
    the log say when a named variant is not the best). It is compared with the
    currently pushed model (resolved from MLMD), both scored the same way
    (``pipeline.evaluator.compare_with_pushed``); it is blessed if Recall@M drops by at
    most ``tolerance``; with nothing pushed yet, if it beats popularity.

    Attributes:
        candidate: the variant to bless, or ``best``.
        variants: every trained variant (input keys ``model_<variant>``).
        section: M, tolerance, alpha, merge.
        index: the Pusher's index kind (a candidate exported for a comparison uses it).
    """

    candidate: str
    variants: Tuple[str, ...]
    section: EvaluatorSection
    index: str = "scann"

    inputs: ClassVar[Dict[str, str]] = {"transformed_examples": "TransformedExamples"}
    outputs: ClassVar[Dict[str, str]] = {
        "evaluation": "ModelEvaluation",
        "blessing": "ModelBlessing",
    }

    def resolve(self, metadata: Metadata, inputs: Mapping[str, ArtifactRef]) -> Dict[str, Any]:
        # This run's models are skipped, whichever gets chosen: one pushed by an earlier
        # run is not a baseline (and an unchanged rerun keeps its inputs: a cache hit).
        ours = {inputs[f"model_{v}"].fingerprint for v in self.variants}
        for pushed in reversed(metadata.artifacts_by_type("PushedModel")):
            if not pushed.properties.get("pushed") or not os.path.isdir(pushed.uri):
                continue
            if pushed.properties.get("model_fingerprint") in ours:
                continue
            return {"baseline_model": pushed}
        return {}

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        from pipeline.evaluator import evaluate_and_bless

        report = evaluate_and_bless(
            data_dir=inputs["transformed_examples"].uri,
            models={v: inputs[f"model_{v}"].uri for v in self.variants},
            requested=self.candidate,
            baseline_version_dir=(
                inputs["baseline_model"].uri if "baseline_model" in inputs else None
            ),
            section=self.section,
            export_options=export_options(self.index, self.section),
        )
        for key in ("evaluation", "blessing"):
            os.makedirs(output_dirs[key], exist_ok=True)
        with open(os.path.join(output_dirs["evaluation"], METRICS_FILE), "w") as f:
            json.dump(report, f, indent=2, sort_keys=True, default=str)
        blessed = bool(report["blessing"]["blessed"])
        marker = BLESSED_FILE if blessed else NOT_BLESSED_FILE
        with open(os.path.join(output_dirs["blessing"], marker), "w") as f:
            f.write(report["blessing"]["reason"] + "\n")
        chosen = report["candidate"]
        m = self.section.m
        return {
            "evaluation": Output(
                {"variant": chosen, f"recall@{m}": report["variants"][chosen][f"recall@{m}"]}
            ),
            "blessing": Output(
                {
                    "blessed": int(blessed),
                    "reason": report["blessing"]["reason"],
                    "variant": chosen,
                    "model_fingerprint": inputs[f"model_{chosen}"].fingerprint,
                }
            ),
        }


def export_options(index: str, section: EvaluatorSection) -> Dict[str, Any]:
    """``serving.export.export_model`` options of a push (and of the Evaluator's
    comparison export): the index kind, and ``evaluator.alpha``/``merge`` (None:
    selected on validation)."""
    return {"index": index, "alpha": section.alpha, "merge": section.merge}


@dataclasses.dataclass(frozen=True)
class Pusher(Component):
    """Exports the blessed model as a new integer version under the serving path.

    The model is the variant the Evaluator chose (the blessing's ``variant``), one of
    the ``model_<variant>`` inputs (``PipelineConfig.push_candidates``).

    Idempotent: when the latest version was already exported from this model
    and data with these export options (a run killed after the export but before
    ML Metadata recorded the push), it is reused instead of pushed again.

    Attributes:
        section: serving settings.
        serving_dir: ``BASE_PATH/MODEL_NAME``.
        alpha: ``evaluator.alpha`` (None: selected on validation by the export).
        merge: ``evaluator.merge`` (None: selected on validation by the export).
    """

    section: ServingSection
    serving_dir: str
    alpha: Optional[float] = None
    merge: Optional[str] = None

    inputs: ClassVar[Dict[str, str]] = {
        "model_<variant>": "Model",
        "blessing": "ModelBlessing",
        "transformed_examples": "TransformedExamples",
    }
    outputs: ClassVar[Dict[str, str]] = {"pushed_model": "PushedModel"}

    def write_locations(self) -> Tuple[str, ...]:
        return (self.serving_dir,)

    def pushed_version(self, model_dir: str, data_dir: str) -> Optional[str]:
        """The latest version directory if it was exported from ``model_dir`` and
        ``data_dir`` with this index kind (and the explicit alpha and merge), else None."""
        from serving.model_config import METADATA_DIR, METADATA_FILE, parse_version_dir

        if not os.path.isdir(self.serving_dir):
            return None
        versions = [v for v in map(parse_version_dir, os.listdir(self.serving_dir)) if v]
        if not versions:
            return None
        latest = os.path.join(self.serving_dir, str(max(versions)))
        path = os.path.join(latest, METADATA_DIR, METADATA_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
        same = (
            metadata.get("model_dir") == os.path.abspath(model_dir)
            and metadata.get("data_dir") == os.path.abspath(data_dir)
            and metadata.get("index", {}).get("kind") == self.section.index
        )
        if metadata.get("merged"):  # plain variants ignore alpha and merge
            if self.merge is not None:
                same = same and metadata.get("merge") == self.merge
            if self.alpha is not None:
                alpha = alpha_to_json(float(self.alpha))
                same = same and metadata.get("alpha") == alpha
        return latest if same else None

    @staticmethod
    def chosen_model(inputs: Mapping[str, ArtifactRef]) -> Tuple[str, ArtifactRef]:
        """The blessing's variant and its ``model_<variant>`` input."""
        blessing = inputs["blessing"]
        models = {k[len("model_") :]: a for k, a in inputs.items() if k.startswith("model_")}
        variant = blessing.properties.get("variant")
        if variant is None and len(models) == 1:  # a blessing recorded before "variant"
            variant = next(iter(models))
        if variant not in models:
            raise ValueError(
                f"Pusher: the blessing is for variant {variant!r}, not one of {sorted(models)}"
            )
        model = models[variant]
        expected = blessing.properties.get("model_fingerprint")
        if expected is not None and expected != model.fingerprint:
            raise ValueError(f"Pusher: the blessing of {variant!r} is for another model")
        return variant, model

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        variant, model = self.chosen_model(inputs)
        if not inputs["blessing"].properties.get("blessed"):
            log.warning("Pusher: model %s is not blessed; nothing pushed", model.uri)
            os.makedirs(output_dirs["pushed_model"], exist_ok=True)
            return {"pushed_model": Output({"pushed": 0, "model_fingerprint": model.fingerprint})}
        data_dir = inputs["transformed_examples"].uri
        version_dir = self.pushed_version(model.uri, data_dir)
        if version_dir is not None:
            log.info("Pusher: %s already holds this model; not pushed again", version_dir)
        else:
            from serving.export import export_model

            version_dir = export_model(
                model.uri,
                data_dir,
                output=self.serving_dir,
                index=self.section.index,
                alpha=self.alpha,
                merge=self.merge,
            )
            log.info("Pusher: pushed %s", version_dir)
        return {
            "pushed_model": Output(
                {
                    "pushed": 1,
                    "version": int(os.path.basename(version_dir)),
                    "variant": variant,
                    "model_fingerprint": model.fingerprint,
                },
                uri=version_dir,
            )
        }
