"""Safetensors I/O must agree byte-for-byte with the reference library and transformers, and must turn every
kind of damaged file into a one-line CorruptFileError that names the file."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaptr.errors import CorruptFileError, InvalidInputError, NotFoundError, OperationError
from adaptr.io import safetensors_io as sio
from adaptr.io.safetensors_io import (
    StreamingShardWriter,
    WeightSet,
    check_finite,
    format_size,
    load_torch_bin,
    open_weights,
    parse_size,
    plan_shards,
    read_header,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, generator=g).to(torch.float16),
        "i64": torch.arange(-3, 4, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "u8": torch.arange(7, dtype=torch.uint8),
    }


def _specs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def _write(out: Path, tensors: dict[str, torch.Tensor], **kw: Any) -> StreamingShardWriter:
    with StreamingShardWriter(out, _specs(tensors), **kw) as w:
        for name, t in tensors.items():
            w.write(name, t)
    return w


def _raw_file(path: Path, header: Any, data: bytes = b"", *, n: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------- round trips


def test_single_file_round_trip_matches_reference_loader(tmp_path: Path) -> None:
    tensors = _tensors()
    w = _write(tmp_path, tensors)
    path = tmp_path / "model.safetensors"
    assert w.files == [path] and w.index_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    _assert_same(load_file(path), tensors)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.offset_keys()) == list(tensors)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    assert path.read_bytes()[8:].startswith(b'{"__metadata__":{"format":"pt"}')


def test_read_header_agrees_with_reference_writer(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "x"}
    with safe_open(path, framework="pt") as f:
        assert list(header.tensors) == list(f.offset_keys())
        for name, info in header.tensors.items():
            assert info.dtype == f.get_slice(name).get_dtype()
            assert info.shape == tuple(f.get_slice(name).get_shape())
    data = path.read_bytes()
    for name, info in header.tensors.items():  # absolute offsets address the raw bytes
        t = tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes() if tensors[name].numel() else b""
        assert data[info.start : info.end] == t
        assert info.file == path and info.nbytes == len(t) and info.numel == tensors[name].numel()
    ws = WeightSet.from_file(path)
    assert ws.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert ws.num_parameters == sum(t.numel() for t in tensors.values())
    with ws.reader() as r:
        _assert_same({k: r.get(k) for k in tensors}, tensors)
        assert r.get_slice("f32")[1:2].shape == (1, 4)
        with pytest.raises(NotFoundError, match="nope"):
            r.get("nope")


def test_read_header_accepts_what_the_rust_reader_accepts(tmp_path: Path) -> None:
    leading = _raw_file(
        tmp_path / "lead.safetensors",
        b'   {"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}  ',
        b"\x01\x02",
    )
    assert read_header(leading).tensors["a"].shape == (2,)
    empty = _raw_file(tmp_path / "empty.safetensors", {})
    assert read_header(empty).tensors == {} and read_header(empty).metadata is None
    assert load_file(leading)["a"].tolist() == [1, 2] and load_file(empty) == {}


def test_misaligned_layout_is_valid(tmp_path: Path) -> None:
    # Our writer keeps caller order, so an odd-sized tensor can precede an F32; readers must cope.
    tensors = {"u8": torch.arange(3, dtype=torch.uint8), "f32": torch.tensor([1.5, -2.0])}
    _write(tmp_path, tensors)
    _assert_same(load_file(tmp_path / "model.safetensors"), tensors)
    with open_weights(tmp_path).reader() as r:
        assert torch.equal(r.get("f32"), tensors["f32"])


def test_progress_reports_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sio, "_WRITE_CHUNK", 5)
    seen: list[int] = []
    tensors = _tensors()
    w = _write(tmp_path, tensors, progress=seen.append)
    assert sum(seen) == w.total_size == sum(t.numel() * t.element_size() for t in tensors.values())
    assert max(seen) == 5
    _assert_same(load_file(tmp_path / "model.safetensors"), tensors)


def test_non_contiguous_and_grad_tensors_are_written(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.t(), "g": torch.ones(2, requires_grad=True), "s": base[:, 1]}
    _write(tmp_path, tensors)
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["s"], base[:, 1])


def test_empty_model_writes_one_empty_file(tmp_path: Path) -> None:
    _write(tmp_path, {})
    assert load_file(tmp_path / "model.safetensors") == {}
    assert read_header(tmp_path / "model.safetensors").metadata == {"format": "pt"}


# ----------------------------------------------------------------------------------------- sharding


def _tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_sharded_write_loads_in_transformers_and_matches_save_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = _tiny_llama()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    w = _write(ours, sd, max_shard_size="20KB")
    model.config.save_pretrained(ours)
    model.save_pretrained(theirs, max_shard_size="20KB")

    assert len(w.files) > 1
    index = (ours / "model.safetensors.index.json").read_text()
    ref_index = (theirs / "model.safetensors.index.json").read_text()
    assert json.loads(index) == json.loads(ref_index)
    assert index == json.dumps(json.loads(index), indent=2, sort_keys=True) + "\n"
    assert sorted(ours.glob("model*")) and [p.name for p in sorted(ours.glob("model*"))] == [
        p.name for p in sorted(theirs.glob("model*"))
    ]

    loaded = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.bfloat16)
    _assert_same({k: v.detach() for k, v in loaded.state_dict().items()}, sd)

    ws = open_weights(ours)
    assert ws.index_path == ours / "model.safetensors.index.json"
    assert [f.name for f in ws.files] == [f.name for f in w.files]
    assert ws.total_bytes == json.loads(index)["metadata"]["total_size"]
    assert ws.num_parameters == json.loads(index)["metadata"]["total_parameters"]
    with ws.reader() as r:
        _assert_same({k: r.get(k) for k in sd}, sd)
    ref = open_weights(theirs)  # and we read what transformers wrote
    assert sorted(ref.tensors) == sorted(sd)


@pytest.mark.parametrize("limit", [1, 100, 1000, "1KB", 4096, 10**9])
def test_plan_matches_huggingface_hub(limit: int | str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    g = torch.Generator().manual_seed(1)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.uint8]
    sd = {}
    for i in range(40):
        n = int(torch.randint(1, 700, (1,), generator=g))
        sd[f"layer.{i}.w"] = torch.zeros(n, dtype=dtypes[i % len(dtypes)])
    split = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
    plan = plan_shards(_specs(sd), limit)
    names = [sio._shard_name("model", i, len(plan)) for i in range(len(plan))]
    assert {
        n: [s[0] for s in shard] for n, shard in zip(names, plan, strict=True)
    } == split.filename_to_tensors


def test_oversized_tensor_gets_its_own_earlier_shard(tmp_path: Path) -> None:
    sd = {"a": torch.ones(2), "big": torch.ones(100), "c": torch.ones(2)}
    assert [[s[0] for s in shard] for shard in plan_shards(_specs(sd), 64)] == [["big"], ["a", "c"]]
    w = _write(tmp_path, sd, max_shard_size=64)  # still written in the caller's order
    assert w.weight_map == {
        "a": "model-00002-of-00002.safetensors",
        "big": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    with open_weights(tmp_path).reader() as r:
        _assert_same({k: r.get(k) for k in sd}, sd)


# ----------------------------------------------------------------------------------------- writer failures


def test_writer_abort_on_exception_leaves_nothing(tmp_path: Path) -> None:
    sd = {f"t{i}": torch.full((10,), float(i)) for i in range(6)}
    with (
        pytest.raises(RuntimeError, match="boom"),
        StreamingShardWriter(tmp_path, _specs(sd), max_shard_size=100) as w,
    ):
        for i, (name, t) in enumerate(sd.items()):
            if i == 4:
                raise RuntimeError("boom")
            w.write(name, t)
    assert list(tmp_path.iterdir()) == []


def test_writer_incomplete_leaves_nothing(tmp_path: Path) -> None:
    sd = {"a": torch.ones(3), "b": torch.ones(3)}
    with (
        pytest.raises(OperationError, match=r"only 1 of 2 tensors.*nothing was saved"),
        StreamingShardWriter(tmp_path, _specs(sd)) as w,
    ):
        w.write("a", sd["a"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "tensor", "match"),
    [
        ("b", torch.ones(3), "expected tensor 'a' next but got 'b'"),
        ("a", torch.ones(4), r"shape \[4\], planned \[3\]"),
        ("a", torch.ones(3, dtype=torch.float16), "dtype F16, planned F32"),
    ],
)
def test_writer_rejects_wrong_order_shape_dtype(
    tmp_path: Path, name: str, tensor: torch.Tensor, match: str
) -> None:
    sd = {"a": torch.ones(3), "b": torch.ones(3)}
    with pytest.raises(OperationError, match=match), StreamingShardWriter(tmp_path, _specs(sd)) as w:
        w.write(name, tensor)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_extra_write_and_use_outside_context(tmp_path: Path) -> None:
    w = StreamingShardWriter(tmp_path, [("a", torch.float32, (1,))])
    with pytest.raises(OperationError, match="context manager"):
        w.write("a", torch.ones(1))
    with pytest.raises(OperationError, match="already written"), w:
        w.write("a", torch.ones(1))
        w.write("a", torch.ones(1))
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        StreamingShardWriter(tmp_path, [("a", torch.float32, (1,)), ("a", torch.float32, (1,))])
    with pytest.raises(InvalidInputError):
        StreamingShardWriter(tmp_path, [("__metadata__", torch.float32, (1,))])
    with pytest.raises(InvalidInputError):
        StreamingShardWriter(tmp_path, [("a", "F99", (1,))])


def test_writer_refuses_or_replaces_existing_weights(tmp_path: Path) -> None:
    _write(tmp_path, {"a": torch.ones(100)})
    sd = {"a": torch.ones(10), "b": torch.ones(10)}
    with pytest.raises(InvalidInputError, match=r"already holds model\.safetensors"):
        _write(tmp_path, sd, max_shard_size=40)
    (tmp_path / "config.json").write_text("{}")
    _write(tmp_path, sd, max_shard_size=40, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]  # fmt: skip
    _write(tmp_path, sd, overwrite=True)  # back to one file: stale shards and index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_writer_checks_disk_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptr.errors import InsufficientSpaceError

    monkeypatch.setattr("adaptr.io.files.disk_free", lambda path: 10)
    with pytest.raises(InsufficientSpaceError, match="ADAPTR_HOME"):
        _write(tmp_path / "out", {"a": torch.ones(100)})
    assert not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------- corruption

_OK = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
       "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]}}  # fmt: skip


def _with(**changes: Any) -> dict[str, Any]:
    header = json.loads(json.dumps(_OK))
    for key, value in changes.items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    return header


CORRUPT_CASES: dict[str, tuple[Any, bytes, int | None, str]] = {
    # name: (header, data, forced header length, message fragment)
    "truncated_data": (_OK, b"\0" * 12, None, r"truncated \(header says 16 bytes of data, file has 12\)"),
    "trailing_bytes": (_OK, b"\0" * 20, None, "4 unexpected bytes after the last tensor"),
    "header_len_past_eof": (_OK, b"\0" * 16, 10_000, "header length 10000 runs past the end"),
    "huge_header_len": (_OK, b"\0" * 16, 2**40, "exceeds the 100000000-byte limit"),
    "invalid_json": (b'{"a": {"dtype": ', b"", None, "header is not valid JSON"),
    "not_utf8": (b'{"\xff\xfe": 1}', b"", None, "not valid UTF-8"),
    "not_an_object": (b"[1, 2]", b"", None, "header is a JSON list, not an object"),
    "duplicate_key": (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],'
                      b'"data_offsets":[0,1]}}', b"\0", None, "duplicate key 'a'"),
    "unknown_dtype": (_with(a={"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}), b"\0" * 16, None,
                      "unknown dtype 'F33'"),
    "negative_dim": (_with(a={"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}), b"\0" * 16, None,
                     "invalid shape"),
    "float_dim": (_with(a={"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}), b"\0" * 16, None,
                  "invalid shape"),
    "missing_offsets": (_with(a={"dtype": "F32", "shape": [2]}), b"\0" * 16, None, "invalid data_offsets"),
    "entry_not_object": (_with(a=[1]), b"\0" * 16, None, "entry for tensor 'a' is not an object"),
    "offsets_past_end": (_with(), b"\0" * 10, None, "truncated"),
    "overlap": (_with(b={"dtype": "BF16", "shape": [2, 2], "data_offsets": [4, 12]}), b"\0" * 12, None,
                "overlap the previous tensor"),
    "hole": (_with(b={"dtype": "BF16", "shape": [2, 2], "data_offsets": [12, 20]}), b"\0" * 20, None,
             "leave a gap after byte 8"),
    "hole_at_start": (_with(a=None, b={"dtype": "BF16", "shape": [2, 2], "data_offsets": [4, 12]}),
                      b"\0" * 12, None, "leave a gap after byte 0"),
    "end_before_begin": (_with(b={"dtype": "BF16", "shape": [0], "data_offsets": [16, 8]}), b"\0" * 16, None,
                         "end before they begin"),
    "nbytes_mismatch": (_with(b={"dtype": "BF16", "shape": [3], "data_offsets": [8, 16]}), b"\0" * 16, None,
                        r"needs 6 bytes but data_offsets span 8"),
    "metadata_non_string": (_with(__metadata__={"format": 1}), b"\0" * 16, None, "__metadata__ must map"),
    "metadata_not_object": (_with(__metadata__=["pt"]), b"\0" * 16, None, "__metadata__ must map strings"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_files_raise_one_line_error_naming_the_file(tmp_path: Path, case: str) -> None:
    header, data, n, fragment = CORRUPT_CASES[case]
    path = _raw_file(tmp_path / f"{case}.safetensors", header, data, n=n)
    with pytest.raises(CorruptFileError, match=fragment) as info:
        read_header(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and "re-download or re-export" in msg
    if case != "duplicate_key":  # serde keeps the last duplicate; we are stricter on purpose
        with pytest.raises(Exception):  # noqa: B017 - the reference reader rejects it too, with its own type
            load_file(path)


@pytest.mark.parametrize("size", [0, 3, 7])
def test_tiny_files_are_corrupt(tmp_path: Path, size: int) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\0" * size)
    with pytest.raises(CorruptFileError, match=f"only {size} bytes"):
        read_header(path)


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        read_header(tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------------------- open_weights


def _sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = {f"w{i}": torch.full((4,), float(i)) for i in range(4)}
    _write(tmp_path, sd, max_shard_size=32)
    return tmp_path, sd


def _edit_index(folder: Path, fn: Any) -> Path:
    index = folder / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    fn(obj)
    index.write_text(json.dumps(obj))
    return index


def test_open_weights_single_file_prefix_and_file_path(tmp_path: Path) -> None:
    sd = {"lora_A": torch.ones(2, 3)}
    _write(tmp_path, sd, prefix="adapter_model")
    ws = open_weights(tmp_path, prefix="adapter_model")
    assert ws.files == [tmp_path / "adapter_model.safetensors"] and "lora_A" in ws and len(ws) == 1
    assert open_weights(tmp_path / "adapter_model.safetensors").tensors == ws.tensors


def test_open_weights_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="folder not found"):
        open_weights(tmp_path / "nope")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(NotFoundError, match=r"no model\.safetensors.*legacy \.bin"):
        open_weights(tmp_path)


def test_open_weights_index_invalid_json(tmp_path: Path) -> None:
    folder, _ = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match=r"index\.json: not valid JSON"):
        open_weights(folder)


def test_open_weights_index_without_weight_map(tmp_path: Path) -> None:
    folder, _ = _sharded(tmp_path)
    _edit_index(folder, lambda o: o.pop("weight_map"))
    with pytest.raises(CorruptFileError, match="no weight_map"):
        open_weights(folder)


def test_open_weights_missing_shard(tmp_path: Path) -> None:
    folder, _ = _sharded(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(NotFoundError, match=r"shard model-00002-of-00002\.safetensors is missing"):
        open_weights(folder)


def test_open_weights_name_not_in_shard(tmp_path: Path) -> None:
    folder, _ = _sharded(tmp_path)
    _edit_index(folder, lambda o: o["weight_map"].update(w0="model-00002-of-00002.safetensors"))
    with pytest.raises(CorruptFileError, match=r"puts 'w0' in model-00002-of-00002\.safetensors"):
        open_weights(folder)


def test_open_weights_tensor_defined_twice(tmp_path: Path) -> None:
    folder, _ = _sharded(tmp_path)
    save_file(
        {"w0": torch.ones(4), "w2": torch.ones(4), "w3": torch.ones(4)},
        folder / "model-00002-of-00002.safetensors",
    )
    with pytest.raises(CorruptFileError, match="'w0' is defined in both"):
        open_weights(folder)


def test_open_weights_rejects_shard_outside_folder(tmp_path: Path) -> None:
    folder, _ = _sharded(tmp_path / "m")
    _edit_index(folder, lambda o: o["weight_map"].update(w0="../evil.safetensors"))
    with pytest.raises(CorruptFileError, match="not a file inside"):
        open_weights(folder)


def test_open_weights_corrupt_shard_is_reported(tmp_path: Path) -> None:
    folder, _ = _sharded(tmp_path)
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CorruptFileError, match=f"{shard}: truncated"):
        open_weights(folder)


# ---------------------------------------------------------------------------------- sizes, .bin, finite


@pytest.mark.parametrize("text", ["5GB", "500MB", "20KB", "1.5GB", " 10 kb ", "3TB", "0.1GB"])
def test_parse_size_matches_huggingface_hub(text: str) -> None:
    from huggingface_hub.serialization._base import parse_size_to_int

    assert parse_size(text) == parse_size_to_int(text)


def test_parse_size_extras_and_errors() -> None:
    assert parse_size(123) == 123 and parse_size("123") == 123 and parse_size("2KiB") == 2048
    assert parse_size("7B") == 7
    for bad in ["abc", "5XB", "", "GB", "-1GB", "1e3KB", -1, True, 1.5, None]:
        with pytest.raises(InvalidInputError):
            parse_size(bad)  # type: ignore[arg-type]


def test_format_size() -> None:
    assert format_size(0) == "0 B" and format_size(999) == "999 B"
    assert format_size(20_000) == "20.0 KB" and format_size(5 * 10**9) == "5.0 GB"
    assert format_size(999_999) == "1.0 MB" and format_size(3 * 10**15) == "3000.0 TB"


def test_load_torch_bin(tmp_path: Path) -> None:
    sd = {"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.arange(3)}
    good = tmp_path / "adapter_model.bin"
    torch.save(sd, good)
    _assert_same(load_torch_bin(good), sd)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(CorruptFileError, match=f"{garbage}: cannot be loaded") as info:
        load_torch_bin(garbage)
    assert "\n" not in str(info.value)

    nested = tmp_path / "nested.bin"
    torch.save([torch.ones(1)], nested)
    with pytest.raises(CorruptFileError, match="mapping of tensor names"):
        load_torch_bin(nested)

    unsafe = tmp_path / "unsafe.bin"
    torch.save({"a": torch.ones(1), "opt": Path("x")}, unsafe)  # arbitrary class: refused by weights_only
    with pytest.raises(CorruptFileError):
        load_torch_bin(unsafe)

    with pytest.raises(NotFoundError):
        load_torch_bin(tmp_path / "absent.bin")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_finite_rejects(bad: float, dtype: torch.dtype) -> None:
    t = torch.ones(5, 3, dtype=dtype)
    t[4, 2] = bad
    with pytest.raises(CorruptFileError, match=r"^a\.safetensors: tensor x\.lora_B contains NaN/Inf"):
        check_finite(t, "x.lora_B", "a.safetensors")


def test_check_finite_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    check_finite(torch.ones(4, 4), "w", "f")
    check_finite(torch.arange(3), "i", "f")
    check_finite(torch.zeros(0), "e", "f")
    check_finite(torch.tensor(1.0), "s", "f")
    monkeypatch.setattr(sio, "_FINITE_CHUNK", 3)  # NaN in a later chunk is still found
    t = torch.ones(10)
    t[9] = float("nan")
    with pytest.raises(CorruptFileError):
        check_finite(t.reshape(2, 5).t(), "w", "f")


def test_dtype_maps() -> None:
    assert sio.torch_dtype("BF16") is torch.bfloat16 and sio.dtype_code(torch.float16) == "F16"
    assert sio.DTYPE_BYTES["F32"] == 4 and "F4" not in sio.DTYPE_BYTES and sio.DTYPE_BITS["F4"] == 4
    for code, dt in sio.code_to_torch().items():
        assert sio.DTYPE_BYTES[code] == torch.empty(0, dtype=dt).element_size()


def test_import_does_not_load_torch() -> None:
    code = "import sys, adaptr.io.safetensors_io, adaptr.io.files; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0


def test_failure_while_committing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path, obj: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sio, "atomic_write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, {"a": torch.ones(10), "b": torch.ones(10)}, max_shard_size=40)
    assert list(tmp_path.iterdir()) == []
