"""An unloaded version's memory is released (``ServedModel`` hot swaps)."""

from __future__ import annotations

import gc

import numpy as np
from tensorflow.python.eager import context

from serving import model_manager
from tests.integration.tiny_model import install


def _functions() -> set:
    return {n for n in context.context().list_function_names() if n.startswith("__inference")}


def test_unloaded_version_is_freed_once_its_last_request_is_done(templates, tmp_path):
    base = str(tmp_path / "m")
    install(templates, base, 1)
    served = model_manager.ServedModel(
        model_manager.ModelConfig("m", base), model_manager.default_loader
    )
    was_enabled = gc.isenabled()
    gc.disable()  # only the server's own collection may free the version's cycles
    try:
        before = _functions()
        served.poll()
        v1 = _functions() - before
        assert v1  # the restored functions, registered in the eager context
        in_flight = served.get()  # a request still running on version 1
        install(templates, base, 2)
        served.poll()
        assert served.get().version == 2
        assert v1 <= _functions()  # still in use: not freed
        out = in_flight.run("", {"history": np.array([[b"a", b"b"]], dtype=object)})
        assert out["version"].tolist() == [1]
        del in_flight
        assert v1 <= _functions()  # dropping the last reference alone frees nothing (cycles)
        served.poll()  # the next poll releases it
        assert not v1 & _functions()
        served.poll()  # nothing left to release
        assert served.get().version == 2 and not served._retired
    finally:
        if was_enabled:
            gc.enable()
