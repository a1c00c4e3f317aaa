"""Unwritable output paths and empty-after-filter data: one clear line, non-zero exit.

``dnc preprocess --output``, ``dnc train --output``, ``dnc export --output`` and
``dnc pipeline run --root`` are run as subprocesses against paths that cannot be
written: exit code 73 (EX_CANTCREAT), one line on stderr naming the path and the
problem, no traceback, nothing left behind. As root (which ignores modes, and is
how CI runs) the permission check drops to an unprivileged uid in a forked child;
a path whose parent is a regular file fails for root too. The full-disk and
read-only-file-system cases mount a small tmpfs and are skipped where mounting is
not permitted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from pipeline.cli import main
from preprocessing import fileio
from preprocessing.errors import EXIT_CANTCREAT, EXIT_USAGE

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
ML1M = os.path.join(REPO, "tests", "fixtures", "ml1m")
IS_ROOT = os.geteuid() == 0

COMMANDS: Dict[str, Callable[[str], List[str]]] = {
    "preprocess": lambda out: ["preprocess", "--source=ml1m", f"--input={ML1M}", f"--output={out}"],
    "train": lambda out: ["train", f"--data={ML1M}", f"--output={out}"],
    "export": lambda out: ["export", "--model=m", "--data=d", f"--output={out}"],
    "pipeline": lambda out: ["pipeline", "run", "--no-serve", f"--root={out}"],
}


def run_cli(args: List[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m pipeline --log-level=WARNING ARGS`` in a subprocess."""
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "pipeline", "--log-level=WARNING", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str, command: str) -> List[str]:
    """The ``dnc COMMAND: error:`` lines of stderr; asserts no traceback was printed."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith(f"dnc {command}: ")]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_output_under_a_regular_file_exits_73_with_one_line(tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = str(blocker / "sub")
    proc = run_cli(COMMANDS[command](out))
    assert proc.returncode == EXIT_CANTCREAT, proc.stderr[-3000:]
    name = command.split()[0]
    assert error_lines(proc.stderr, name) == [
        f"dnc {name}: error: cannot write {out}: its parent {blocker} is a file, not a directory"
    ]
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_output_that_is_a_regular_file_is_refused(tmp_path, capsys, command):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    assert main(["--log-level=WARNING", *COMMANDS[command](str(out))]) == EXIT_CANTCREAT
    err = capsys.readouterr().err
    assert f"cannot write {out}: exists and is a file, not a directory" in err
    assert out.read_text() == "keep me"


NOBODY = 65534  # uid and gid the permission test drops to when it runs as root


def _in_child(fn: Callable[[], int], uid: Optional[int]) -> Tuple[int, str]:
    """Runs ``fn`` in a forked child (as ``uid`` if given); returns its exit code and stderr.

    Root ignores permission bits, and CI runs as root: dropping to an unprivileged uid in
    a child keeps the check real there. A fork, not a new interpreter, because the
    interpreter may live under a home directory only root can read; every module the
    command needs is imported in the parent first.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 70
        try:
            os.close(read)
            sys.stderr = os.fdopen(write, "w", buffering=1)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            code = fn()
        except BaseException:  # noqa: BLE001  (reported through the pipe, then exit)
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_read_only_directory(tmp_path, command):
    level = "--log-level=WARNING"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main([level, *COMMANDS[command](str(blocker / "o"))]) == EXIT_CANTCREAT  # imports
    base = tempfile.mkdtemp(prefix="dnc-ro-")  # outside pytest's 0700 tmp dirs
    try:
        os.chmod(base, 0o755)
        parent = os.path.join(base, "ro")
        os.mkdir(parent, 0o555)
        os.chmod(parent, 0o555)
        out = os.path.join(parent, "out")
        code, err = _in_child(
            lambda: main([level, *COMMANDS[command](out)]), NOBODY if IS_ROOT else None
        )
        assert code == EXIT_CANTCREAT, err[-3000:]
        assert "permission denied (not writable)" in err
        assert "Traceback" not in err
        assert os.listdir(parent) == []
    finally:
        shutil.rmtree(base)


@contextlib.contextmanager
def tmpfs(path: str, options: str) -> Iterator[str]:
    """A tmpfs mounted at ``path`` for the block; skips the test if mounting fails."""
    os.makedirs(path)
    if not IS_ROOT or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(  # noqa: S603
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],  # noqa: S607
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)  # noqa: S603, S607


def test_full_disk_during_preprocess_exits_73_without_traceback(tmp_path):
    with tmpfs(str(tmp_path / "small"), "size=100k") as small:
        out = os.path.join(small, "out")
        proc = run_cli(COMMANDS["preprocess"](out))
        leftovers = os.listdir(small)
    assert proc.returncode == EXIT_CANTCREAT, proc.stderr[-3000:]
    lines = error_lines(proc.stderr, "preprocess")
    assert lines == [f"dnc preprocess: error: cannot write {out}: no space left on device"]
    assert leftovers == []  # the staging directory was removed


def test_read_only_file_system(tmp_path, capsys):
    with tmpfs(str(tmp_path / "ro"), "ro,size=100k") as ro:
        out = os.path.join(ro, "out")
        code = main(["--log-level=WARNING", *COMMANDS["pipeline"](out)])
    assert code == EXIT_CANTCREAT
    assert f"cannot write {out}: read-only file system" in capsys.readouterr().err


def test_check_output_dir_leaves_no_probe(tmp_path):
    out = fileio.check_output_dir(str(tmp_path / "a" / "b"))
    assert out == str(tmp_path / "a" / "b") and os.listdir(out) == []


def test_failed_publish_keeps_the_previous_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("previous")
    with pytest.raises(fileio.OutputError, match="could not publish"):
        fileio.publish_dir(str(tmp_path / "missing-staging"), str(final))
    assert (final / "old").read_text() == "previous"


# ----------------------------------------------------------------- empty after filtering


def test_filters_leaving_nothing_exit_2_naming_the_settings(tmp_path):
    out = str(tmp_path / "out")
    args = COMMANDS["preprocess"](out) + ["--min-item-interactions=1000"]
    proc = run_cli(args)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr, "preprocess")
    assert line == (
        "dnc preprocess: error: no users left after the min-count filters "
        "(min_item_interactions=1000, min_user_interactions=1, filter_mode=until_stable): "
        "30 users and 40 items before filtering; lower the minimum counts"
    )
    assert os.listdir(tmp_path) == []  # no output, no staging directory


def test_users_too_short_to_split_exit_2(tmp_path, capsys):
    source = tmp_path / "short.csv"
    source.write_text("u1,i1,1\nu1,i2,2\nu2,i1,1\n")  # two interactions at most
    out = str(tmp_path / "out")
    args = ["--log-level=WARNING", "preprocess", "--source=csv", f"--input={source}"]
    assert main([*args, f"--output={out}"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no user has the 3 interactions the leave-one-out split needs" in err
    assert not os.path.exists(out)


def test_no_valid_rows_exit_2(tmp_path, capsys):
    source = tmp_path / "bad.csv"
    source.write_bytes(b"u1,,1\n\xff\xfe,i,2\nu3,i3,x\n\n")
    out = str(tmp_path / "out")
    args = ["--log-level=WARNING", "preprocess", "--source=csv", f"--input={source}"]
    assert main([*args, f"--output={out}"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"no valid interactions in {source}: 4 rows read, 3 rejected, 1 skipped" in err
