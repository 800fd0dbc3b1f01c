"""Test helper for Node clients: a directory with npm packages and a script, or a skip."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def npm_dir(where: Path, packages: list[str], script: Path, timeout: int) -> Path:
    """Install `packages` into `where` and copy `script` there; skip saying why when node, npm
    or the registry is away (without a registry npm would retry for minutes: one try, 20 s a
    fetch)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("Node absent: no node or npm on PATH")
    try:
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent",
                               "--fetch-retries=0", "--fetch-timeout=20000", *packages],
                              cwd=where, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm could not install {packages} within {timeout} s (registry "
                    "unreachable?)")
    if done.returncode != 0:
        pytest.skip(f"npm could not install {packages} (registry unreachable?): "
                    f"{done.stderr[-300:]}")
    shutil.copy(script, where / script.name)
    return where
