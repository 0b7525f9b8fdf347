"""Atomic file writes: a temporary name in the same folder, fsync, then rename.

Readers never see half a file, a crash or a full disk leaves the previous version in place, and
the new file gets the user's umask (plans, reports and configs on a shared disk stay readable)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` then rename, so readers never see half a file.

    The temporary file is created with mode 0o666 filtered by the umask (as open() would create
    the file itself), not mkstemp's 0o600: plans and configs on a shared disk stay readable by the team.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_if_changed(path: Path, text: str) -> bool:
    """Atomically write ``text`` unless the file already holds it. Returns True if written."""
    path = Path(path)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return True
