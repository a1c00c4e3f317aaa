"""The request batcher's parts without a model: parameters file, scheduler, merge and split."""

from __future__ import annotations

import threading
import time
from typing import Any, List, Sequence

import numpy as np
import pytest

from serving.batch_scheduler import BatchScheduler, QueueFullError, SchedulerStoppedError
from serving.batching import batch_key, merge_inputs, split_outputs
from serving.batching_config import (
    BatchingParameters,
    batching_parameters_class,
    load_batching_parameters,
    parse_batching_parameters,
)
from serving.server import batching_from_args, parse_bool

# --------------------------------------------------------------------- parameters file


def test_a_tf_serving_parameters_file_is_read(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text(
        "# as for tensorflow_model_server\n"
        "max_batch_size { value: 32 }\n"
        "batch_timeout_micros { value: 2500 }\n"
        "max_enqueued_batches { value: 7 }\n"
        "num_batch_threads { value: 3 }\n"
        "allowed_batch_sizes: 8\nallowed_batch_sizes: 32\n"
        'thread_pool_name { value: "pool" }\n'
    )
    params = load_batching_parameters(str(path))
    assert (params.max_batch_size, params.batch_timeout_micros) == (32, 2500)
    assert (params.max_enqueued_batches, params.num_batch_threads) == (7, 3)
    assert params.batch_timeout_seconds == pytest.approx(0.0025)
    assert params.ignored == ("thread_pool_name", "allowed_batch_sizes")
    assert (
        batching_parameters_class().DESCRIPTOR.full_name == "tensorflow.serving.BatchingParameters"
    )


def test_unset_fields_take_tf_servings_defaults():
    params = parse_batching_parameters("max_batch_size { value: 5 }")
    assert params.max_batch_size == 5
    assert (params.batch_timeout_micros, params.max_enqueued_batches) == (0, 10)
    assert params.num_batch_threads >= 1 and params.ignored == ()
    assert parse_batching_parameters("") == BatchingParameters()


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_batch_size: 8", "expected e.g. 'max_batch_size { value: 32 }'"),
        ("max_batch_size { value: 8 ", 'Expected "}"'),
        ("batch_timeout { value: 8 }", 'has no field named "batch_timeout"'),
        ('max_batch_size { value: "eight" }', "max_batch_size"),
        ("max_batch_size { value: 0 }", "max_batch_size must be an integer >= 1, got 0"),
        ("num_batch_threads { value: -2 }", "num_batch_threads must be an integer >= 1"),
        ("batch_timeout_micros { value: -1 }", "batch_timeout_micros must be an integer >= 0"),
    ],
)
def test_a_malformed_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.config"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_batching_parameters(str(path))
    assert str(path) in str(info.value) and message in str(info.value)


def test_an_unreadable_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="cannot read --batching_parameters_file .*missing"):
        load_batching_parameters(str(tmp_path / "missing"))
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="binary"):
        load_batching_parameters(str(tmp_path / "binary"))


def test_flags_as_tf_serving(tmp_path):
    class Args:
        enable_batching = False
        batching_parameters_file = ""

    args = Args()
    assert batching_from_args(args) is None
    args.enable_batching = True
    assert batching_from_args(args) == BatchingParameters()
    args.enable_batching, args.batching_parameters_file = False, str(tmp_path / "x")
    with pytest.raises(ValueError, match="without --enable_batching"):
        batching_from_args(args)
    assert parse_bool("TRUE") is True and parse_bool("0") is False
    with pytest.raises(Exception, match="expected true or false"):
        parse_bool("maybe")


# --------------------------------------------------------------------- scheduler


class Recorder:
    """A ``process`` that records its batches (optionally blocking on ``gate``)."""

    def __init__(self) -> None:
        self.batches: List[List[Any]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, key: Any, payloads: Sequence[Any]) -> List[Any]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(payloads))
        return [ValueError(f"bad {p}") if p == "bad" else (key, p) for p in payloads]


def _scheduler(process: Any, **kwargs: Any) -> BatchScheduler:
    options = dict(max_batch_size=3, batch_timeout=0.0, max_enqueued_batches=10, num_threads=1)
    options.update(kwargs)
    scheduler = BatchScheduler(process, **options)
    scheduler.start()
    return scheduler


def test_tasks_arriving_while_the_thread_is_busy_share_batches_of_max_size():
    rec = Recorder()
    scheduler = _scheduler(rec)
    rec.gate.clear()
    rec.entered.clear()
    first = scheduler.submit("k", 0, 1)
    assert rec.entered.wait(5)
    later = [scheduler.submit("k", i, 1) for i in range(1, 6)]
    other = scheduler.submit("other", 9, 1)
    assert scheduler.queued_batches("k") == 2 and scheduler.queued_batches() == 3
    rec.gate.set()
    assert [f.result(5) for f in [first, *later, other]] == [
        *[("k", i) for i in range(6)],
        ("other", 9),
    ]
    assert rec.batches == [[0], [1, 2, 3], [4, 5], [9]]  # oldest batch first
    scheduler.stop()


