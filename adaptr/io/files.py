"""File primitives that keep the store consistent across crashes: hashing, atomic writes, space checks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adaptr.errors import InsufficientSpaceError, NotFoundError

CHUNK_SIZE = 8 * 1024 * 1024
_NEW_FILE_MODE = 0o644  # mkstemp creates 0600; stored artifacts must be readable like any saved file


def sha256_file(
    path: str | os.PathLike[str], *, chunk: int = CHUNK_SIZE, progress: Callable[[int], None] | None = None
) -> str:
    """Hash a file in fixed-size chunks so multi-GB weights never sit in memory at once."""
    p = Path(path)
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    try:
        f = p.open("rb", buffering=0)
    except FileNotFoundError:
        raise NotFoundError(f"{p}: file not found; check the path") from None
    with f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            if progress is not None:
                progress(n)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Persist a rename: POSIX only guarantees a new directory entry survives a crash after a dir fsync."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not supported here (e.g. Windows); the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Readers see either the old file or the complete new one, never a partial write."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), _mode_for(p))
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Stable formatting (sorted keys, trailing newline) keeps hashes and diffs of JSON files reproducible."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def disk_free(path: str | os.PathLike[str]) -> int:
    """Free bytes for the filesystem that would hold ``path``, even before it exists."""
    p = Path(path).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return shutil.disk_usage(p).free


def ensure_space(path: str | os.PathLike[str], needed_bytes: int, what: str) -> None:
    """Fail before a long write starts rather than leave a half-written output on a full disk."""
    from adaptr.io.safetensors_io import format_size  # sizes live there; avoids an import cycle

    free = disk_free(path)
    if needed_bytes > free:
        raise InsufficientSpaceError(
            f"not enough disk space in {path} for {what}: need {format_size(needed_bytes)}, "
            f"{format_size(free)} free; free space or set ADAPTR_HOME elsewhere"
        )


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return _NEW_FILE_MODE
