"""File primitives: hashing must match hashlib, writes must be atomic, space checks must fail early."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from adaptr.errors import InsufficientSpaceError, NotFoundError
from adaptr.io.files import (
    atomic_write_bytes,
    atomic_write_json,
    disk_free,
    ensure_space,
    fsync_dir,
    sha256_file,
)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 1000])
def test_sha256_matches_hashlib_with_progress(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    seen: list[int] = []
    assert sha256_file(path, chunk=7, progress=seen.append) == hashlib.sha256(data).hexdigest()
    assert sum(seen) == size
    assert all(0 < n <= 7 for n in seen)


def test_sha256_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        sha256_file(tmp_path / "nope")


def test_atomic_write_bytes_creates_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    atomic_write_bytes(path, b"one")
    assert path.read_bytes() == b"one"
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert path.stat().st_mode & 0o777 == 0o600  # keeps the mode of the file it replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_atomic_write_json_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    obj = {"b": 1, "a": {"d": [1, 2], "c": "é"}}
    atomic_write_json(path, obj)
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    assert text.index('"a"') < text.index('"b"')


def test_fsync_dir_and_disk_free(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    assert disk_free(tmp_path) > 0
    assert disk_free(tmp_path / "not" / "yet" / "made") == disk_free(tmp_path)


def test_ensure_space(tmp_path: Path) -> None:
    ensure_space(tmp_path, 1, "a tiny file")
    with pytest.raises(InsufficientSpaceError) as info:
        ensure_space(tmp_path / "out", 10**18, "the merged model")
    msg = str(info.value)
    assert str(tmp_path / "out") in msg and "ADAPTR_HOME" in msg and "need 1000000.0 TB" in msg
    assert "\n" not in msg