def test_a_batch_waits_for_the_timeout_unless_it_is_full():
    rec = Recorder()
    scheduler = _scheduler(rec, batch_timeout=1.0, num_threads=2)
    start = time.monotonic()
    assert scheduler.submit("k", "a", 1).result(5) == ("k", "a")
    assert time.monotonic() - start >= 0.99
    start = time.monotonic()
    futures = [scheduler.submit("k", i, 1) for i in range(3)]
    assert [f.result(5) for f in futures] == [("k", 0), ("k", 1), ("k", 2)]
    assert time.monotonic() - start < 0.9  # full: ran without waiting for the timeout
    assert rec.batches == [["a"], [0, 1, 2]]
    scheduler.stop()


def test_a_task_larger_than_max_batch_size_runs_alone():
    rec = Recorder()
    scheduler = _scheduler(rec, batch_timeout=0.2)
    futures = [scheduler.submit("k", "small", 1), scheduler.submit("k", "big", 5)]
    assert [f.result(5)[1] for f in futures] == ["small", "big"]
    assert rec.batches == [["small"], ["big"]]
    scheduler.stop()


def test_the_queue_is_bounded():
    rec = Recorder()
    scheduler = _scheduler(rec, max_batch_size=2, max_enqueued_batches=2)
    rec.gate.clear()
    rec.entered.clear()
    running = scheduler.submit("k", 0, 1)
    assert rec.entered.wait(5)
    queued = [scheduler.submit("k", i, 1) for i in range(1, 5)]  # two batches of two
    with pytest.raises(QueueFullError, match="max_enqueued_batches=2"):
        scheduler.submit("k", 5, 1)
    assert scheduler.submit("other", 6, 1) is not None  # another queue has room
    rec.gate.set()
    assert [f.result(5)[1] for f in [running, *queued]] == [0, 1, 2, 3, 4]
    scheduler.submit("k", 7, 1).result(5)  # room again
    scheduler.stop()


def test_errors_stay_with_their_task_and_a_failing_batch_fails_all():
    rec = Recorder()
    scheduler = _scheduler(rec, batch_timeout=0.2)
    futures = [scheduler.submit("k", p, 1) for p in ("ok", "bad", "fine")]
    assert futures[0].result(5) == ("k", "ok") and futures[2].result(5) == ("k", "fine")
    with pytest.raises(ValueError, match="bad bad"):
        futures[1].result(5)
    scheduler.stop()

    def broken(key: Any, payloads: Sequence[Any]) -> List[Any]:
        raise RuntimeError("boom")

    scheduler = _scheduler(broken, batch_timeout=0.2)
    futures = [scheduler.submit("k", i, 1) for i in range(2)]
    for f in futures:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(5)
    scheduler.stop()


def test_cancelled_tasks_are_skipped_and_stop_drains_the_queue():
    rec = Recorder()
    scheduler = _scheduler(rec, batch_timeout=0.2)
    rec.gate.clear()
    rec.entered.clear()
    busy = scheduler.submit("k", "busy", 3)
    assert rec.entered.wait(5)
    gone, kept = scheduler.submit("k", "gone", 1), scheduler.submit("k", "kept", 1)
    assert gone.cancel()
    rec.gate.set()
    scheduler.stop()  # runs what is queued
    assert busy.result(1)[1] == "busy" and kept.result(1)[1] == "kept"
    assert rec.batches == [["busy"], ["kept"]]
    with pytest.raises(SchedulerStoppedError):
        scheduler.submit("k", "late", 1)


# --------------------------------------------------------------------- merge and split


def _strings(rows: List[List[str]]) -> np.ndarray:
    return np.asarray(rows, dtype=object)


def test_batch_keys_share_scalars_and_pad_only_the_contracts_inputs():
    a = {"history": _strings([["x", "y"]]), "alpha": np.float32(1.0), "num_results": np.int32(5)}
    b = {"history": _strings([["z"], ["w"]]), "alpha": np.float32(1.0), "num_results": np.int32(5)}
    c = dict(b, num_results=np.int32(6))
    assert batch_key(a, pad=True)[0] == 1 and batch_key(b, pad=True)[0] == 2
    assert batch_key(a, pad=True)[1] == batch_key(b, pad=True)[1]
    assert batch_key(c, pad=True)[1] != batch_key(b, pad=True)[1]  # one num_results a call
    assert batch_key(a, pad=False)[1] != batch_key(b, pad=False)[1]  # widths differ
    other = {"values": np.zeros((1, 2), np.float32)}  # not a padded input: shape in the key
    assert batch_key(other, pad=True)[1] != batch_key({"values": np.zeros((1, 3))}, True)[1]
    mismatched = dict(a, clusters=np.zeros((2, 1), np.int32))  # 1 history row, 2 cluster rows
    assert batch_key(mismatched, pad=True) is None
    assert batch_key({"alpha": np.float32(1.0)}, pad=True) is None
    assert batch_key({"history": _strings([]).reshape(0, 1)}, pad=True) is None


