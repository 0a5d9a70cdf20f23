"""Every bad input of the import path: exit 2, one line on stderr naming the file and the fix,
no traceback, and the catalog (rows and store) exactly as it was. Ctrl-C mid-way exits 130
and leaves nothing behind either.

Everything that touches the database runs on SQLite and PostgreSQL (see conftest.py); of the
file-format cases, which fail before any row is written, only a sample runs on PostgreSQL too."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import ok_json

from adaptr.testing import make_llama_base

Q_PROJ = "model.layers.0.self_attn.q_proj"


# --- helpers --------------------------------------------------------------------------------


def snapshot(cli, home: Path) -> tuple[list, list[str]]:
    """The catalog rows, the store's files and its artifact folders (empty object shards do not count)."""
    store = home / "store"
    paths = sorted(
        p.relative_to(store).as_posix()
        for p in store.rglob("*")
        if p.is_file() or p.is_relative_to(store / "artifacts")
    )
    return ok_json(cli, "ls"), paths


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def read_st(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(file: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    file.write_bytes(struct.pack("<Q", len(h)) + h + data)


def rewrite_tensors(folder: Path, change: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / "adapter_model.safetensors"
    state = load_file(str(file))
    change(state)
    save_file(state, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_base(
        tmp_path_factory.mktemp("small") / "small",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        seed=3,
    )


@pytest.fixture
def populated(cli, demo_set: dict, small_base: Path, adaptr_home: Path):
    """A catalog with a linked base, a copied base, an adapter and a second, smaller base."""
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama")
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama-copy", "--copy")
    ok_json(cli, "adapter", "add", demo_set["adapters"]["chat-r4"], "--base", "llama", "--name", "chat-r4")
    ok_json(cli, "base", "add", small_base, "--name", "small")
    return snapshot(cli, adaptr_home)


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, (code, out, err)
    assert out == ""
    assert "Traceback" not in err
    line = err.strip()
    assert line and "\n" not in line, err
    assert line.startswith("Error: ")
    for frag in fragments:
        assert frag in line, (frag, line)


# --- the bad inputs ---------------------------------------------------------------------------


def _base_copy(demo_set: dict, tmp: Path) -> Path:
    return copy(Path(demo_set["base"]), tmp / "base-bad")


def _adapter_copy(demo_set: dict, tmp: Path) -> Path:
    return copy(Path(demo_set["adapters"]["chat-r4"]), tmp / "adapter-bad")


def _add_base(path: Path) -> list:
    return ["base", "add", path, "--name", "new-base"]


def _add_adapter(path: Path, base: str = "llama") -> list:
    return ["adapter", "add", path, "--base", base, "--name", "new-adapter"]


def case_base_missing_config(demo_set, tmp):
    d = _base_copy(demo_set, tmp)
    (d / "config.json").unlink()
    return _add_base(d), [str(d / "config.json"), "missing", "needs config.json"]


def case_adapter_missing_config(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    (d / "adapter_config.json").unlink()
    return _add_adapter(d), [str(d / "adapter_config.json"), "missing", "needs adapter_config.json"]


def case_base_missing_weights(demo_set, tmp):
    d = _base_copy(demo_set, tmp)
    (d / "model.safetensors").unlink()
    return _add_base(d), [str(d), "model.safetensors", "save"]


def case_adapter_missing_weights(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    (d / "adapter_model.safetensors").unlink()
    return _add_adapter(d), [str(d), "adapter_model.safetensors", "save_pretrained"]


def case_base_invalid_json(demo_set, tmp):
    d = _base_copy(demo_set, tmp)
    (d / "config.json").write_text('{"hidden_size": 64,')
    return _add_base(d), [str(d / "config.json"), "invalid JSON", "fix"]


def case_adapter_invalid_json(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    (d / "adapter_config.json").write_text("{r: 4}")
    return _add_adapter(d), [str(d / "adapter_config.json"), "invalid JSON", "fix"]


def case_adapter_config_not_object(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    (d / "adapter_config.json").write_text("[1, 2]")
    return _add_adapter(d), [str(d / "adapter_config.json"), "JSON object"]


def case_non_lora(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return _add_adapter(d), [str(d / "adapter_config.json"), "IA3", "LoRA adapters only"]


def case_adapter_truncated(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    return _add_adapter(d), [str(f), "truncated", "re-"]


def case_base_truncated(demo_set, tmp):
    d = _base_copy(demo_set, tmp)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return _add_base(d), [str(f), "truncated", "re-download"]


def case_tiny_file(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    f = d / "adapter_model.safetensors"
    f.write_bytes(b"\x01\x02\x03")
    return _add_adapter(d), [str(f), "too small"]


def case_bad_header_length(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    f = d / "adapter_model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    return _add_adapter(d), [str(f), "header length", "re-"]


def case_huge_header_length(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    f = d / "adapter_model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    return _add_adapter(d), [str(f), "header length", "not a safetensors file"]


def case_offsets_past_end(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    f = d / "adapter_model.safetensors"
    header, data = read_st(f)
    meta = header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    t = header[last]
    begin, end = t["data_offsets"]
    t["shape"] = [t["shape"][0] * 4, *t["shape"][1:]]
    t["data_offsets"] = [begin, begin + (end - begin) * 4]  # consistent with the shape, beyond the data
    if meta:
        header["__metadata__"] = meta
    write_st(f, header, data)
    return _add_adapter(d), [str(f), "truncated", "header says"]


def case_overlapping_offsets(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    f = d / "adapter_model.safetensors"
    header, data = read_st(f)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    write_st(f, header, data)
    return _add_adapter(d), [str(f), "data_offsets"]


def case_shape_mismatch(demo_set, tmp):
    import torch

    d = _adapter_copy(demo_set, tmp)
    key = f"base_model.model.{Q_PROJ}.lora_A.weight"
    rewrite_tensors(d, lambda s: s.__setitem__(key, torch.randn(4, 32)))
    return _add_adapter(d), [f"module {Q_PROJ}", "[64, 32]", "[64, 64]", "--base"]


def case_rank_disagrees_with_config(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 8
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return _add_adapter(d), [str(d / "adapter_model.safetensors"), "rank 4", "r=8", "adapter_config.json"]


def case_factors_disagree(demo_set, tmp):
    import torch

    d = _adapter_copy(demo_set, tmp)
    key = f"base_model.model.{Q_PROJ}.lora_B.weight"
    rewrite_tensors(d, lambda s: s.__setitem__(key, torch.randn(64, 3)))
    return _add_adapter(d), [Q_PROJ, "lora_A", "lora_B", "[64, 3]"]


def case_missing_factor(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    key = f"base_model.model.{Q_PROJ}.lora_B.weight"
    rewrite_tensors(d, lambda s: s.pop(key))
    return _add_adapter(d), [Q_PROJ, "lora_B", "re-export"]


def case_different_base(demo_set, tmp):
    return _add_adapter(Path(demo_set["adapters"]["chat-r4"]), base="small"), ["small@1", "--base", "shape"]


def case_module_not_in_base(demo_set, tmp):
    import torch

    d = _adapter_copy(demo_set, tmp)
    key = "base_model.model.model.layers.7.self_attn.q_proj"

    def add(s: dict) -> None:
        s[f"{key}.lora_A.weight"] = torch.randn(4, 64)
        s[f"{key}.lora_B.weight"] = torch.randn(64, 4)

    rewrite_tensors(d, add)
    return _add_adapter(d), ["model.layers.7.self_attn.q_proj", "does not exist", "--base"]


def case_nan(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    key = f"base_model.model.{Q_PROJ}.lora_B.weight"

    def poison(s: dict) -> None:
        s[key][3, 1] = float("nan")

    rewrite_tensors(d, poison)
    return _add_adapter(d), [str(d / "adapter_model.safetensors"), key, "NaN/Inf", "re-export"]


def case_inf(demo_set, tmp):
    d = _adapter_copy(demo_set, tmp)
    key = f"base_model.model.{Q_PROJ}.lora_A.weight"

    def poison(s: dict) -> None:
        s[key][0, 0] = float("-inf")

    rewrite_tensors(d, poison)
    return _add_adapter(d), [str(d / "adapter_model.safetensors"), key, "NaN/Inf"]


def case_duplicate_adapter_name(demo_set, tmp):
    args = ["adapter", "add", demo_set["adapters"]["code-r8"], "--base", "llama", "--name", "chat-r4"]
    return args, ["'chat-r4'", "already exists", "--new-version"]


def case_duplicate_base_name(demo_set, tmp):
    return ["base", "add", demo_set["base"], "--name", "llama", "--copy"], ["'llama'", "--new-version"]


def case_adapter_default_name_taken(demo_set, tmp):
    return ["adapter", "add", demo_set["adapters"]["chat-r4"], "--base", "llama"], [
        "'chat-r4'",
        "--new-version",
    ]


def case_base_not_a_directory(demo_set, tmp):
    f = Path(demo_set["base"]) / "config.json"
    return ["base", "add", f, "--name", "x"], [str(f), "not a directory", "model folder"]


def case_adapter_not_a_directory(demo_set, tmp):
    f = Path(demo_set["adapters"]["chat-r4"]) / "adapter_model.safetensors"
    return _add_adapter(f), [str(f), "not a directory", "adapter folder"]


def case_base_nonexistent(demo_set, tmp):
    return ["base", "add", tmp / "nowhere", "--name", "x"], [str(tmp / "nowhere"), "no such file"]


def case_adapter_nonexistent(demo_set, tmp):
    return _add_adapter(tmp / "nowhere"), [str(tmp / "nowhere"), "no such file"]


def case_unknown_base(demo_set, tmp):
    return _add_adapter(Path(demo_set["adapters"]["code-r8"]), base="nope"), ["'nope'", "adaptr ls"]


def case_unknown_base_version(demo_set, tmp):
    return _add_adapter(Path(demo_set["adapters"]["code-r8"]), base="llama@7"), ["version 7", "'llama'"]


def case_base_is_an_adapter(demo_set, tmp):
    return _add_adapter(Path(demo_set["adapters"]["code-r8"]), base="chat-r4"), ["chat-r4", "not a base"]


def case_bad_ref_in_base(demo_set, tmp):
    return _add_adapter(Path(demo_set["adapters"]["code-r8"]), base="x@0"), ["'x@0'", "NAME@N"]


def case_bad_ref_show(demo_set, tmp):
    return ["show", "x@0"], ["'x@0'", "NAME@N"]


def case_bad_ref_lineage(demo_set, tmp):
    return ["lineage", "llama@one"], ["'llama@one'", "NAME@N"]


def case_bad_ref_rm(demo_set, tmp):
    return ["rm", "x@0", "--force", "--yes"], ["'x@0'"]


def case_unknown_show(demo_set, tmp):
    return ["show", "ghost"], ["'ghost'", "adaptr ls"]


def case_bad_name(demo_set, tmp):
    return ["base", "add", demo_set["base"], "--name", "bad/name"], ["'bad/name'", "letters"]


JSON_SAMPLE = {
    "base_missing_config",
    "non_lora",
    "adapter_truncated",
    "shape_mismatch",
    "nan",
    "unknown_base",
}
CASES = {name[len("case_") :]: fn for name, fn in globals().items() if name.startswith("case_")}
# the catalog cases (names, refs, bases) and a sample of the file-format ones run on PostgreSQL too
PG_CASES = {
    "duplicate_adapter_name", "duplicate_base_name", "adapter_default_name_taken", "unknown_base",
    "unknown_base_version", "base_is_an_adapter", "bad_ref_in_base", "bad_ref_show", "bad_ref_lineage",
    "bad_ref_rm", "unknown_show", "bad_name", "different_base", "adapter_truncated", "shape_mismatch", "nan",
}  # fmt: skip
CASE_BACKENDS = [(c, "sqlite") for c in sorted(CASES)] + [(c, "postgres") for c in sorted(PG_CASES)]


@pytest.mark.parametrize(("case", "backend"), CASE_BACKENDS, indirect=["backend"])
def test_bad_input(case: str, cli, populated, demo_set: dict, tmp_path: Path, adaptr_home: Path) -> None:
    args, fragments = CASES[case](demo_set, tmp_path)
    code, out, err = cli(*args)
    assert_one_line_error(code, out, err, *fragments)
    assert snapshot(cli, adaptr_home) == populated
    # same with --json: errors never go to stdout (a sample, to keep the suite fast)
    if case in JSON_SAMPLE:
        code, out, err = cli(*args, "--json")
        assert_one_line_error(code, out, err, *fragments)
        assert snapshot(cli, adaptr_home) == populated


def test_every_issue_case_is_covered() -> None:
    must = {
        "base_missing_config", "adapter_missing_config", "base_missing_weights", "adapter_missing_weights",
        "adapter_invalid_json", "non_lora", "adapter_truncated", "bad_header_length", "offsets_past_end",
        "shape_mismatch", "different_base", "nan", "inf", "duplicate_adapter_name", "adapter_not_a_directory",
        "adapter_nonexistent", "unknown_base", "bad_ref_show",
    }  # fmt: skip
    assert must <= set(CASES)
    assert set(CASES) >= PG_CASES


def test_disabled_readers_is_a_clear_error(cli, demo_set: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptr.plugins import reset_plugins

    monkeypatch.setenv("ADAPTR_DISABLE_PLUGINS", "formats")
    reset_plugins()
    code, out, err = cli("base", "add", demo_set["base"])
    assert_one_line_error(code, out, err, "no base reader", "disabled")
    assert ok_json(cli, "ls") == []


# --- interrupted registrations ------------------------------------------------------------------


def _interrupt_on_call(n: int, real: Callable) -> Callable:
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapper


def _assert_interrupted(cli, args: list, home: Path, before) -> None:
    code, out, err = cli(*args)
    assert code == 130, (code, out, err)
    assert "Traceback" not in err and "interrupted" in err
    assert snapshot(cli, home) == before
    store = home / "store"
    assert not any((store / "tmp").iterdir())


@pytest.mark.parametrize("nth", [1, 2])
def test_interrupt_while_hashing_into_store(
    nth: int,
    cli,
    populated,
    demo_set: dict,
    adaptr_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import adaptr.store

    fresh = copy(Path(demo_set["adapters"]["math-r16-rslora"]), tmp_path / "fresh")  # objects not yet stored
    with monkeypatch.context() as m:
        m.setattr(adaptr.store, "sha256_file", _interrupt_on_call(nth, adaptr.store.sha256_file))
        _assert_interrupted(cli, ["adapter", "add", fresh, "--base", "llama"], adaptr_home, populated)
    a = ok_json(cli, "adapter", "add", fresh, "--base", "llama")  # a retry works
    assert a["ref"] == "fresh@1"


def test_interrupt_after_files_are_placed(
    cli, populated, demo_set: dict, adaptr_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adaptr.services.catalog as svc

    monkeypatch.setattr(svc, "content_hash", _interrupt_on_call(1, svc.content_hash))
    args = ["adapter", "add", demo_set["adapters"]["code-r8"], "--base", "llama"]
    _assert_interrupted(cli, args, adaptr_home, populated)
    assert not (adaptr_home / "store" / "artifacts" / "code-r8").exists()


def test_interrupt_during_database_commit(
    cli, populated, demo_set: dict, adaptr_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlmodel import Session

    args = ["adapter", "add", demo_set["adapters"]["code-r8"], "--base", "llama"]
    with monkeypatch.context() as m:
        m.setattr(Session, "commit", _interrupt_on_call(1, Session.commit))
        code, _, err = cli(*args)
    assert code == 130 and "Traceback" not in err
    assert snapshot(cli, adaptr_home) == populated
    assert not (adaptr_home / "store" / "artifacts" / "code-r8").exists()


@pytest.mark.parametrize("copy_flag", [[], ["--copy"]])
def test_interrupt_while_hashing_a_base(
    copy_flag: list,
    cli,
    populated,
    demo_set: dict,
    adaptr_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import adaptr.store

    other = make_llama_base(tmp_path / "other", seed=11)
    monkeypatch.setattr(adaptr.store, "sha256_file", _interrupt_on_call(2, adaptr.store.sha256_file))
    _assert_interrupted(cli, ["base", "add", other, *copy_flag], adaptr_home, populated)
