"""`dnc preprocess` on Beam's portable runner equals the DirectRunner run.

The portable run goes through Beam's job API: a local job service and an external
worker pool (``preprocessing.portable``), each a separate process, the worker pool
starting the SDK workers as processes of their own: the protocol of the Flink, Spark
and Dataflow runners.
"""

import glob
import json
import os

import pytest
import tensorflow as tf

from pipeline.cli import main
from preprocessing import features
from preprocessing.portable import PortableEndpoints, local_portable_services

ML1M = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "ml1m")
# Filter rounds (side inputs), several shards, quarantined rows, K-means.
ARGS = [
    "--source=ml1m",
    f"--input={ML1M}",
    "--num-clusters=5",
    "--min-item-interactions=3",
    "--max-filter-rounds=3",
    "--num-shards=2",
]
# Run facts, not results: they differ between any two runs.
RUN_STATS = ("elapsed_seconds", "interactions_per_second")


def _preprocess(output, beam_args=()):
    code = main(["--log-level=WARNING", "preprocess", *ARGS, f"--output={output}", *beam_args])
    assert code == 0
    return output


def _read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def _records(output, split):
    """A split's serialized examples over all shards, sorted (shard order is the runner's)."""
    files = sorted(glob.glob(os.path.join(output, features.records_pattern(split))))
    assert len(files) == 2
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return sorted(r.numpy() for r in dataset)


def _quarantine(output):
    lines = []
    for path in glob.glob(os.path.join(output, features.QUARANTINE_DIR, "*.jsonl")):
        lines.extend(_read(path).splitlines())
    return sorted(lines)


def _contents(output):
    """Everything preprocessing writes, in a runner-independent form."""
    stats = json.loads(_read(os.path.join(output, features.STATS_FILE)))
    for key in RUN_STATS:
        stats.pop(key)
    transform = os.path.join(output, features.TRANSFORM_DIR)
    assets = {
        os.path.relpath(p, transform): _read(p, "rb")
        for p in glob.glob(os.path.join(transform, "transform_fn", "assets", "*"))
    }
    schema = os.path.join(transform, "transformed_metadata", "schema.pbtxt")
    return {
        "stats": stats,
        "items": _read(os.path.join(output, features.ITEMS_FILE)),
        "clusters": json.loads(_read(os.path.join(output, features.CLUSTERS_FILE))),
        "quarantine": _quarantine(output),
        "assets": assets,
        "schema": _read(schema),
        **{f"records/{split}": _records(output, split) for split in features.SPLITS},
    }


@pytest.fixture(scope="module")
def portable_services(tmp_path_factory):
    logs = str(tmp_path_factory.mktemp("portable-logs"))
    with local_portable_services(log_dir=logs) as endpoints:
        yield endpoints, logs


def test_portable_runner_output_equals_the_direct_runner_output(portable_services, tmp_path):
    endpoints, logs = portable_services
    direct = _contents(_preprocess(str(tmp_path / "direct")))
    portable = _contents(_preprocess(str(tmp_path / "portable"), endpoints.beam_args()))
    assert direct["stats"]["rejected_rows"] == 4 and direct["stats"]["filter"]["rounds"] == 3
    assert len(direct["quarantine"]) == 4 and direct["records/test"]
    assert sorted(direct) == sorted(portable)
    for key in direct:
        assert portable[key] == direct[key], key
    # The job really went through the job service, and its stages ran in SDK workers
    # that the external worker pool started as separate processes.
    job_log = _read(os.path.join(logs, "job_service.log"))
    assert "with state DONE" in job_log
    assert f"Requesting worker at {endpoints.worker_pool}" in job_log
    assert "Starting worker with command" in _read(os.path.join(logs, "worker_pool.log"))


def _group_members(pgid):
    """Running (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = _read(stat).rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(stat)
    return members


def test_services_stop_with_their_sdk_workers(tmp_path):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    out = str(tmp_path / "squares")
    with local_portable_services(log_dir=str(tmp_path / "logs")) as endpoints:
        assert isinstance(endpoints, PortableEndpoints) and len(endpoints.pids) == 2
        flags = dict(a.lstrip("-").split("=", 1) for a in endpoints.beam_args())
        assert flags["runner"] == "PortableRunner"
        assert flags["environment_config"] == endpoints.worker_pool
        with beam.Pipeline(options=PipelineOptions(list(endpoints.beam_args()))) as p:
            _ = (
                p
                | beam.Create(range(5))
                | beam.Map(lambda x: str(x * x))
                | beam.io.WriteToText(out, shard_name_template="")
            )
        assert sorted(_read(out).split()) == ["0", "1", "16", "4", "9"]
        assert all(_group_members(pid) for pid in endpoints.pids)
    for pid in endpoints.pids:
        assert not _group_members(pid), pid


def test_command_line_rejects_runner_flags(capsys):
    from preprocessing.portable import main as portable_main

    with pytest.raises(SystemExit) as exit_info:
        portable_main(["--", "--source=ml1m", "--output=/tmp/x", "--runner=DirectRunner"])
    assert exit_info.value.code == 2
    assert "set by this command" in capsys.readouterr().err