def test_merge_pads_with_the_contracts_values_and_split_cuts_rows_back():
    requests = [
        {
            "history": _strings([["a", "b", "c"]]),
            "clusters": np.asarray([[1]], np.int32),
            "exclude": np.zeros((1, 0), dtype=object),
            "num_results": np.int32(3),
        },
        {
            "history": np.asarray([["d"], ["e"]], dtype="S1"),
            "clusters": np.asarray([[2, 0], [-1, -1]], np.int32),
            "exclude": _strings([["x"], [""]]),
            "num_results": np.int32(3),
        },
    ]
    merged = merge_inputs(requests, pad=True)
    assert merged["history"].tolist() == [["a", "b", "c"], [b"d", b"", b""], [b"e", b"", b""]]
    assert merged["clusters"].tolist() == [[1, -1], [2, 0], [-1, -1]]
    assert merged["exclude"].tolist() == [[b""], ["x"], [""]]
    assert merged["num_results"] == 3
    outputs = {"ids": np.arange(6).reshape(3, 2), "p": np.arange(3.0)}
    parts = split_outputs(outputs, [1, 2])
    assert [p["ids"].tolist() for p in parts] == [[[0, 1]], [[2, 3], [4, 5]]]
    assert [p["p"].tolist() for p in parts] == [[0.0], [1.0, 2.0]]
    assert split_outputs({"ids": np.zeros((1, 2))}, [1, 2]) is None  # not one row per row
    assert split_outputs({"n": np.asarray(3)}, [1, 2]) is None


# --------------------------------------------------------------------- request batcher


class FakeVersion:
    """A LoadedVersion stand-in: ``invoke`` doubles ``x`` after waiting for ``gate``;
    a batch holding a negative value fails, as a graph assertion would."""

    name, version, is_export = "m", 1, False

    def __init__(self) -> None:
        self.sig = type("Sig", (), {"name": "serving_default"})()
        self.signatures = {"serving_default": self.sig}
        self.gate = threading.Event()
        self.gate.set()
        self.calls: List[int] = []

    def invoke(self, sig: Any, inputs: Any) -> Any:
        from serving.errors import invalid

        self.gate.wait(10)
        self.calls.append(len(inputs["x"]))
        if (inputs["x"] < 0).any():
            raise invalid("x must be >= 0")
        return {"y": inputs["x"] * 2}


def _batcher(**kwargs: Any) -> Any:
    from serving.batching import RequestBatcher

    options = dict(max_batch_size=8, batch_timeout_micros=300_000, num_batch_threads=1)
    options.update(kwargs)
    batcher = RequestBatcher(BatchingParameters(**options))
    batcher.start()
    return batcher


def test_the_batcher_isolates_a_bad_request_and_counts_its_calls():
    from serving.errors import Code, ServingError

    version, batcher = FakeVersion(), _batcher(max_batch_size=3)
    results: dict = {}

    def call(i: int, x: float) -> None:
        try:
            results[i] = batcher.run(version, version.sig, {"x": np.asarray([x])}, None)
        except ServingError as e:
            results[i] = e

    threads = [threading.Thread(target=call, args=(i, x)) for i, x in enumerate((1, -1, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results[0]["y"].tolist() == [2] and results[2]["y"].tolist() == [4]
    assert results[1].code == Code.INVALID_ARGUMENT
    assert version.calls == [3, 1, 1, 1]  # the batch, then each request alone
    assert batcher.stats() == {"batches": 1, "requests": 3, "requests_per_batch": 3.0}
    batcher.stop()


def test_a_request_that_waits_past_its_deadline_is_answered_deadline_exceeded():
    from serving.errors import Code, ServingError
    from serving.limits import Deadline

    version, batcher = FakeVersion(), _batcher(max_batch_size=1, batch_timeout_micros=0)
    version.gate.clear()
    busy = threading.Thread(
        target=batcher.run, args=(version, version.sig, {"x": np.asarray([1.0])}, None)
    )
    busy.start()
    end = time.monotonic() + 5
    while not batcher.stats()["batches"] and time.monotonic() < end:
        time.sleep(0.01)
    with pytest.raises(ServingError) as info:
        batcher.run(version, version.sig, {"x": np.asarray([2.0])}, Deadline(0.2, "the test"))
    assert info.value.code == Code.DEADLINE_EXCEEDED
    assert "waiting for a batch of model 'm' version 1" in info.value.message
    version.gate.set()
    busy.join(10)
    batcher.stop()
    assert version.calls == [1]  # the request that gave up never ran
