"""Safetensors reading and writing without trusting the file and without holding a model in memory.

Headers are parsed from raw bytes and checked like the Rust reader does, so a damaged download is reported
as a one-line ``CorruptFileError`` instead of a panic deep inside a merge. Writing streams tensor bytes into
pre-computed shard files, so peak memory is one tensor, not one shard or one model.
torch is imported only inside functions: importing this module stays cheap for the CLI and the API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypeAlias

from adaptr.errors import CorruptFileError, InvalidInputError, NotFoundError, OperationError
from adaptr.io.files import atomic_write_json, ensure_space, fsync_dir

if TYPE_CHECKING:
    import torch

MAX_HEADER_SIZE = 100_000_000  # safetensors MAX_HEADER_SIZE: anything larger is garbage, not a header
DEFAULT_MAX_SHARD_SIZE = "5GB"  # huggingface_hub MAX_SHARD_SIZE; keeps shards friendly to hub uploads
METADATA_KEY = "__metadata__"
_FIX = "re-download or re-export it"
_IN_FLIGHT_TENSORS = 2  # finished tensors the I/O thread may hold: memory stays a multiple of the largest
_SYNC_EVERY = 256 * 1024 * 1024
_WRITE_CHUNK = 64 * 1024 * 1024  # progress granularity for big tensors; also bounds a single write() call
_FINITE_CHUNK = 64 * 1024 * 1024  # elements per isfinite() pass: bounds the temporary bool mask

# Bit sizes of every dtype code the Rust reader knows (tensor.rs `Dtype`); sub-byte codes pack per byte.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
# Bytes per element for the whole-byte codes (the ones a torch tensor maps to one-to-one).
DTYPE_BYTES: dict[str, int] = {code: bits // 8 for code, bits in DTYPE_BITS.items() if bits % 8 == 0}

# safetensors code -> torch attribute name (safetensors/torch.py `_TYPES`); resolved lazily (torch unloaded).
_TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip

DType: TypeAlias = "torch.dtype | str"
TensorSpec: TypeAlias = "tuple[str, torch.dtype | str, Sequence[int]]"


# --------------------------------------------------------------------------------------------- dtypes


def code_to_torch() -> dict[str, torch.dtype]:
    """The code -> torch dtype map this torch build supports (float8/uint variants depend on the version)."""
    import torch

    return {code: getattr(torch, name) for code, name in _TORCH_NAMES.items() if hasattr(torch, name)}


def torch_to_code() -> dict[torch.dtype, str]:
    """Inverse of :func:`code_to_torch`, for naming a tensor's dtype in a header."""
    return {dt: code for code, dt in code_to_torch().items()}


def torch_dtype(code: str) -> torch.dtype:
    """torch dtype for a safetensors code; unsupported codes are a user-facing error, not a KeyError."""
    try:
        return code_to_torch()[code]
    except KeyError:
        raise InvalidInputError(f"dtype {code!r} has no torch equivalent in this torch build") from None


