"""Processes registering and merging at once against one catalog, on PostgreSQL (and SQLite).

Each test starts real ``adaptr`` CLI processes. A small hook (``race_hook.py``, written per test
and imported before the CLI) makes them meet at a barrier at a chosen point (``Catalog.record``:
all of them past the early name check; ``Store.place``: all of them past the version choice),
so the race happens on every run instead of by luck. The catalog must stay consistent: one
row per name and version, every folder matching its row, the losers told so on one line with
exit 2, and nothing left behind; a process killed with SIGKILL mid-merge leaves only what
``adaptr gc`` removes, and blocks no one.

Process start-up dominates (a few seconds each on a small box), so the user's report and the
constraint race run on both databases, the merge and SIGKILL cases on PostgreSQL only (the
store side they check is the same on both).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import ok_json

BOTH = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
PG = pytest.mark.parametrize("backend", ["postgres"], indirect=True)

HOOK = textwrap.dedent(
    '''
    """Test hook: meet at a barrier (or pause) at one point of a registration."""
    import os, time
    from pathlib import Path

    from adaptr.services.catalog import Catalog
    from adaptr.store import Store

    def _barrier():
        d = Path(os.environ["RACE_BARRIER"])
        (d / str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(list(d.iterdir())) < int(os.environ["RACE_N"]) and time.monotonic() < deadline:
            time.sleep(0.005)

    def _wrap(cls, name, before=True):
        real = getattr(cls, name)

        def hooked(*args, **kwargs):
            if before:
                _barrier()
            out = real(*args, **kwargs)
            if os.environ.get("RACE_PAUSE") == name:  # stay here until killed
                Path(os.environ["RACE_READY"]).touch()
                time.sleep(600)
            return out

        setattr(cls, name, hooked)

    at = os.environ.get("RACE_AT")
    if at == "record":
        _wrap(Catalog, "record")
    elif at == "place":
        _wrap(Store, "place")
    pause = os.environ.get("RACE_PAUSE")
    if pause == "build":
        _wrap(Store, "build", before=False)
    elif pause == "place":
        _wrap(Store, "place", before=False)
    '''
)


class Procs:
    """Start ``adaptr`` CLI processes (through the hook) with the test's catalog settings."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "race"
        self.dir.mkdir()
        (self.dir / "race_hook.py").write_text(HOOK)
        self.ready = self.dir / "ready"
        self.barriers = 0

    def env(self, n: int = 1, **extra: str) -> dict[str, str]:
        """The environment for ``n`` processes meeting at a fresh barrier."""
        self.barriers += 1
        barrier = self.dir / f"barrier{self.barriers}"
        barrier.mkdir()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.dir), env.get("PYTHONPATH")]))
        env.update(RACE_BARRIER=str(barrier), RACE_N=str(n), RACE_READY=str(self.ready))
        env.update(extra)
        return env

    def start(self, *args: str, env: dict[str, str]) -> subprocess.Popen:
        code = "import race_hook; from adaptr.cli import main; main()"
        return subprocess.Popen(
            [sys.executable, "-c", code, *map(str, args)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run_all(self, commands: list[list[str]], homes: list[Path] | None = None, **extra: str):
        """Run the commands at once (each in its own ADAPTR_HOME if ``homes``); (code, out, err) each."""
        env = self.env(len(commands), **extra)
        procs = [
            self.start(*c, env={**env, "ADAPTR_HOME": str(homes[i])} if homes else env)
            for i, c in enumerate(commands)
        ]
        return [finish(p) for p in procs]

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the paused process never got there"
            time.sleep(0.02)


def finish(p: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = p.communicate(timeout=240)
    return p.returncode, stdout, stderr


@pytest.fixture
def procs(tmp_path: Path) -> Procs:
    return Procs(tmp_path)


def assert_consistent(cli, home: Path) -> list[dict]:
    """Every row's folder holds exactly its files; nothing unowned or half-done is left around."""
    rows = ok_json(cli, "ls")
    refs = [r["ref"] for r in rows]
    assert len(refs) == len(set(refs))
    code, out, err = cli("verify")
    assert code == 0, (out, err)
    report = ok_json(cli, "gc", "--dry-run")
    assert report["removed"] == {"staging": [], "artifacts": [], "objects": []}, report
    store = home / "store"
    assert not list((store / "tmp").iterdir()) if (store / "tmp").exists() else True
    assert not list((store / "locks").iterdir()) if (store / "locks").exists() else True
    return rows


def one_line_name_taken(code: int, out: str, err: str, name: str) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "IntegrityError" not in err, err
    line = err.strip()
    assert "\n" not in line, err
    assert line.startswith(f"Error: artifact {name!r} already exists"), line
    assert "--new-version" in line


@pytest.fixture
def catalog_with_demo(cli, demo_set: dict) -> dict:
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama")
    for path in demo_set["adapters"].values():
        ok_json(cli, "adapter", "add", path, "--base", "llama")
    return demo_set


@BOTH
def test_three_processes_one_name(cli, procs: Procs, catalog_with_demo: dict, adaptr_home: Path) -> None:
    """The user report: three processes register different adapters under one name at once."""
    sources = list(catalog_with_demo["adapters"].values())
    results = procs.run_all(
        [["adapter", "add", src, "--base", "llama", "--name", "same"] for src in sources], RACE_AT="record"
    )
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2, 2], results
    for code, out, err in results:
        if code:
            one_line_name_taken(code, out, err, "same")
    rows = assert_consistent(cli, adaptr_home)
    assert [r["ref"] for r in rows if r["name"] == "same"] == ["same@1"]
    shown = ok_json(cli, "show", "same")
    assert Path(shown["path"]) == adaptr_home / "store" / "artifacts" / "same" / "1"
    winner = next(src for (code, _, _), src in zip(results, sources) if code == 0)
    assert shown["metadata"]["source"] == str(Path(winner).resolve())


@BOTH
def test_hosts_race_on_the_unique_constraint(
    cli, procs: Procs, catalog_with_demo: dict, adaptr_home: Path, tmp_path: Path
) -> None:
    """No shared store lock (a home each, one database), all past the version choice: the unique
    constraint decides. The loser gets the same one line, not an IntegrityError, and takes its
    files back; with --new-version the losers take the next versions instead."""
    src = list(catalog_with_demo["adapters"].values())
    homes = [tmp_path / "host0", tmp_path / "host1"]
    add = ["adapter", "add", "--base", "llama", "--name"]
    results = procs.run_all([[*add, "same", src[0]], [*add, "same", src[1]]], homes, RACE_AT="place")
    assert sorted(code for code, _, _ in results) == [0, 2], results
    for home, (code, out, err) in zip(homes, results):
        if code:
            one_line_name_taken(code, out, err, "same")
        assert (home / "store" / "artifacts" / "same").is_dir() == (code == 0)  # the loser's is gone
        assert not any((home / "store" / "tmp").iterdir())
        assert bool([p for p in (home / "store" / "objects").rglob("*") if p.is_file()]) == (code == 0)
    assert [r["ref"] for r in ok_json(cli, "ls") if r["name"] == "same"] == ["same@1"]

    homes = [tmp_path / "host2", tmp_path / "host3"]
    new = [*add, "same", "--new-version", "--json"]
    results = procs.run_all([[*new, src[1]], [*new, src[2]]], homes, RACE_AT="place")
    assert [code for code, _, _ in results] == [0, 0], results
    arts = sorted((json.loads(out) for _, out, _ in results), key=lambda a: a["version"])
    assert [a["ref"] for a in arts] == ["same@2", "same@3"]
    for a in arts:
        assert Path(a["path"]).name == str(a["version"])  # each folder named for the version it got
    assert [r["ref"] for r in ok_json(cli, "ls") if r["name"] == "same"] == ["same@1", "same@2", "same@3"]


def merge_args(weight: str, *extra: str) -> list[str]:
    return ["merge", "-a", "chat-r4", "-a", "code-r8", "-s", "linear", "--weights", weight, *extra]


@PG
def test_two_merges_one_name(cli, procs: Procs, catalog_with_demo: dict, adaptr_home: Path) -> None:
    """Two merges finish at once under one name: one is registered, the other says so; with
    --new-version both are, as versions 1 and 2 with their own folders."""
    results = procs.run_all(
        [merge_args("1,0.5", "--name", "merged"), merge_args("0.5,1", "--name", "merged")], RACE_AT="record"
    )
    assert sorted(code for code, _, _ in results) == [0, 2], results
    for code, out, err in results:
        if code:
            one_line_name_taken(code, out, err, "merged")
    assert [r["ref"] for r in assert_consistent(cli, adaptr_home) if r["name"] == "merged"] == ["merged@1"]

    results = procs.run_all(
        [
            merge_args("1,0.25", "--name", "again", "--new-version", "--json"),
            merge_args("0.25,1", "--name", "again", "--new-version", "--json"),
        ],
        RACE_AT="record",
    )
    assert [code for code, _, _ in results] == [0, 0], results
    arts = sorted((json.loads(out) for _, out, _ in results), key=lambda a: a["version"])
    assert [a["ref"] for a in arts] == ["again@1", "again@2"]
    assert arts[0]["content_hash"] != arts[1]["content_hash"]
    rows = assert_consistent(cli, adaptr_home)
    assert sorted(r["ref"] for r in rows if r["name"] == "again") == ["again@1", "again@2"]


@PG
@pytest.mark.parametrize("point", ["build", "place"])
def test_kill_9_mid_merge(cli, procs: Procs, catalog_with_demo: dict, adaptr_home: Path, point: str) -> None:
    """SIGKILL after the files are built, or after they are placed but before the row is
    committed: nothing is registered, the next merge under the name is not blocked, and
    ``adaptr gc`` removes exactly what the killed process left. While that process lives, its
    placed folder is live work: gc waits for the name's lock instead of deleting it."""
    from adaptr.services.catalog import Catalog

    before = ok_json(cli, "ls")
    proc = procs.start(*merge_args("1,1", "--name", "killed"), env=procs.env(RACE_PAUSE=point))
    procs.wait_ready(proc)
    folder = adaptr_home / "store" / "artifacts" / "killed" / "1"
    assert folder.is_dir() == (point == "place")
    gc = None
    if point == "place":
        gc = threading.Thread(target=lambda: Catalog().gc(dry_run=True), daemon=True)
        gc.start()
        gc.join(1.0)
        assert gc.is_alive() and folder.is_dir()  # waiting on the live process's lock
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if gc is not None:
        gc.join(60)
        assert not gc.is_alive()  # the kernel released the dead process's lock
    assert ok_json(cli, "ls") == before

    report = ok_json(cli, "gc", "--dry-run")
    assert len(report["removed"]["staging"]) == (1 if point == "build" else 0)
    assert report["removed"]["artifacts"] == (["killed@1"] if point == "place" else [])
    assert report["removed"]["objects"]  # the merged shards nobody references

    if point == "place":  # the leftover folder does not stand in the way of the next merge
        a = ok_json(cli, *merge_args("1,1", "--name", "killed"))
        assert a["ref"] == "killed@1"
    ok_json(cli, "gc")
    rows = assert_consistent(cli, adaptr_home)
    assert [r["ref"] for r in rows if r["name"] == "killed"] == (["killed@1"] if point == "place" else [])
