"""Atomic publication of output directories, shared by every writer of the project.

Writers fill a staging directory beside the final path and publish it with one
rename, so a reader sees either the previous complete directory or the new one.

Output problems (a parent that is a file, no permission, a full disk, ...) are
raised as ``OutputError``: one line naming the path and the problem, which the
command line prints instead of a stack trace from deep inside Beam or
TensorFlow. ``check_output_dir`` finds them before any work is done.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from typing import Iterator, Optional

PROBE_NAME = ".dnc-write-probe"

# errno -> what the user is told (anything else: the system's strerror).
_PROBLEMS = {
    errno.EACCES: "permission denied (not writable)",
    errno.EPERM: "operation not permitted (not writable)",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a parent path is a file, not a directory",
    errno.EISDIR: "is a directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
}


class OutputError(Exception):
    """An output path cannot be written; the CLI prints the message and exits non-zero.

    Attributes:
        path: the offending path.
        problem: what is wrong with it (e.g. ``no space left on device``).
    """

    def __init__(self, path: str, problem: str):
        super().__init__(f"cannot write {path}: {problem}")
        self.path = path
        self.problem = problem


def describe_os_error(error: OSError) -> str:
    """A short human description of ``error`` (errno-based, without the path)."""
    if error.errno in _PROBLEMS:
        return _PROBLEMS[error.errno]
    return error.strerror or str(error)


def _existing_file_parent(path: str) -> Optional[str]:
    """The nearest ancestor of ``path`` (itself excluded) that exists and is not a directory."""
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent):
        if os.path.lexists(parent):
            return None if os.path.isdir(parent) else parent
        parent = os.path.dirname(parent)
    return None


def _not_a_file(path: str) -> str:
    """``path`` made absolute; raises ``OutputError`` if it or an ancestor is a file."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(path, "exists and is a file, not a directory")
    blocker = _existing_file_parent(path)
    if blocker is not None:
        raise OutputError(path, f"its parent {blocker} is a file, not a directory")
    return path


def check_output_dir(path: str) -> str:
    """Checks that ``path`` can be a written output directory, before any work is done.

    Creates ``path`` (and its parents) if needed and writes, syncs and removes a
    small probe file in it.

    Args:
        path: the directory that will be written (or replaced).

    Returns:
        The absolute path.

    Raises:
        OutputError: ``path`` is an existing file, a parent is a file, or it cannot
            be created or written (permissions, read-only or full file system).
    """
    path = _not_a_file(path)
    probe = os.path.join(path, f"{PROBE_NAME}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(path, describe_os_error(e)) from None
    finally:
        if os.path.lexists(probe):
            os.remove(probe)
    return path


def check_output_parent(final: str) -> str:
    """Checks that ``final`` can be published by rename: its parent must be writable.

    Returns:
        The absolute ``final``.

    Raises:
        OutputError: ``final`` exists and is a file, or its parent cannot be written.
    """
    final = _not_a_file(final)
    try:
        check_output_dir(os.path.dirname(final))
    except OutputError as error:
        raise OutputError(final, f"{error.problem} (in {error.path})") from None
    return final


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _under(name: str, root: str) -> bool:
    return name == root or name.startswith(root + os.sep)


def write_problem(error: BaseException, *roots: str) -> Optional[str]:
    """What went wrong writing under one of ``roots``, if that is what ``error`` is about.

    Looks through ``error``'s cause/context chain for an ``OSError`` about a file
    under a root, or, since Beam workers and TensorFlow re-raise I/O errors as
    other types with the error in the text (``ResourceExhaustedError: PATH; No
    space left on device``), for a message naming such a file and a known error.

    Returns:
        The problem (e.g. ``no space left on device``) or None.
    """
    roots = tuple(os.path.abspath(r) for r in roots)
    for current in _chain(error):
        if isinstance(current, OSError):
            names = [
                os.path.abspath(os.fsdecode(n)) for n in (current.filename, current.filename2) if n
            ]
            if any(_under(n, r) for n in names for r in roots):
                return describe_os_error(current)
        text = str(current)
        if any(r in text for r in roots):
            for code, problem in _PROBLEMS.items():
                if os.strerror(code) in text:
                    return problem
    return None


@contextlib.contextmanager
def output_errors(path: str, *also: str) -> Iterator[None]:
    """Turns an exception about writing a file under ``path`` (or under one of
    ``also``, e.g. its staging directory; see ``write_problem``) into an
    ``OutputError`` naming ``path``; anything else propagates unchanged."""
    try:
        yield
    except OutputError:
        raise
    except Exception as error:
        problem = write_problem(error, path, *also)
        if problem is None:
            raise
        raise OutputError(os.path.abspath(path), problem) from error


def staging_path(final: str) -> str:
    """A fresh hidden sibling of ``final`` to write into."""
    final = os.path.abspath(final)
    parent, name = os.path.split(final)
    return os.path.join(parent, f".{name}.staging-{uuid.uuid4().hex[:8]}")


def publish_dir(staging: str, final: str) -> None:
    """Renames ``staging`` to ``final``, replacing an earlier ``final``.

    Raises:
        OutputError: a rename failed (the earlier ``final`` is put back when it
            had been moved aside).
    """
    old = None
    try:
        if os.path.exists(final):
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(staging, final)
    except OSError as e:
        if old is not None and not os.path.exists(final):
            os.rename(old, final)
        raise OutputError(final, f"could not publish: {describe_os_error(e)}") from e
    if old:
        shutil.rmtree(old, ignore_errors=True)