def dtype_code(dtype: DType) -> str:
    """Normalize a torch dtype or a code string to the safetensors code."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_BITS:
            raise InvalidInputError(
                f"unknown safetensors dtype {dtype!r}; expected one of {sorted(DTYPE_BITS)}"
            )
        return dtype
    try:
        return torch_to_code()[dtype]
    except KeyError:
        raise InvalidInputError(f"torch dtype {dtype} cannot be stored in safetensors") from None


def _nbytes(code: str, shape: Sequence[int]) -> int:
    bits = DTYPE_BITS[code] * math.prod(shape)
    if bits % 8:
        raise InvalidInputError(f"shape {list(shape)} of dtype {code} does not fill whole bytes")
    return bits // 8


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``start``/``end`` are absolute byte offsets in ``file`` (not header-relative),
    so the record is enough to read the bytes without re-parsing the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    file: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated safetensors header; ``tensors`` is in offset (file) order."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_offset: int


def _corrupt(path: Path, reason: str, fix: str = _FIX) -> CorruptFileError:
    return CorruptFileError(f"{path}: {reason}; {fix}")


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_header(path: str | os.PathLike[str]) -> Header:
    """Validate a header from raw bytes without reading tensor data, so broken files fail fast and clearly."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _corrupt(p, f"only {size} bytes, too small to be a safetensors file")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_SIZE:
                raise _corrupt(
                    p, f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit; not a safetensors file"
                )
            if 8 + n > size:
                raise _corrupt(
                    p, f"header length {n} runs past the end of the file ({size} bytes); truncated"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise NotFoundError(f"{p}: file not found; check the path") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{p}: is a directory, expected a .safetensors file") from None

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt(p, "header is not valid UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as exc:  # JSONDecodeError and our duplicate-key error
        raise _corrupt(p, f"header is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise _corrupt(p, f"header is a JSON {type(obj).__name__}, not an object")

    metadata = obj.pop(METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _corrupt(p, "__metadata__ must map strings to strings")

    data_offset = 8 + n
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise _corrupt(p, f"entry for tensor {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise _corrupt(p, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise _corrupt(
                p, f"tensor {name!r} has invalid shape {shape!r} (need a list of non-negative ints)"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise _corrupt(p, f"tensor {name!r} has invalid data_offsets {offsets!r} (need [begin, end])")
        entries.append((name, dtype, tuple(shape), offsets[0], offsets[1]))

    entries.sort(key=lambda e: (e[3], e[4]))
    tensors: dict[str, TensorInfo] = {}
    expected_begin = 0
    for name, dtype, shape, begin, end in entries:
        if end < begin:
            raise _corrupt(p, f"tensor {name!r} has data_offsets [{begin}, {end}] that end before they begin")
        if begin < expected_begin:
            raise _corrupt(p, f"tensor {name!r} data_offsets [{begin}, {end}] overlap the previous tensor")
        if begin > expected_begin:
            raise _corrupt(
                p, f"tensor {name!r} data_offsets [{begin}, {end}] leave a gap after byte {expected_begin}"
            )
        bits = DTYPE_BITS[dtype] * math.prod(shape)
        if bits % 8:
            raise _corrupt(
                p, f"tensor {name!r} of dtype {dtype} and shape {list(shape)} does not fill whole bytes"
            )
        if end - begin != bits // 8:
            raise _corrupt(
                p,
                f"tensor {name!r} ({dtype} {list(shape)}) needs {bits // 8} bytes "
                f"but data_offsets span {end - begin}",
            )
        tensors[name] = TensorInfo(name, dtype, shape, data_offset + begin, data_offset + end, p)
        expected_begin = end

    have = size - data_offset
    if expected_begin > have:
        raise _corrupt(p, f"truncated (header says {expected_begin} bytes of data, file has {have})")
    if expected_begin < have:
        raise _corrupt(
            p,
            f"{have - expected_begin} unexpected bytes after the last tensor (header says "
            f"{expected_begin} bytes of data, file has {have})",
        )
    return Header(tensors=tensors, metadata=metadata, data_offset=data_offset)


@dataclass
class WeightSet:
    """All tensors of a checkpoint, single-file or sharded, validated up front and addressed by name."""

    tensors: dict[str, TensorInfo]
    files: list[Path]
    metadata: dict[str, str] | None = None
    index_path: Path | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> WeightSet:
        p = Path(path)
        header = read_header(p)
        return cls(tensors=header.tensors, files=[p], metadata=header.metadata)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def reader(self) -> WeightReader:
        return WeightReader(self)


class WeightReader:
    """Lazily opens each file once; tensors are zero-copy views of a private mmap, so reading is bounded by
    what the caller touches. Not thread-safe: use one reader per thread."""

    def __init__(self, weights: WeightSet) -> None:
        self._weights = weights
        self._handles: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> WeightReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._weights.tensors[name]
        except KeyError:
            ws = self._weights
            where = ws.index_path or (ws.files[0] if ws.files else "weights")
            raise NotFoundError(f"{where}: no tensor named {name!r}") from None

    def _handle(self, path: Path) -> Any:
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = self._stack.enter_context(safe_open(os.fspath(path), framework="pt", device="cpu"))
            except FileNotFoundError:
                raise NotFoundError(
                    f"{path}: file disappeared after it was validated; check the folder"
                ) from None
            except Exception as exc:  # safetensors raises its own SafetensorError on bad files
                raise _corrupt(path, f"cannot be opened ({exc})") from exc
            self._handles[path] = handle
        return handle

    def get(self, name: str) -> torch.Tensor:
        info = self._info(name)
        handle = self._handle(info.file)
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise _corrupt(info.file, f"tensor {name!r} cannot be read ({exc})") from exc

    def get_slice(self, name: str) -> Any:
        """A safetensors slice: index it to read only part of a tensor (e.g. one row block)."""
        info = self._info(name)
        return self._handle(info.file).get_slice(name)


def _safe_member(folder: Path, index: Path, name: object) -> Path:
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise _corrupt(index, f"weight_map names shard {name!r}, which is not a file inside {folder}")
    return folder / name


def open_weights(folder: str | os.PathLike[str], *, prefix: str = "model") -> WeightSet:
    """Open a Hugging Face weights folder the way transformers does: ``PREFIX.safetensors`` first,
    else ``PREFIX.safetensors.index.json`` and its shards, all validated before any merge starts."""
    root = Path(folder)
    if root.is_file():
        return WeightSet.from_file(root)
    if not root.is_dir():
        raise NotFoundError(f"{root}: folder not found; check the path")
    single = root / f"{prefix}.safetensors"
    if single.is_file():
        return WeightSet.from_file(single)
    index = root / f"{prefix}.safetensors.index.json"
    if not index.is_file():
        hint = ""
        if (root / f"pytorch_{prefix}.bin").exists() or (root / f"{prefix}.bin").exists():
            hint = " (only legacy .bin weights found; convert them to safetensors)"
        raise NotFoundError(
            f"{root}: no {single.name} or {index.name}{hint}; point at a Hugging Face model folder"
        )

    fix = "re-download or re-export the model"
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(index, f"not valid JSON ({str(exc).splitlines()[0]})", fix) from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _corrupt(index, "has no weight_map object listing the tensors", fix)

    bad = next((v for v in weight_map.values() if not isinstance(v, str)), None)
    if bad is not None:
        raise _corrupt(index, f"weight_map names shard {bad!r}, which is not a file name", fix)
    shard_names = sorted(set(weight_map.values()))
    headers: dict[str, Header] = {}
    for shard in shard_names:
        path = _safe_member(root, index, shard)
        if not path.is_file():
            raise NotFoundError(f"{index}: shard {shard} is missing; {fix}")
        headers[shard] = read_header(path)

    for name, shard in weight_map.items():
        if name not in headers[shard].tensors:
            raise _corrupt(
                index, f"weight_map puts {name!r} in {shard}, but that shard has no such tensor", fix
            )

    tensors: dict[str, TensorInfo] = {}
    for shard in shard_names:
        for name, info in headers[shard].tensors.items():
            if name in tensors:
                raise _corrupt(
                    root, f"tensor {name!r} is defined in both {tensors[name].file.name} and {shard}", fix
                )
            tensors[name] = info
    first = headers[shard_names[0]].metadata
    return WeightSet(tensors=tensors, files=[root / s for s in shard_names], metadata=first, index_path=index)


def load_torch_bin(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load legacy ``.bin`` weights without executing pickled code (``weights_only``)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"{p}: file not found; check the path")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise _corrupt(p, f"cannot be loaded as PyTorch weights ({reason})") from exc
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise _corrupt(p, "does not hold a mapping of tensor names to tensors")
    return obj


def check_finite(tensor: torch.Tensor, name: str, path: str | os.PathLike[str]) -> None:
    """Refuse NaN/Inf weights before they silently poison a merge; chunked so the mask stays small."""
    import torch

    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    flat = tensor.detach().reshape(-1)
    for i in range(0, flat.numel(), _FINITE_CHUNK):
        part = flat[i : i + _FINITE_CHUNK]
        try:
            ok = bool(torch.isfinite(part).all())
        except (RuntimeError, NotImplementedError):  # float8 kernels are missing on some builds
            ok = bool(torch.isfinite(part.float()).all())
        if not ok:
            raise CorruptFileError(
                f"{path}: tensor {name} contains NaN/Inf values; "
                "the adapter is broken, retrain or re-export it"
            )


# --------------------------------------------------------------------------------------------- sizes

_SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(size: int | str) -> int:
    """Bytes from ``"5GB"``-style text; decimal units like huggingface_hub, so shard sizes agree with it."""
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise InvalidInputError(f"size must be a number of bytes or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise InvalidInputError(f"size must not be negative, got {size}")
        return size
    m = _SIZE_RE.fullmatch(size)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise InvalidInputError(f"cannot parse size {size!r}; use a number with KB, MB, GB or TB, e.g. '5GB'")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])  # float like huggingface_hub, for identical results


def format_size(n: int) -> str:
    """Human-readable decimal size, matching the units :func:`parse_size` accepts."""
    if n < 1000:
        return f"{n} B"
    for unit, factor in (("KB", 10**3), ("MB", 10**6), ("GB", 10**9)):
        if round(n / factor, 1) < 1000:
            return f"{n / factor:.1f} {unit}"
    return f"{n / 10**12:.1f} TB"


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Planned:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    shard: int = 0
    begin: int = 0


def _normalize(spec: TensorSpec) -> tuple[str, str, tuple[int, ...], int]:
    name, dtype, shape = spec
    code = dtype_code(dtype)
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidInputError(f"tensor {name!r} has a negative dimension in shape {list(dims)}")
    return name, code, dims, _nbytes(code, dims)


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: int | str) -> list[list[TensorSpec]]:
    """Greedy split identical to huggingface_hub's, so our shard files match what ``save_pretrained`` makes.

    An oversized tensor gets a shard of its own, appended immediately (so it can precede the shard being
    filled); each shard keeps the input order of its tensors.
    """
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_size = 0
    for spec in specs:
        size = _normalize(spec)[3]
        if size > limit:
            shards.append([spec])
            continue
        if current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(spec)
        current_size += size
    if current:
        shards.append(current)
    return shards


def _shard_name(prefix: str, idx: int, count: int) -> str:
    return f"{prefix}.safetensors" if count == 1 else f"{prefix}-{idx + 1:05d}-of-{count:05d}.safetensors"


def _header_bytes(entries: Sequence[_Planned], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata is not None:
        header[METADATA_KEY] = dict(metadata)
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [e.begin, e.begin + e.nbytes],
        }
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # like the reference writer: data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


_WEIGHT_FILE_RE = r"{p}\.safetensors|{p}\.safetensors\.index\.json|{p}-\d{{5}}-of-\d{{5}}\.safetensors"


def _close_synced(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


class StreamingShardWriter:
    """Write a (sharded) safetensors checkpoint one tensor at a time.

    Headers depend only on names, dtypes and shapes, so every shard's header is fixed up front and each
    ``write()`` streams straight to disk. Tensors must be written in the order of ``specs`` (``.order``).
    Files appear under their final names only after every tensor was written; on any error or an incomplete
    run nothing but the pre-existing contents of ``out_dir`` remains.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        specs: Iterable[TensorSpec],
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
        prefix: str = "model",
        overwrite: bool = False,
        check_space: bool = True,
    ) -> None:
        if sys.byteorder != "little":
            raise OperationError(
                "safetensors is little-endian; writing from a big-endian host is not supported"
            )
        self.out_dir = Path(out_dir)
        self.metadata: dict[str, str] | None = {"format": "pt"} if metadata is None else dict(metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise InvalidInputError("safetensors metadata must map strings to strings")
        self._progress = progress
        self._prefix = prefix
        self._overwrite = overwrite
        self._check_space = check_space

        spec_list = list(specs)
        seen: set[str] = set()
        for name, *_ in spec_list:
            if not isinstance(name, str) or name == METADATA_KEY or name in seen:
                raise InvalidInputError(f"tensor name {name!r} is reserved, duplicated or not a string")
            seen.add(name)
        plan = plan_shards(spec_list, max_shard_size) or [[]]  # no tensors: still one (empty) file
        self.shard_names = [_shard_name(prefix, i, len(plan)) for i in range(len(plan))]

        by_name: dict[str, _Planned] = {}
        self._shard_entries: list[list[_Planned]] = []
        self._headers: list[bytes] = []
        for idx, shard in enumerate(plan):
            begin, entries = 0, []
            for spec in shard:
                name, code, shape, nbytes = _normalize(spec)
                entry = _Planned(name, code, shape, nbytes, idx, begin)
                entries.append(entry)
                by_name[name] = entry
                begin += nbytes
            self._shard_entries.append(entries)
            self._headers.append(_header_bytes(entries, self.metadata))
        self._order = [by_name[s[0]] for s in spec_list]
        self.weight_map = {e.name: self.shard_names[e.shard] for e in self._order}
        self.total_size = sum(e.nbytes for e in self._order)
        self.total_parameters = sum(math.prod(e.shape) for e in self._order)
        self.files: list[Path] = []  # final paths, filled on success
        self.index_path: Path | None = None

        self._next = 0
        self._left = [len(entries) for entries in self._shard_entries]
        # Writing and hashing run on one background thread, in submission order, so the caller
        # computes the next tensor while the previous one reaches the disk.
        self._pool: Any = None
        self._pending: list[tuple[Any, int]] = []
        self._hashers: dict[int, Any] = {}
        self.sha256: dict[str, str] = {}  # final file name -> sha256, filled on success
        self._unsynced = 0  # bytes written since the last fdatasync (writer thread only)
        self._in_flight = _IN_FLIGHT_TENSORS * max((e.nbytes for e in self._order), default=0)
        self._open: dict[int, IO[bytes]] = {}
        self._temps: dict[int, Path] = {}
        self._done = False
        self._entered = False

    @property
    def order(self) -> list[str]:
        return [e.name for e in self._order]

    @property
    def file_bytes(self) -> int:
        """Bytes the finished files take on disk (headers included), for space checks."""
        return self.total_size + sum(len(h) for h in self._headers)

    def __enter__(self) -> StreamingShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self._overwrite:
            existing = self._existing_weight_files()
            if existing:
                raise InvalidInputError(
                    f"{self.out_dir}: already holds {existing[0].name}; choose an empty output folder"
                )
        if self._check_space:
            ensure_space(self.out_dir, self.file_bytes, "the weights being written")
        self._entered = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
            return
        self.commit()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Stream one tensor's bytes after checking it is the planned next tensor with planned dtype/shape."""
        if not self._entered or self._done:
            raise OperationError(f"{self.out_dir}: writer is not open; use it as a context manager")
        if self._next >= len(self._order):
            raise OperationError(
                f"{self.out_dir}: all {len(self._order)} tensors already written, got {name!r}"
            )
        entry = self._order[self._next]
        if name != entry.name:
            raise OperationError(
                f"{self.out_dir}: expected tensor {entry.name!r} next but got {name!r}; "
                "write tensors in planned order"
            )
        shape = tuple(tensor.shape)
        if shape != entry.shape:
            raise OperationError(
                f"{self.out_dir}: tensor {name!r} has shape {list(shape)}, planned {list(entry.shape)}"
            )
        code = dtype_code(tensor.dtype)
        if code != entry.dtype:
            raise OperationError(f"{self.out_dir}: tensor {name!r} has dtype {code}, planned {entry.dtype}")

        f = self._file(entry.shard)
        if entry.nbytes:
            import torch

            t = tensor.detach()
            if t.device.type != "cpu":
                t = t.to("cpu")
            t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
            view = memoryview(t.view(torch.uint8).numpy())
            h = self._hashers[entry.shard]
            for i in range(0, entry.nbytes, _WRITE_CHUNK):
                chunk = view[i : i + _WRITE_CHUNK]
                self._submit((self._write_chunk, f, chunk), (h.update, chunk), size=len(chunk))
                if self._progress is not None:
                    self._progress(len(chunk))
        self._next += 1
        self._left[entry.shard] -= 1
        if self._left[entry.shard] == 0:
            self._finish(entry.shard)

    def _existing_weight_files(self) -> list[Path]:
        pattern = re.compile(_WEIGHT_FILE_RE.format(p=re.escape(self._prefix)))
        return sorted(p for p in self.out_dir.iterdir() if pattern.fullmatch(p.name))

    def _file(self, shard: int) -> IO[bytes]:
        f = self._open.get(shard)
        if f is None:
            fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{self.shard_names[shard]}.", suffix=".tmp")
            self._temps[shard] = Path(tmp)
            f = os.fdopen(fd, "wb")
            os.fchmod(fd, 0o644)
            self._open[shard] = f
            f.write(self._headers[shard])
            self._hashers[shard] = hashlib.sha256(self._headers[shard])
        return f

    def _write_chunk(self, f: IO[bytes], chunk: memoryview) -> None:
        """Write, and push dirty pages to disk every ``_SYNC_EVERY`` bytes so the final fsync
        is short: the disk works while the next tensors are computed, not after them."""
        f.write(chunk)
        self._unsynced += len(chunk)
        if self._unsynced >= _SYNC_EVERY:
            f.flush()
            os.fdatasync(f.fileno())
            self._unsynced = 0

    def _submit(self, write: tuple[Any, ...], hash_: tuple[Any, ...] | None = None, *, size: int = 0) -> None:
        """Queue a write (and the matching hash update) on the two I/O threads, in order.

        Writing and hashing run on separate threads (both release the GIL), so sha256 costs no
        extra wall time on a disk-bound merge; ``size`` bytes stay referenced until both finish.
        """
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = (
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptr-writer"),
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptr-hasher"),
            )
        futures = [self._pool[0].submit(*write)]
        if hash_ is not None:
            futures.append(self._pool[1].submit(*hash_))
        self._pending.append((futures, size))
        while sum(n for _, n in self._pending) > self._in_flight:
            for fut in self._pending.pop(0)[0]:
                fut.result()
        while self._pending and all(f.done() for f in self._pending[0][0]):
            for fut in self._pending.pop(0)[0]:
                fut.result()

    def _drain(self, *, raise_errors: bool = True) -> None:
        pending, self._pending = self._pending, []
        error: BaseException | None = None
        for futures, _ in pending:
            for fut in futures:
                try:
                    fut.result()
                except BaseException as e:
                    error = error or e
        if self._pool is not None:
            for pool in self._pool:
                pool.shutdown(wait=True)
            self._pool = None
        if error is not None and raise_errors:
            raise error

    def _finish(self, shard: int) -> None:
        f = self._file(shard)  # opens (and writes the header of) a shard with no tensors
        del self._open[shard]
        self._submit((_close_synced, f))

    def commit(self) -> None:
        """Rename temp files into place; refuses (and cleans up) if any planned tensor was not written."""
        if self._done:
            return
        if self._next != len(self._order):
            missing = self._order[self._next].name
            self.abort()
            raise OperationError(
                f"{self.out_dir}: only {self._next} of {len(self._order)} tensors were written "
                f"(next: {missing!r}); nothing was saved"
            )
        finals = [self.out_dir / n for n in self.shard_names]
        index_path = self.out_dir / f"{self._prefix}.safetensors.index.json" if len(finals) > 1 else None
        renamed: list[Path] = []
        try:
            for shard in range(len(self.shard_names)):
                if shard not in self._temps:
                    self._finish(shard)
            self._drain()
            if self._overwrite:
                # Drop stale files first: a crash then leaves no weights rather than an old single file
                # that transformers would load ahead of the new shards.
                for path in set(self._existing_weight_files()) - {*finals, index_path}:
                    path.unlink(missing_ok=True)
            for shard, final in enumerate(finals):
                os.replace(self._temps.pop(shard), final)
                renamed.append(final)
            if index_path is not None:
                index = {
                    "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                    "weight_map": self.weight_map,
                }
                atomic_write_json(index_path, index)
            fsync_dir(self.out_dir)
        except BaseException:
            self.abort()
            for path in renamed:
                path.unlink(missing_ok=True)
            raise
        self.index_path = index_path
        self.files = finals
        self.sha256 = {self.shard_names[i]: h.hexdigest() for i, h in self._hashers.items()}
        self._done = True

    def abort(self) -> None:
        """Close and delete temp files; safe to call more than once."""
        self._drain(raise_errors=False)
        for f in self._open.values():
            with contextlib.suppress(OSError):
                f.close()
        self._open.clear()
        for tmp in self._temps.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._temps.clear()
        self._done = True


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "DTYPE_BITS",
    "DTYPE_BYTES",
    "MAX_HEADER_SIZE",
    "Header",
    "StreamingShardWriter",
    "TensorInfo",
    "TensorSpec",
    "WeightReader",
    "WeightSet",
    "check_finite",
    "code_to_torch",
    "dtype_code",
    "format_size",
    "load_torch_bin",
    "open_weights",
    "parse_size",
    "plan_shards",
    "read_header",
    "torch_dtype",
    "torch_to_code",
]  # fmt: skip
