"""Atomic publication of output directories, shared by every writer of the project.

Writers fill a staging directory beside the final path and publish it with one
rename, so a reader sees either the previous complete directory or the new one.
"""

from __future__ import annotations

import os
import shutil
import uuid


def staging_path(final: str) -> str:
    """A fresh hidden sibling of ``final`` to write into."""
    final = os.path.abspath(final)
    parent, name = os.path.split(final)
    return os.path.join(parent, f".{name}.staging-{uuid.uuid4().hex[:8]}")


def publish_dir(staging: str, final: str) -> None:
    """Renames ``staging`` to ``final``, replacing an earlier ``final``."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(staging, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
