"""Warm-up of loaded versions before they serve (``serving.warmup``)."""

from __future__ import annotations

import numpy as np

from serving import model_manager, warmup
from tests.integration.tiny_model import install


def _loaded(path: str) -> model_manager.LoadedVersion:
    return model_manager.LoadedVersion("m", 1, path, model_manager.default_loader(path))


def test_guessed_warm_up_calls_every_signature(templates):
    loaded = _loaded(templates[1])
    assert [name for name, _ in warmup.guessed_requests(loaded.signatures)] == [
        "retrieve",
        "serving_default",
    ]
    assert warmup.warm_up(loaded) == 2
    assert loaded.runs == 0  # warm-up calls are not counted as requests


def test_recorded_warm_up_is_replayed_and_a_failing_one_blocks_the_version(templates, tmp_path):
    base = str(tmp_path / "m")
    install(templates, base, 1)
    history = np.array([[b"a", b"b"]], dtype=object)
    good = [
        ("", {"history": history}),
        ("retrieve", {"history": history, "alpha": np.float32(1), "num_results": np.int32(3)}),
        ("retrieve", {"history": history, "alpha": np.float32(2), "num_results": np.int32(10)}),
    ]
    path = install(templates, base, 2)
    warmup.write_warmup_requests(path, good)
    assert len(warmup.read_warmup_requests(path)) == 3
    assert warmup.warm_up(_loaded(path)) == 3  # the file, not the 2 guessed calls
    bad = [*good, ("retrieve", {**good[1][1], "num_results": np.int32(11)})]  # model asserts
    warmup.write_warmup_requests(install(templates, base, 2, as_version=3), bad)

    served = model_manager.ServedModel(
        model_manager.ModelConfig("m", base), model_manager.default_loader
    )
    served.poll()
    statuses = {s.version: s for s in served.statuses()}
    assert statuses[3].state.name == "END" and "warm-up request" in statuses[3].error
    assert statuses[2].state.name == "AVAILABLE"
    assert served.get().version == 2
    served.poll()  # the failed version is remembered, not retried
    assert served.get().version == 2
    assert [(s.version, s.state.name) for s in served.statuses()][:2] == [
        (3, "END"),
        (2, "AVAILABLE"),
    ]
