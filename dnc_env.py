"""Keras environment guard shared by every package of the project.

TensorFlow Recommenders only works with tf-keras (Keras 2). TensorFlow 2.16
picks Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set before ``tf.keras`` is
first touched, so every top-level package imports this module first.
"""

from __future__ import annotations

import os
import sys

_VAR = "TF_USE_LEGACY_KERAS"
_TRUE = {"1", "true", "yes"}


class KerasVersionError(ImportError):
    """Raised when Keras 3 is active and tf-keras cannot be used."""


def ensure_legacy_keras() -> None:
    """Selects tf-keras before TensorFlow resolves ``tf.keras``.

    Raises:
        KerasVersionError: if the user explicitly disabled legacy Keras, or if
            TensorFlow was imported earlier and already bound ``tf.keras`` to
            Keras 3.
    """
    value = os.environ.get(_VAR)
    if value is not None and value.strip().lower() not in _TRUE:
        raise KerasVersionError(
            f"{_VAR}={value!r} selects Keras 3, but TensorFlow Recommenders needs "
            f"tf-keras. Unset {_VAR} or set it to 1 before importing this project."
        )
    os.environ[_VAR] = "1"
    # TensorFlow's C++ INFO lines (oneDNN, CUDA probing) are noise for users.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return
    keras_version = str(getattr(getattr(tf, "keras", None), "__version__", ""))
    if keras_version.startswith("3."):
        raise KerasVersionError(
            f"tensorflow was imported before this project with Keras {keras_version} "
            f"bound to tf.keras. Set {_VAR}=1 in the environment (or import this "
            "project before tensorflow)."
        )


ensure_legacy_keras()
