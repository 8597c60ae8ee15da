"""Commands the tests depend on: a tool CI installs (``require_tool``), and a ``PATH`` without
some commands (``path_without``), so a script under test takes the branch it takes on a machine
that lacks them (no Docker client, no Java) while every other command stays usable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

__all__ = ["path_without", "require_tool"]


def require_tool(name: str) -> str:
    """Path of a CI-installed tool; skipped locally when absent, a failure under CI."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (Debian: apt-get install -y {name})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must install it")
    pytest.skip(message)


def path_without(folder: Path, *names: str, prefix: str | None = None) -> str:
    """The current PATH as one folder of symlinks, minus the executables called ``names`` and,
    with ``prefix``, every executable whose name starts with it (``docker`` drops the client
    and its plug-ins such as ``docker-compose``). The first of two same-named commands wins,
    as it does on the PATH."""
    folder.mkdir()
    for entry_dir in os.environ.get("PATH", "").split(os.pathsep):
        if not entry_dir or not os.path.isdir(entry_dir):
            continue
        for entry in os.scandir(entry_dir):
            target = folder / entry.name
            left_out = entry.name in names or (prefix is not None
                                               and entry.name.startswith(prefix))
            if left_out or target.exists() or target.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(folder)
