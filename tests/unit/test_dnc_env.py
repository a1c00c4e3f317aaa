"""The package selects tf-keras itself and refuses Keras 3 with a clear message."""

import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))


def _python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update(env_changes)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_importing_the_package_selects_tf_keras():
    proc = _python(
        "import trainer, tensorflow as tf; print(tf.keras.Model.__module__.split('.')[0]); "
        "import os; print(os.environ['TF_USE_LEGACY_KERAS'])"
    )
    assert proc.returncode == 0, proc.stderr
    keras_package, flag = proc.stdout.split()
    assert keras_package == "tf_keras" and flag == "1"


def test_keras3_explicitly_selected_fails_clearly():
    proc = _python("import preprocessing", TF_USE_LEGACY_KERAS="0")
    assert proc.returncode != 0
    assert "KerasVersionError" in proc.stderr and "tf-keras" in proc.stderr


def test_keras3_already_bound_fails_clearly():
    proc = _python("import tensorflow as tf; tf.keras.Model; import pipeline")
    assert proc.returncode != 0
    assert "Keras 3" in proc.stderr and "TF_USE_LEGACY_KERAS=1" in proc.stderr
