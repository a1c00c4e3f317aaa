"""Data components: ExampleGen, the TFDV components (StatisticsGen, SchemaGen,
ExampleValidator) and Transform."""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
from typing import Any, ClassVar, Dict, Mapping, Tuple

from pipeline.components.base import Component, Output, nocache
from pipeline.config import ExampleGenSection, TransformSection, to_dict
from pipeline.metadata import EXTERNAL, ArtifactRef, Metadata, fingerprint_path

log = logging.getLogger(__name__)

EXAMPLES_HEADER = ("user_id", "item_id", "timestamp", "category")


class AnomaliesFound(RuntimeError):
    """ExampleValidator found anomalies and the policy is ``fail``."""


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
    beam_args: Tuple[str, ...] = nocache()

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

    beam_args: Tuple[str, ...] = nocache()

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
    beam_args: Tuple[str, ...] = nocache()

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
