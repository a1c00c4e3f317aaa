"""The command line is quiet by default and shows library warnings with --verbose."""

import os
import subprocess
import sys

NOISE = ("FutureWarning", "TF-TRT", "Unable to register", "rendezvous", "Gradients do not exist")


def _train(tiny_data, output, *flags):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    args = [
        sys.executable, "-m", "pipeline", *flags, "train", f"--data={tiny_data}",
        f"--output={output}", "--variant=dnc", "--epochs=1", "--steps-per-epoch=2",
        "--batch-size=16", "--max-len=10", "--dim=8", "--blocks=1", "--eval-users=20",
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_quiet_by_default_and_verbose_on_request(tiny_data, tmp_path):
    quiet = _train(tiny_data, tmp_path / "q")
    assert "effective config" in quiet and "training dnc" in quiet  # the project's own lines
    assert not [n for n in NOISE if n in quiet], quiet[-3000:]
    verbose = _train(tiny_data, tmp_path / "v", "--verbose")
    # TensorFlow's C++ start-up log (at least the tf.data end-of-sequence notes) comes back.
    assert len(verbose.splitlines()) > len(quiet.splitlines())
