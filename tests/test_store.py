"""The content-addressed store: shared objects, hard-linked artifact folders, staging and cleanup."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from adaptr.errors import OperationError
from adaptr.store import FileEntry, Store, content_hash, hash_folder, list_files


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stage(store: Store, files: dict[str, bytes]) -> Path:
    staged = store.staging()
    assert staged.is_relative_to(store.tmp) and staged.is_dir()
    for rel, data in files.items():
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        (staged / rel).write_bytes(data)
    return staged


def objects(store: Store) -> list[str]:
    return sorted(p.name for p in store.objects.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_same_content_is_one_object_with_two_links(store: Store) -> None:
    same = b"same bytes" * 100
    folder, entries = store.commit(
        stage(store, {"a.bin": same, "sub/b.bin": same, "c.txt": b"other"}), "art", 1
    )
    assert folder == store.artifact_dir("art", 1) == store.artifacts / "art" / "1"
    assert sorted(p.relative_to(folder).as_posix() for p in list_files(folder)) == [
        "a.bin",
        "c.txt",
        "sub/b.bin",
    ]
    assert objects(store) == sorted({sha(same), sha(b"other")})
    obj = store.object_path(sha(same))
    assert obj == store.objects / sha(same)[:2] / sha(same)
    assert obj.stat().st_nlink == 3  # the object and two hard links in the artifact folder
    assert (folder / "a.bin").stat().st_ino == (folder / "sub" / "b.bin").stat().st_ino == obj.stat().st_ino
    assert (folder / "a.bin").read_bytes() == same
    assert {e.relpath: e for e in entries} == {
        "a.bin": FileEntry("a.bin", len(same), sha(same)),
        "sub/b.bin": FileEntry("sub/b.bin", len(same), sha(same)),
        "c.txt": FileEntry("c.txt", 5, sha(b"other")),
    }


def test_second_artifact_shares_objects(store: Store) -> None:
    files = {"config.json": b"{}", "w.safetensors": b"\x00" * 64}
    f1, e1 = store.commit(stage(store, files), "one", 1)
    f2, e2 = store.commit(stage(store, files), "two", 1)
    assert f1 != f2 and content_hash(e1) == content_hash(e2)
    assert objects(store) == sorted(sha(d) for d in files.values())
    assert (f2 / "w.safetensors").stat().st_ino == (f1 / "w.safetensors").stat().st_ino
    assert store.object_path(sha(files["w.safetensors"])).stat().st_nlink == 3


def test_commit_leaves_no_temp_dirs(store: Store) -> None:
    staged = stage(store, {"x": b"1", "y/z": b"2"})
    store.commit(staged, "art", 1)
    assert not staged.exists()
    assert list(store.tmp.iterdir()) == []


def test_commit_replaces_a_leftover_folder(store: Store) -> None:
    """A folder left by a crash before its catalog row was written is replaced, not merged."""
    leftover = store.artifact_dir("art", 1)
    leftover.mkdir(parents=True)
    (leftover / "stale.bin").write_bytes(b"stale")
    folder, _ = store.commit(stage(store, {"fresh.bin": b"fresh"}), "art", 1)
    assert [p.name for p in folder.iterdir()] == ["fresh.bin"]


def test_discard_removes_folder_and_orphans_only(store: Store) -> None:
    shared, own = b"shared", b"own"
    store.commit(stage(store, {"s": shared, "o": own}), "a", 1)
    folder_b, _ = store.commit(stage(store, {"s": shared}), "b", 1)
    store.discard("a", 1, [sha(own)])
    assert not (store.artifacts / "a").exists()  # empty name folder goes too
    assert objects(store) == [sha(shared)]
    assert (folder_b / "s").read_bytes() == shared
    assert store.object_path(sha(shared)).stat().st_nlink == 2


def test_discard_keeps_other_versions(store: Store) -> None:
    store.commit(stage(store, {"f": b"v1"}), "a", 1)
    store.commit(stage(store, {"f": b"v2"}), "a", 2)
    store.discard("a", 1, [sha(b"v1")])
    assert [p.name for p in (store.artifacts / "a").iterdir()] == ["2"]
    assert objects(store) == [sha(b"v2")]
    store.discard("a", 9, [])  # nothing there: no error


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_interrupted_commit_leaves_nothing(store: Store, nth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import adaptr.store as mod

    store.commit(stage(store, {"keep": b"already stored"}), "old", 1)
    before = objects(store)
    real, calls = mod.sha256_file, {"n": 0}

    def flaky(path, *, progress=None):
        calls["n"] += 1
        if calls["n"] == nth:
            raise KeyboardInterrupt
        return real(path, progress=progress)

    monkeypatch.setattr(mod, "sha256_file", flaky)
    staged = stage(store, {"a": b"new a", "b": b"already stored", "c": b"new c"})
    with pytest.raises(KeyboardInterrupt):
        store.commit(staged, "new", 1)
    assert objects(store) == before  # objects this commit added are gone, shared ones stay
    assert not (store.artifacts / "new").exists()
    assert list(store.tmp.iterdir()) == []
    assert (store.artifact_dir("old", 1) / "keep").read_bytes() == b"already stored"


def test_os_errors_become_operation_errors(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import adaptr.store as mod

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(mod.os, "link", no_links)
    with pytest.raises(OperationError, match="cross-device"):
        store.commit(stage(store, {"a": b"x"}), "art", 1)
    assert objects(store) == [] and list(store.tmp.iterdir()) == []
    assert not (store.artifacts / "art").exists()


def test_content_hash_definition(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_bytes(b"ay")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "junk").write_bytes(b"ignored")
    (tmp_path / ".hidden").write_bytes(b"ignored")
    entries = hash_folder(tmp_path)
    assert [e.relpath for e in entries] == ["b.txt", "sub/a.txt"]
    lines = "".join(
        f"{rel}\0{sha(data)}\n" for rel, data in sorted({"b.txt": b"bee", "sub/a.txt": b"ay"}.items())
    )
    assert content_hash(entries) == sha(lines.encode())
    assert content_hash(reversed(entries)) == content_hash(entries)  # order of input does not matter
    # the name is part of the hash
    assert content_hash([FileEntry("x", 3, sha(b"bee"))]) != content_hash([FileEntry("y", 3, sha(b"bee"))])


# --- concurrency: the name lock, and registrations racing (on SQLite and PostgreSQL) -------------


def test_lock_excludes_other_processes_and_dies_with_them(store: Store, tmp_path: Path) -> None:
    """The name lock is an flock: another process holding it blocks us, and SIGKILL frees it."""
    import signal
    import subprocess
    import sys
    import threading

    code = (
        "import sys, time; from pathlib import Path; from adaptr.store import Store\n"
        f"with Store(Path({str(store.root)!r})).lock('art'):\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        got = threading.Event()

        def take() -> None:
            with store.lock("art"), store.lock("art"):  # re-entrant within a thread
                got.set()

        t = threading.Thread(target=take, daemon=True)
        t.start()
        assert not got.wait(0.5)  # blocked by the other process
        with store.lock("other"):  # other names are not
            pass
        holder.send_signal(signal.SIGKILL)
        assert got.wait(30)
        t.join(10)
    finally:
        holder.kill()
        holder.wait()
    assert not list(store.locks.iterdir())  # released locks leave no files behind


def test_place_and_unplace(store: Store) -> None:
    built = store.build(stage(store, {"f": b"v1"}))
    assert built.folder.parent == store.tmp and not list(store.artifacts.glob("*"))
    final = store.place(built, "art", 1)
    assert final == store.artifact_dir("art", 1) and not built.folder.exists()
    store.unplace(built, "art", 1)  # its row did not commit: back under tmp/, ready for another version
    assert built.folder.is_dir() and not (store.artifacts / "art").exists()
    assert store.place(built, "art", 2) == store.artifact_dir("art", 2)
    assert (store.artifact_dir("art", 2) / "f").read_bytes() == b"v1"


def catalogs(backend, tmp_path: Path, n: int) -> list:
    """``n`` catalogs on one database, each with its own store (hosts that share no lock)."""
    from adaptr.services.catalog import Catalog

    out = []
    for i in range(n):
        c = Catalog(home=tmp_path / f"host{i}")
        c.database_url = backend.url
        out.append(c)
    return out


@pytest.mark.parametrize("new_version", [False, True])
def test_record_race_on_the_unique_constraint(
    backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_version: bool
) -> None:
    """Two registrations past the version choice at once, in stores that share no lock: the
    database's unique constraint decides; the loser gets NameTakenError (or the next version)."""
    import threading

    from adaptr.errors import NameTakenError

    cats = catalogs(backend, tmp_path, 2)
    assert cats[0].count() == 0  # a new SQLite file upgrades itself on first use: not in two threads
    barrier = threading.Barrier(2, timeout=30)
    real_place = Store.place

    def place(self, built, name, version):
        if version == 1:
            barrier.wait()  # both chose version 1 (a retry for version 2 goes straight on)
        return real_place(self, built, name, version)

    monkeypatch.setattr(Store, "place", place)
    results: list = [None, None]

    def register(i: int) -> None:
        try:
            staged = stage(cats[i].store, {"w.bin": f"weights {i}".encode()})
            results[i] = cats[i].record(name="x", kind="adapter", staged=staged, new_version=new_version)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=register, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if new_version:
        assert sorted(r["version"] for r in results) == [1, 2], results
    else:
        errors = [r for r in results if isinstance(r, Exception)]
        assert len(errors) == 1 and isinstance(errors[0], NameTakenError), results
        assert "already exists" in str(errors[0]) and "--new-version" in str(errors[0])
        loser = cats[results.index(errors[0])]
        assert not (loser.store.artifacts / "x").exists() and not list(loser.store.tmp.iterdir())
        assert objects(loser.store) == []
    with cats[0].session() as s:
        from sqlmodel import select

        from adaptr.catalog.models import Artifact

        rows = s.exec(select(Artifact.name, Artifact.version).order_by(Artifact.version)).all()
    assert [tuple(r) for r in rows] == ([("x", 1), ("x", 2)] if new_version else [("x", 1)])


def test_gc_keeps_what_a_live_build_links(backend, tmp_path: Path) -> None:
    """Objects of a build not yet registered are linked from its folder: gc leaves them."""
    (cat,) = catalogs(backend, tmp_path, 1)
    built = cat.store.build(stage(cat.store, {"a": b"in progress"}))
    assert cat.gc()["removed"] == {"staging": [], "artifacts": [], "objects": []}
    assert objects(cat.store) == [sha(b"in progress")]
    cat.store.abandon(built)
    assert objects(cat.store) == []
    staged = stage(cat.store, {"b": b"kept"})
    cat.record(name="y", kind="adapter", staged=staged)
    (cat.store.artifact_dir("y", 7)).mkdir(parents=True)  # a killed process's folder: no row, no lock
    report = cat.gc()
    assert report["removed"]["artifacts"] == ["y@7"] and objects(cat.store) == [sha(b"kept")]
