"""TFX-shaped components: declared input/output artifact types and a ``run`` method.

Each component is a frozen dataclass holding exactly the configuration it
depends on: the runner hashes its fields (minus those marked ``cache=False``, such
as Beam runner options) with the fingerprints of its input artifacts into the
cache key. ``run(inputs, output_dirs)`` writes each output into its directory
(``PIPELINE_ROOT/<node>/<execution id>/<output key>``) and returns, per output,
the custom properties to record (and optionally a different ``uri``).

    ExampleGen -> StatisticsGen -> SchemaGen -> ExampleValidator
           \\-> Transform -> Trainer (one per variant) -> Evaluator -> Pusher
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from pipeline.config import (
    EvaluatorSection,
    ExampleGenSection,
    ServingSection,
    TrainerSection,
    TransformSection,
    to_dict,
)
from pipeline.metadata import EXTERNAL, ArtifactRef, Metadata, fingerprint_path

log = logging.getLogger(__name__)

EXAMPLES_HEADER = ("user_id", "item_id", "timestamp", "category")
BLESSED_FILE, NOT_BLESSED_FILE = "BLESSED", "NOT_BLESSED"
METRICS_FILE = "metrics.json"


class AnomaliesFound(RuntimeError):
    """ExampleValidator found anomalies and the policy is ``fail``."""


@dataclasses.dataclass(frozen=True)
class Output:
    """What ``Component.run`` reports for one output.

    Attributes:
        properties: custom properties recorded on the artifact.
        uri: the artifact's location when it is not the given output directory.
    """

    properties: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    uri: Optional[str] = None


class Component:
    """Base of every component (subclasses are frozen dataclasses).

    Attributes:
        inputs: input key -> artifact type.
        outputs: output key -> artifact type.
    """

    inputs: ClassVar[Dict[str, str]] = {}
    outputs: ClassVar[Dict[str, str]] = {}

    def cache_config(self) -> Dict[str, Any]:
        """The fields that enter the cache key."""
        return {
            f.name: to_dict(v) if dataclasses.is_dataclass(v) else _plain(v)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.metadata.get("cache", True)
            for v in [getattr(self, f.name)]
        }

    def external_inputs(self) -> Dict[str, ArtifactRef]:
        """Inputs made outside the pipeline (raw files), keyed like ``inputs``."""
        return {}

    def resolve(self, metadata: Metadata, inputs: Mapping[str, ArtifactRef]) -> Dict[str, Any]:
        """Extra inputs looked up in MLMD (TFX resolvers), keyed by input name."""
        return {}

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        """Produces the outputs; returns output key -> ``Output``."""
        raise NotImplementedError


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _nocache(default: Any = ()) -> Any:
    return dataclasses.field(default=default, metadata={"cache": False})


# --------------------------------------------------------------------------- ExampleGen


def _csv_line(row: Any, categories: Mapping[str, str]) -> str:
    out = io.StringIO()
    category = categories.get(row.item_id) or row.category or ""
    csv.writer(out, lineterminator="").writerow([row.user_id, row.item_id, row.timestamp, category])
    return out.getvalue()


def _count_lines(pattern: str, skip_header: bool = False) -> int:
    total = 0
    for path in glob.glob(pattern):
        with open(path, "rb") as f:
            total += max(sum(1 for _ in f) - int(skip_header), 0)
    return total


def source_fingerprint(section: ExampleGenSection) -> Tuple[str, str]:
    """(uri, content fingerprint) of the raw input of ``section``."""
    if section.source == "synthetic":
        payload = json.dumps(to_dict(section.synthetic), sort_keys=True).encode()
        return "synthetic://embedded", hashlib.sha256(payload).hexdigest()
    path = os.path.abspath(section.input)
    if os.path.exists(path):
        return path, fingerprint_path(path)
    files = sorted(glob.glob(path))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.encode() + fingerprint_path(f).encode())
    return path, digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ExampleGen(Component):
    """Reads the raw source in Beam: validated rows as CSV + quarantined rows as JSONL.

    Attributes:
        section: the source settings.
        beam_args: Beam pipeline options (not part of the cache key).
    """

    section: ExampleGenSection
    beam_args: Tuple[str, ...] = _nocache()

    inputs: ClassVar[Dict[str, str]] = {"source": EXTERNAL}
    outputs: ClassVar[Dict[str, str]] = {"examples": "Examples", "quarantine": "Quarantine"}

    def external_inputs(self) -> Dict[str, ArtifactRef]:
        uri, fingerprint = source_fingerprint(self.section)
        return {"source": ArtifactRef(EXTERNAL, uri, fingerprint, {"source": self.section.source})}

    def source_config(self) -> Any:
        """The preprocessing ``SourceConfig`` of the section."""
        from preprocessing.config import SourceConfig

        s = self.section
        return SourceConfig(
            name=s.source,
            input=s.input or None,
            min_rating=s.min_rating,
            kuairand_tab=s.kuairand_tab,
            kuairand_require_click=s.kuairand_require_click,
            synthetic=s.synthetic,
        )

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions

        from preprocessing.sources import read_source

        examples = os.path.join(output_dirs["examples"], "data")
        quarantine = os.path.join(output_dirs["quarantine"], "rejected")
        with beam.Pipeline(options=PipelineOptions(list(self.beam_args))) as p:
            source = read_source(p, self.source_config())
            categories = beam.pvalue.AsDict(
                source.item_categories | "CategoryKV" >> beam.Map(lambda c: (c.item_id, c.category))
            )
            _ = (
                source.interactions
                | "ToCsv" >> beam.Map(_csv_line, categories)
                | "WriteExamples"
                >> beam.io.WriteToText(
                    examples, file_name_suffix=".csv", header=",".join(EXAMPLES_HEADER)
                )
            )
            _ = (
                source.rejected
                | "RejectedJson" >> beam.Map(lambda r: json.dumps(r._asdict(), sort_keys=True))
                | "WriteQuarantine" >> beam.io.WriteToText(quarantine, file_name_suffix=".jsonl")
            )
        rows = _count_lines(f"{examples}*.csv", skip_header=True)
        rejected = _count_lines(f"{quarantine}*.jsonl")
        log.info("ExampleGen: %d validated rows, %d quarantined", rows, rejected)
        return {
            "examples": Output({"rows": rows, "format": "csv"}),
            "quarantine": Output({"rows": rejected}),
        }


# --------------------------------------------------------------------------- TFDV components


@dataclasses.dataclass(frozen=True)
class StatisticsGen(Component):
    """TFDV statistics of the validated rows (a Beam job).

    Attributes:
        beam_args: Beam pipeline options (not part of the cache key).
    """

    beam_args: Tuple[str, ...] = _nocache()

    inputs: ClassVar[Dict[str, str]] = {"examples": "Examples"}
    outputs: ClassVar[Dict[str, str]] = {"statistics": "ExampleStatistics"}

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        import tensorflow_data_validation as tfdv
        from apache_beam.options.pipeline_options import PipelineOptions

        out = os.path.join(output_dirs["statistics"], "FeatureStats.pb")
        stats = tfdv.generate_statistics_from_csv(
            data_location=os.path.join(inputs["examples"].uri, "*.csv"),
            output_path=out,
            pipeline_options=PipelineOptions(list(self.beam_args)),
        )
        count = stats.datasets[0].num_examples if stats.datasets else 0
        return {"statistics": Output({"num_examples": int(count)})}


def load_statistics(uri: str) -> Any:
    """The ``DatasetFeatureStatisticsList`` of a statistics artifact."""
    import tensorflow_data_validation as tfdv

    return tfdv.load_statistics(os.path.join(uri, "FeatureStats.pb"))


def schema_file(uri: str) -> str:
    """The schema file of a schema artifact."""
    return os.path.join(uri, "schema.pbtxt")


@dataclasses.dataclass(frozen=True)
class SchemaGen(Component):
    """Infers a TFDV schema from the statistics."""

    inputs: ClassVar[Dict[str, str]] = {"statistics": "ExampleStatistics"}
    outputs: ClassVar[Dict[str, str]] = {"schema": "Schema"}

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        import tensorflow_data_validation as tfdv

        schema = tfdv.infer_schema(load_statistics(inputs["statistics"].uri))
        os.makedirs(output_dirs["schema"], exist_ok=True)
        tfdv.write_schema_text(schema, schema_file(output_dirs["schema"]))
        return {"schema": Output({"features": len(schema.feature)})}


@dataclasses.dataclass(frozen=True)
class ExampleValidator(Component):
    """Validates the statistics against the schema of the last good run.

    The baseline schema is resolved from MLMD: the schema of the latest anomaly-free
    validation of this pipeline, or this run's inferred schema on the first run.

    Attributes:
        on_anomalies: ``warn`` (record and go on) or ``fail`` (stop the run).
    """

    on_anomalies: str = "warn"

    inputs: ClassVar[Dict[str, str]] = {"statistics": "ExampleStatistics", "schema": "Schema"}
    outputs: ClassVar[Dict[str, str]] = {"anomalies": "ExampleAnomalies"}

    def resolve(self, metadata: Metadata, inputs: Mapping[str, ArtifactRef]) -> Dict[str, Any]:
        for anomalies in reversed(metadata.artifacts_by_type("ExampleAnomalies")):
            schema_id = anomalies.properties.get("schema_id")
            if anomalies.properties.get("count") == 0 and schema_id:
                schema = metadata.artifact(int(schema_id))
                if os.path.exists(schema.uri):
                    return {"baseline_schema": schema}
        return {"baseline_schema": inputs["schema"]}

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        import tensorflow_data_validation as tfdv

        baseline = inputs["baseline_schema"]
        schema = tfdv.load_schema_text(schema_file(baseline.uri))
        anomalies = tfdv.validate_statistics(load_statistics(inputs["statistics"].uri), schema)
        os.makedirs(output_dirs["anomalies"], exist_ok=True)
        tfdv.write_anomalies_text(
            anomalies, os.path.join(output_dirs["anomalies"], "anomalies.pbtxt")
        )
        found = {name: info.description for name, info in sorted(anomalies.anomaly_info.items())}
        if found:
            message = f"anomalies against schema {baseline.uri}: {found}"
            if self.on_anomalies == "fail":
                raise AnomaliesFound(message)
            log.warning("ExampleValidator: %s", message)
        return {
            "anomalies": Output(
                {"count": len(found), "schema_id": baseline.id, "features": ",".join(found)}
            )
        }


# --------------------------------------------------------------------------- Transform, Trainer


@dataclasses.dataclass(frozen=True)
class Transform(Component):
    """The Beam + TFT preprocessing (``preprocessing.run``) on the validated rows.

    Attributes:
        section: clustering, filters and sharding.
        beam_args: Beam pipeline options (not part of the cache key).
    """

    section: TransformSection
    beam_args: Tuple[str, ...] = _nocache()

    inputs: ClassVar[Dict[str, str]] = {"examples": "Examples", "anomalies": "ExampleAnomalies"}
    outputs: ClassVar[Dict[str, str]] = {
        "transformed_examples": "TransformedExamples",
        "transform_graph": "TransformGraph",
    }

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        from preprocessing import features
        from preprocessing.config import PreprocessConfig, SourceConfig
        from preprocessing.run import run_preprocess

        s = self.section
        data_dir = output_dirs["transformed_examples"]
        result = run_preprocess(
            PreprocessConfig(
                source=SourceConfig(name="csv", input=inputs["examples"].uri),
                output=data_dir,
                clustering=s.clustering,
                min_item_interactions=s.min_item_interactions,
                min_user_interactions=s.min_user_interactions,
                filter_mode=s.filter_mode,
                max_filter_rounds=s.max_filter_rounds,
                dedup_consecutive=s.dedup_consecutive,
                num_shards=s.num_shards,
                beam_args=self.beam_args,
            )
        )
        stats = result.stats
        props = {"users": stats["users"], "items": stats["items"], "clusters": stats["clusters"]}
        return {
            "transformed_examples": Output(props),
            "transform_graph": Output({}, uri=os.path.join(data_dir, features.TRANSFORM_DIR)),
        }


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

    def run(self, inputs: Mapping[str, ArtifactRef], output_dirs: Mapping[str, str]) -> Dict:
        model = inputs["model"]
        if not inputs["blessing"].properties.get("blessed"):
            log.warning("Pusher: model %s is not blessed; nothing pushed", model.uri)
            os.makedirs(output_dirs["pushed_model"], exist_ok=True)
            return {"pushed_model": Output({"pushed": 0, "model_fingerprint": model.fingerprint})}
        from serving.export import export_model

        version_dir = export_model(
            model.uri,
            inputs["transformed_examples"].uri,
            output=self.serving_dir,
            index=self.section.index,
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
