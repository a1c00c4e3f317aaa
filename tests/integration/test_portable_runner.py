"""`dnc preprocess` on Beam's portable runner equals the DirectRunner run.

The portable run goes through Beam's job API: a local job service and an external
worker pool (``preprocessing.portable``), each a separate process, the worker pool
starting the SDK workers as processes of their own: the protocol of the Flink, Spark
and Dataflow runners.
"""

import glob
import os

import pytest

from pipeline.cli import main
from preprocessing import features
from preprocessing.output_digest import multiset_digest, output_digest
from preprocessing.portable import (
    JOB_SERVER_TIMEOUT_S,
    PortableEndpoints,
    local_portable_services,
)

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


def _preprocess(output, beam_args=()):
    code = main(["--log-level=WARNING", "preprocess", *ARGS, f"--output={output}", *beam_args])
    assert code == 0
    return output


def _read(path):
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def portable_services(tmp_path_factory):
    logs = str(tmp_path_factory.mktemp("portable-logs"))
    with local_portable_services(log_dir=logs) as endpoints:
        yield endpoints, logs


def test_portable_runner_output_equals_the_direct_runner_output(portable_services, tmp_path):
    endpoints, logs = portable_services
    direct = output_digest(_preprocess(str(tmp_path / "direct")))
    portable = output_digest(_preprocess(str(tmp_path / "portable"), endpoints.beam_args()))
    assert direct["stats"]["rejected_rows"] == 4 and direct["stats"]["filter"]["rounds"] == 3
    assert direct["quarantine"]["count"] == 4 and direct["records/test"]["count"] > 0
    assert all(direct[f"records/{split}"]["shards"] == 2 for split in features.SPLITS)
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
        # Beam's default deadline (60 s) would end the state stream of longer jobs.
        assert int(flags["job_server_timeout"]) == JOB_SERVER_TIMEOUT_S >= 3600
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


def test_digest_is_order_free_but_sees_every_record(tmp_path):
    a, b, c = b"user-1", b"user-2", b"user-3"
    assert multiset_digest([a, b, c]) == multiset_digest([c, a, b])
    assert multiset_digest([a, b, c])["count"] == 3
    # A multiset: a repeated record is not the same output as a single one.
    assert multiset_digest([a, b]) != multiset_digest([a, b, b])
    assert multiset_digest([a, b]) != multiset_digest([a, c])
    with pytest.raises(ValueError, match="not a dnc preprocess output"):
        output_digest(str(tmp_path))
