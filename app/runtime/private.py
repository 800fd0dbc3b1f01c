"""Owner-only files in XIAOYI_DATA_DIR: the directory 0700, its files 0600, the store's password.

The data dir holds every balance, the ledger, stored conversations and the admin cookie key (the
embedded store's AOF), the store's password and the demo key: no other local user may read it.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

PASSWORD_FILE = "redis.password"  # the embedded store's requirepass, made once per data dir
URL_FILE = "redis.url"  # the running embedded store's full URL, password included
AOF_DIR = "appendonlydir"  # where valkey keeps the AOF (its default appenddirname)
_PASSWORD = re.compile(r"[A-Za-z0-9_-]{16,256}")


class PrivateFileError(RuntimeError):
    """A data-dir file could not be made private, or holds something unusable."""


def private_dir(path: Path) -> None:
    """Create path 0700, or tighten an existing one (an older version's: 0755, files 0644)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.stat(path).st_mode & (stat.S_ISVTX | stat.S_IWOTH):  # /tmp, say: never made 0700
        raise PrivateFileError(f"data dir {path} is shared (world-writable): choose a directory "
                               "of your own for XIAOYI_DATA_DIR, e.g. ./var")
    _tighten(path)
    for entry in (path, path / AOF_DIR):
        if entry.is_dir() and not entry.is_symlink():
            for child in entry.iterdir():
                _tighten(child)


def _tighten(path: Path) -> None:
    """Drop the group and other permission bits of path (a symlink is left alone)."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode) or not stat.S_IMODE(mode) & 0o077:
        return
    try:
        os.chmod(path, stat.S_IMODE(mode) & 0o700)
    except OSError as exc:
        raise PrivateFileError(f"cannot make {path} private (chmod go-rwx): "
                               f"{exc.strerror or exc}") from exc


def write_private(path: Path, text: str) -> None:
    """Write text to path with mode 0600 (an older, wider file is narrowed first)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


def store_password(data_dir: Path) -> str:
    """Return the data dir's store password, made (random, 0600) the first time it is asked for."""
    path = data_dir / PASSWORD_FILE
    try:
        found = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        found = secrets.token_hex(32)
        write_private(path, found + "\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise PrivateFileError(f"cannot read {path}: {exc}") from exc
    if not _PASSWORD.fullmatch(found):
        raise PrivateFileError(f"{path} does not hold a usable password (16-256 letters, digits, "
                               "'-' or '_'); delete it and a new one is made at the next start")
    return found
