"""Content-addressed artifact store.

Files adaptr writes or copies live once under ``store/objects/<sha[:2]>/<sha>``; each
artifact version gets a real folder (``store/artifacts/<name>/<version>``) whose files
are hard links to those objects, so transformers and PEFT load it directly and equal
files are shared between artifacts.

Producers write into a staging folder; ``build`` hashes it into objects and links a complete
artifact folder under ``tmp/``, outside any lock. Then, holding the artifact name's ``lock``
(an ``flock`` on ``locks/<name>.lock``, released by the kernel when a process dies, ``kill -9``
included), the caller checks that the catalog has no row for the version, ``place``s the folder
(one rename) and commits the row before releasing the lock. So a folder under ``artifacts/``
without a row is never another process's live work once its name's lock is taken: it is the
leftover of a killed process, which ``place`` and ``adaptr gc`` may remove.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from adaptr.errors import OperationError
from adaptr.io.files import fsync_dir, sha256_file


@dataclass(frozen=True)
class FileEntry:
    relpath: str
    size: int
    sha256: str


def content_hash(files: Iterable[FileEntry]) -> str:
    """sha256 over sorted ``relpath\\0sha256\\n`` lines: equal contents give equal hashes."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relpath):
        h.update(f"{f.relpath}\0{f.sha256}\n".encode())
    return h.hexdigest()


def list_files(folder: Path) -> list[Path]:
    """Regular files of an artifact folder, skipping hidden entries (.git, .cache)."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return [p for p in out if p.is_file()]


def hash_folder(
    folder: Path, progress: Callable[[int], None] | None = None, files: list[Path] | None = None
) -> list[FileEntry]:
    paths = files if files is not None else list_files(folder)
    return [
        FileEntry(p.relative_to(folder).as_posix(), p.stat().st_size, sha256_file(p, progress=progress))
        for p in paths
    ]


def pid_alive(pid: int) -> bool:
    """Whether a process still runs. A zombie (killed, not yet reaped: a killed job's child whose
    new parent is slow to reap) does not: its files are leftovers."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _unlink_unshared(obj: Path) -> None:
    """Remove an object unless a folder still links it (another process's build may use it)."""
    try:
        if obj.stat().st_nlink <= 1:
            obj.unlink()
    except FileNotFoundError:
        pass


@dataclass
class Built:
    """A complete artifact folder under ``tmp/``, not yet placed, and the objects its build added."""

    folder: Path
    entries: list[FileEntry]
    created: list[Path] = field(default_factory=list)


