"""Model discovery, loading and hot swapping (inference itself: :mod:`serving.loaded_version`).

A :class:`ModelManager` owns one :class:`ServedModel` per configured model. Each served model
polls its base path for integer version directories, loads the versions its policy asks for
on a background thread and swaps them in atomically: a request takes a reference to a
:class:`LoadedVersion` and keeps using it even if a newer version replaces it meanwhile.
Versions that fail to load are logged and remembered (keyed by a fingerprint of the
directory), so a corrupt version is not retried on every poll while the previous one keeps
serving.

TensorFlow is imported lazily so that importing this module has no side effects.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import gc
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from serving.errors import Code, ServingError, invalid, not_found
from serving.loaded_version import (
    DEFAULT_SIGNATURE,
    PREDICT_METHOD,
    LoadedVersion,
    SignatureInfo,
    check_input,
)
from serving.model_config import (
    ModelConfig,
    VersionPolicy,
    parse_model_config_text,
    parse_version_dir,
    validate_model_name,
)
from serving.warmup import warm_up

__all__ = [
    "DEFAULT_SIGNATURE",
    "PREDICT_METHOD",
    "Code",
    "LoadedVersion",
    "ModelConfig",
    "ModelManager",
    "ServedModel",
    "ServingError",
    "SignatureInfo",
    "VersionPolicy",
    "check_input",
    "invalid",
    "not_found",
    "parse_model_config_text",
    "validate_model_name",
]

log = logging.getLogger("dnc.serving")

Loader = Callable[[str], Any]


def default_loader(path: str) -> Any:
    """Loads a SavedModel with ``serving.export.load_exported`` if available.

    Falls back to ``tf.saved_model.load`` when that module or function does not exist.
    """
    import importlib

    load = None
    try:
        export = importlib.import_module("serving.export")
    except ImportError as e:
        if e.name != "serving.export":  # the module exists but is broken: say so
            log.warning("serving.export failed to import (%s); using tf.saved_model.load", e)
    else:
        load = getattr(export, "load_exported", None)
    if load is not None:
        return load(path)
    import tensorflow as tf

    return tf.saved_model.load(path)


class VersionState(enum.Enum):
    """Version states as in ``tensorflow.serving.ModelVersionStatus.State``."""

    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    """The state of one version and the error of its last failed load, if any."""

    version: int
    state: VersionState
    error: str = ""


def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Frees an unloaded version's memory now and hands free heap pages back to the OS.

    A restored SavedModel's functions and graphs sit in reference cycles, so dropping the
    last reference to a version frees little: its functions stay registered in TensorFlow's
    eager context, with their graphs and kernels (about 95 MiB for the trained demo model),
    until the garbage collector's next full collection, which a busy server may not run for
    several swaps. ``malloc_trim`` (glibc) then returns the freed pages.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _fingerprint(path: str) -> Tuple[int, ...]:
    stats = []
    for p in (path, os.path.join(path, "saved_model.pb")):
        try:
            st = os.stat(p)
            stats += [st.st_mtime_ns, st.st_size, st.st_ino]
        except OSError:
            stats += [0, 0, 0]
    return tuple(stats)


class ServedModel:
    """One model: polls its base path and keeps the versions of its policy loaded.

    Args:
        config: the model's name, base path, version policy and labels.
        loader: SavedModel loader.
        batcher: request batcher of every version (``serving.batching``; None: none).
    """

    def __init__(self, config: ModelConfig, loader: Loader, batcher: Optional[Any] = None) -> None:
        self.config = config
        self.name = config.name
        self._base = os.path.realpath(config.base_path)
        self._loader = loader
        self._batcher = batcher
        self._lock = threading.Lock()
        self._loaded: Dict[int, LoadedVersion] = {}
        self._status: Dict[int, VersionStatus] = {}
        self._failed: Dict[int, Tuple[int, ...]] = {}
        # Unloaded versions that in-flight requests may still hold: their memory is
        # released (release_memory) by the first poll after the last one is done.
        self._retired: List[weakref.ReferenceType] = []

    def _scan(self) -> Dict[int, str]:
        try:
            entries = os.listdir(self._base)
        except OSError as e:
            log.warning("model %s: cannot list base path %s: %s", self.name, self._base, e)
            return {}
        versions: Dict[int, str] = {}
        for entry in entries:
            version = parse_version_dir(entry)
            if version is None:
                continue
            path = os.path.realpath(os.path.join(self._base, entry))
            if os.path.dirname(path) != self._base:
                log.warning(
                    "model %s: ignoring %s (resolves outside the base path)", self.name, entry
                )
                continue
            if os.path.isdir(path):
                versions[version] = path
        return versions

    def _set_status(self, version: int, state: VersionState, error: str = "") -> None:
        with self._lock:
            self._status[version] = VersionStatus(version, state, error)

    def poll(self) -> None:
        """Scans the base path once, loads wanted versions and unloads unwanted ones."""
        on_disk = self._scan()
        for version in list(self._failed):
            if version not in on_disk or _fingerprint(on_disk[version]) != self._failed[version]:
                del self._failed[version]  # changed or removed: may be retried
        while True:
            candidates = [v for v in on_disk if v not in self._failed]
            wanted = self.config.policy.select(candidates)
            to_load = [v for v in wanted if v not in self._loaded]
            if not to_load:
                break
            self._load(to_load[0], on_disk[to_load[0]])
        for version in [v for v in self._loaded if v not in wanted]:
            self._set_status(version, VersionState.UNLOADING)
            with self._lock:
                retired = self._loaded.pop(version, None)
            if retired is not None:
                self._retired.append(weakref.ref(retired))
                del retired
            self._set_status(version, VersionState.END)
            log.info("model %s: unloaded version %d", self.name, version)
        self._release_retired()

    def _release_retired(self) -> None:
        """Releases the memory of unloaded versions that no request holds any more."""
        alive = [r for r in self._retired if r() is not None]
        if len(alive) == len(self._retired):
            return
        self._retired = alive
        start = time.monotonic()
        release_memory()
        log.info(
            "model %s: released unloaded versions' memory (%.2fs)",
            self.name,
            time.monotonic() - start,
        )

    def _load(self, version: int, path: str) -> None:
        fingerprint = _fingerprint(path)
        self._set_status(version, VersionState.LOADING)
        log.info("model %s: loading version %d from %s", self.name, version, path)
        start = time.monotonic()
        try:
            loaded = LoadedVersion(self.name, version, path, self._loader(path), self._batcher)
            warmed = warm_up(loaded)  # first calls are slow: pay them before serving
        except Exception as e:  # any load (or warm-up) failure keeps the old version
            self._failed[version] = fingerprint
            self._set_status(version, VersionState.END, f"{type(e).__name__}: {e}")
            log.error(
                "model %s: version %d failed to load (kept serving %s): %s",
                self.name,
                version,
                sorted(self._loaded) or "nothing",
                e,
            )
            return
        with self._lock:
            self._loaded[version] = loaded
            self._status[version] = VersionStatus(version, VersionState.AVAILABLE)
        log.info(
            "model %s: version %d available (%.1fs, signatures %s, %d warm-up calls)",
            self.name,
            version,
            time.monotonic() - start,
            sorted(loaded.signatures),
            warmed,
        )

    def get(self, version: Optional[int] = None, label: str = "") -> LoadedVersion:
        """Returns the latest loaded version, or a specific version or label.

        Raises:
            ServingError: NOT_FOUND when nothing matching is loaded.
        """
        with self._lock:
            loaded = dict(self._loaded)
        if label:
            if label not in self.config.version_labels:
                raise not_found(f"model {self.name!r} has no version label {label!r}")
            version = self.config.version_labels[label]
        if version is None:
            if not loaded:
                raise not_found(f"model {self.name!r} has no loaded version yet")
            return loaded[max(loaded)]
        if version not in loaded:
            raise not_found(
                f"model {self.name!r} version {version} is not loaded (available: {sorted(loaded)})"
            )
        return loaded[version]

    def statuses(self, version: Optional[int] = None) -> List[VersionStatus]:
        """Returns version statuses, newest first (one version if ``version`` is given).

        Raises:
            ServingError: NOT_FOUND for a version never seen.
        """
        with self._lock:
            status = dict(self._status)
        if version is not None:
            if version not in status:
                raise not_found(f"model {self.name!r} version {version} is unknown")
            return [status[version]]
        return [status[v] for v in sorted(status, reverse=True)]


class ModelManager:
    """All served models plus the background polling threads.

    Args:
        configs: the models to serve.
        poll_wait_seconds: interval between scans of the base paths (<= 0: only at start).
        loader: SavedModel loader (default: :func:`default_loader`).
        batcher: a started ``serving.batching.RequestBatcher`` shared by every model
            (None: no request batching).
    """

    def __init__(
        self,
        configs: Sequence[ModelConfig],
        poll_wait_seconds: float = 1.0,
        loader: Optional[Loader] = None,
        batcher: Optional[Any] = None,
    ) -> None:
        self.models = {c.name: ServedModel(c, loader or default_loader, batcher) for c in configs}
        if len(self.models) != len(configs):
            raise ValueError("duplicate model names")
        self.poll_wait_seconds = poll_wait_seconds
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []

    def poll_all(self) -> None:
        """Polls every model once in the calling thread (used at start-up)."""
        for model in self.models.values():
            self._safe_poll(model)

    def _safe_poll(self, model: ServedModel) -> None:
        try:
            model.poll()
        except Exception:  # a polling bug must not kill the thread
            log.exception("model %s: polling failed", model.name)

    def start(self) -> None:
        """Starts one daemon polling thread per model (if the poll interval is > 0)."""
        if self.poll_wait_seconds <= 0:
            return
        for model in self.models.values():
            t = threading.Thread(
                target=self._loop, args=(model,), name=f"poll-{model.name}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def _loop(self, model: ServedModel) -> None:
        while not self._stop.wait(self.poll_wait_seconds):
            self._safe_poll(model)

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the polling threads (a load in progress finishes first)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def model(self, name: str) -> ServedModel:
        """Returns a served model by name.

        Raises:
            ServingError: INVALID_ARGUMENT for an invalid name, NOT_FOUND if not served.
        """
        try:
            validate_model_name(name)
        except ValueError as e:
            raise invalid(str(e)) from e
        model = self.models.get(name)
        if model is None:
            raise not_found(f"model {name!r} is not served (served: {sorted(self.models)})")
        return model

    def get(self, name: str, version: Optional[int] = None, label: str = "") -> LoadedVersion:
        """Returns a loaded version of a model (see :meth:`ServedModel.get`)."""
        return self.model(name).get(version, label)
