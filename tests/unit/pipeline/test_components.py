"""SchemaGen + ExampleValidator on TFDV statistics: the anomaly policy."""

import os

import pandas as pd
import pytest

from pipeline.components import AnomaliesFound, ExampleValidator, SchemaGen
from pipeline.metadata import ArtifactRef


def _stats_artifact(tmp_path, name, frame):
    import tensorflow_data_validation as tfdv

    uri = str(tmp_path / name)
    os.makedirs(uri)
    stats = tfdv.generate_statistics_from_dataframe(frame)
    import tensorflow as tf

    # The artifact layout of StatisticsGen: FeatureStats.pb, a TFRecord of the proto.
    with tf.io.TFRecordWriter(os.path.join(uri, "FeatureStats.pb")) as writer:
        writer.write(stats.SerializeToString())
    return ArtifactRef("ExampleStatistics", uri, name, id=1)


@pytest.mark.parametrize("policy", ["warn", "fail"])
def test_anomalies_against_the_baseline_schema(tmp_path, policy):
    good = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["a", "b"], "timestamp": [1, 2]})
    drifted = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["a", "b"]})  # no timestamp
    good_stats = _stats_artifact(tmp_path, "good", good)
    schema_dir = str(tmp_path / "schema")
    SchemaGen().run({"statistics": good_stats}, {"schema": schema_dir})
    schema = ArtifactRef("Schema", schema_dir, "s", id=7)
    validator = ExampleValidator(policy)
    clean = validator.run(
        {"statistics": good_stats, "schema": schema, "baseline_schema": schema},
        {"anomalies": str(tmp_path / "a1")},
    )
    assert clean["anomalies"].properties["count"] == 0
    inputs = {
        "statistics": _stats_artifact(tmp_path, "drifted", drifted),
        "schema": schema,
        "baseline_schema": schema,
    }
    if policy == "fail":
        with pytest.raises(AnomaliesFound, match="timestamp"):
            validator.run(inputs, {"anomalies": str(tmp_path / "a2")})
    else:
        out = validator.run(inputs, {"anomalies": str(tmp_path / "a2")})
        assert out["anomalies"].properties["count"] >= 1
        assert "timestamp" in out["anomalies"].properties["features"]