_held = threading.local()  # lock paths this thread holds -> depth (``Store.lock`` is re-entrant)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.artifacts = root / "artifacts"
        self.tmp = root / "tmp"
        self.locks = root / "locks"

    def staging(self) -> Path:
        """A fresh folder to write an artifact's files into before ``commit``."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        path = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}"  # the pid lets gc tell live work from leftovers
        path.mkdir()
        return path

    def artifact_dir(self, name: str, version: int) -> Path:
        return self.artifacts / name / str(version)

    def object_path(self, sha: str) -> Path:
        return self.objects / sha[:2] / sha

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the artifact name's lock: one process at a time places, commits or removes its
        folders. An ``flock``, so a killed holder (``kill -9`` too) releases it at once.

        The lock file is removed on release (while still held); a waiter that then gets the lock
        on the removed file notices (its inode is no longer at the path) and locks again.
        """
        import fcntl

        path = self.locks / f"{name}.lock"
        held: dict[str, int] = _held.__dict__.setdefault("paths", {})
        key = str(path)
        if key in held:  # this thread already holds it
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        while True:
            self.locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)  # the holder before us removed this file: lock the current one
        held[key] = 1
        try:
            yield
        finally:
            del held[key]
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)

    def build(
        self,
        staged: Path,
        progress: Callable[[int], None] | None = None,
        known_hashes: dict[str, str] | None = None,
    ) -> Built:
        """Hash staged files into objects and link them into a complete folder under ``tmp/``.

        ``known_hashes`` (relpath -> sha256) spares re-reading files whose writer hashed them.
        The staging folder is gone afterwards; on failure nothing this build added remains.
        """
        building = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}.dir"  # gc: a dead pid's is a leftover
        entries: list[FileEntry] = []
        created: list[Path] = []  # objects this build added, removed again if it does not finish
        try:
            for src in list_files(staged):
                rel = src.relative_to(staged).as_posix()
                known = (known_hashes or {}).get(rel)
                if known is None:
                    _fsync_file(src)
                sha = known or sha256_file(src, progress=progress)
                obj = self.object_path(sha)
                if not obj.exists():
                    obj.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, obj)
                    created.append(obj)
                    fsync_dir(obj.parent)
                dest = building / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(obj, dest)
                entries.append(FileEntry(rel, obj.stat().st_size, sha))
            building.mkdir(parents=True, exist_ok=True)  # an artifact without files still gets a folder
        except BaseException as e:  # Ctrl-C included: leave no partial folder or orphan object behind
            self.abandon(Built(building, entries, created))
            if isinstance(e, OSError):
                raise OperationError(f"could not write artifact files into {self.root}: {e}") from e
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return Built(building, entries, created)

    def place(self, built: Built, name: str, version: int) -> Path:
        """Move a built folder to ``artifacts/<name>/<version>``; return that path.

        Call it holding ``lock(name)``, having checked that the catalog has no row for this
        version: a folder already there is then the leftover of a killed process, and is replaced.
        """
        final = self.artifact_dir(name, version)
        try:
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(built.folder, final)
            fsync_dir(final.parent)
        except OSError as e:
            raise OperationError(f"could not place {name}@{version} in {self.artifacts}: {e}") from e
        return final

    def unplace(self, built: Built, name: str, version: int) -> None:
        """Undo ``place`` (its catalog row was not committed): the folder goes back under ``tmp/``."""
        final = self.artifact_dir(name, version)
        if final.is_dir() and not built.folder.exists():
            os.replace(final, built.folder)
        with contextlib.suppress(OSError):
            final.parent.rmdir()  # only when empty: other versions stay

    def abandon(self, built: Built) -> None:
        """Remove a build that will not be placed, and the objects it added that nothing links."""
        shutil.rmtree(built.folder, ignore_errors=True)
        for obj in built.created:
            _unlink_unshared(obj)

    def commit(
        self,
        staged: Path,
        name: str,
        version: int,
        progress: Callable[[int], None] | None = None,
        known_hashes: dict[str, str] | None = None,
    ) -> tuple[Path, list[FileEntry]]:
        """``build`` then ``place`` under the name's lock, for a version the caller knows has no
        catalog row (``Catalog.record`` does the row check and commit inside the lock itself)."""
        built = self.build(staged, progress, known_hashes)
        try:
            with self.lock(name):
                return self.place(built, name, version), built.entries
        except BaseException:
            self.abandon(built)
            raise

    def leftovers(self) -> list[Path]:
        """Staging folders of processes that no longer run (killed merges, crashes)."""
        if not self.tmp.is_dir():
            return []
        out = []
        for p in sorted(self.tmp.iterdir()):
            pid = p.name.split("-", 1)[0]
            if not pid.isdigit() or not pid_alive(int(pid)):
                out.append(p)
        return out

    def discard(self, name: str, version: int, orphaned: Iterable[str]) -> None:
        """Remove an artifact folder and the objects no other artifact references (and no folder
        links: a concurrent build may have linked one)."""
        with self.lock(name):
            shutil.rmtree(self.artifact_dir(name, version), ignore_errors=True)
            for sha in orphaned:
                _unlink_unshared(self.object_path(sha))
            with contextlib.suppress(OSError):
                (self.artifacts / name).rmdir()  # only when empty: other versions stay
