"""Model components: Trainer (one per variant), Evaluator (blessing) and Pusher."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from pipeline.components.base import Component, Output
from pipeline.config import EvaluatorSection, ServingSection, TrainerSection
from pipeline.metadata import ArtifactRef, Metadata

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
        """The ``TrainConfig`` of this trainer."""
        from trainer.config import TrainConfig

        s = self.section
        return TrainConfig(
            data=data_dir,
            output=output,
            variant=self.variant,
            model=s.model,
            loss=s.loss,
            num_negatives=s.num_negatives,
            epochs=s.epochs,
            batch_size=s.batch_size,
            learning_rate=s.learning_rate,
            steps_per_epoch=s.steps_per_epoch,
            eval_m=s.eval_m,
            eval_users=s.eval_users,
            patience=s.patience,
            seed=s.seed,
        )

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        from trainer.train import train

        config = self.train_config(inputs["transformed_examples"].uri, output_dirs["model"])
        result = train(config, verbose=0)
        last = result.history[-1] if result.history else {}
        key = f"val_recall@{self.section.eval_m[0]}"
        return {
            "model": Output(
                {"variant": self.variant, "epochs": len(result.history), key: last.get(key, 0.0)}
            )
        }


# --------------------------------------------------------------------------- Evaluator, Pusher


@dataclasses.dataclass(frozen=True)
class Evaluator(Component):
    """Evaluates every trained variant on validation and blesses the served one.

    The candidate (``serving.variant``) is compared with the currently pushed model
    (resolved from MLMD) on the same validation data; it is blessed if Recall@M drops
    by at most ``tolerance``; with nothing pushed yet, if it beats popularity.

    Attributes:
        candidate: the variant to bless.
        variants: every trained variant (input keys ``model_<variant>``).
        section: M, tolerance, alpha.
    """

    candidate: str
    variants: Tuple[str, ...]
    section: EvaluatorSection

    inputs: ClassVar[Dict[str, str]] = {"transformed_examples": "TransformedExamples"}
    outputs: ClassVar[Dict[str, str]] = {
        "evaluation": "ModelEvaluation",
        "blessing": "ModelBlessing",
    }

    def resolve(self, metadata: Metadata, inputs: Mapping[str, ArtifactRef]) -> Dict[str, Any]:
        candidate = inputs[f"model_{self.candidate}"]
        for pushed in reversed(metadata.artifacts_by_type("PushedModel")):
            if not pushed.properties.get("pushed") or not os.path.isdir(pushed.uri):
                continue
            if pushed.properties.get("model_fingerprint") == candidate.fingerprint:
                continue  # the candidate itself, pushed by an earlier run
            return {"baseline_model": pushed}
        return {}

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        from pipeline.evaluator import evaluate_and_bless

        report = evaluate_and_bless(
            data_dir=inputs["transformed_examples"].uri,
            models={v: inputs[f"model_{v}"].uri for v in self.variants},
            candidate=self.candidate,
            baseline_version_dir=(
                inputs["baseline_model"].uri if "baseline_model" in inputs else None
            ),
            section=self.section,
        )
        for key in ("evaluation", "blessing"):
            os.makedirs(output_dirs[key], exist_ok=True)
        with open(os.path.join(output_dirs["evaluation"], METRICS_FILE), "w") as f:
            json.dump(report, f, indent=2, sort_keys=True, default=str)
        blessed = bool(report["blessing"]["blessed"])
        marker = BLESSED_FILE if blessed else NOT_BLESSED_FILE
        with open(os.path.join(output_dirs["blessing"], marker), "w") as f:
            f.write(report["blessing"]["reason"] + "\n")
        m = self.section.m
        return {
            "evaluation": Output(
                {f"recall@{m}": report["variants"][self.candidate][f"recall@{m}"]}
            ),
            "blessing": Output(
                {
                    "blessed": int(blessed),
                    "reason": report["blessing"]["reason"],
                    "model_fingerprint": inputs[f"model_{self.candidate}"].fingerprint,
                }
            ),
        }


@dataclasses.dataclass(frozen=True)
class Pusher(Component):
    """Exports a blessed model as a new integer version under the serving path.

    Idempotent: when the latest version was already exported from this model
    and data with this index kind (a run killed after the export but before
    ML Metadata recorded the push), it is reused instead of pushed again.

    Attributes:
        section: serving settings.
        serving_dir: ``BASE_PATH/MODEL_NAME``.
    """

    section: ServingSection
    serving_dir: str

    inputs: ClassVar[Dict[str, str]] = {
        "model": "Model",
        "blessing": "ModelBlessing",
        "transformed_examples": "TransformedExamples",
    }
    outputs: ClassVar[Dict[str, str]] = {"pushed_model": "PushedModel"}

    def write_locations(self) -> Tuple[str, ...]:
        return (self.serving_dir,)

    def pushed_version(self, model_dir: str, data_dir: str) -> Optional[str]:
        """The latest version directory if it was exported from ``model_dir`` and
        ``data_dir`` with this index kind, else None."""
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
        return latest if same else None

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        model = inputs["model"]
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
                model.uri, data_dir, output=self.serving_dir, index=self.section.index
            )
            log.info("Pusher: pushed %s", version_dir)
        return {
            "pushed_model": Output(
                {
                    "pushed": 1,
                    "version": int(os.path.basename(version_dir)),
                    "model_fingerprint": model.fingerprint,
                },
                uri=version_dir,
            )
        }
