"""Per-tensor GGUF types and encoding, streamed: one tensor, in row chunks, at a time.

Type rules follow llama.cpp: 1-D tensors, norms and non-``.weight`` tensors stay F32; a row length
that is not a multiple of the quant block falls back to F16 (``convert_hf_to_gguf.py`` /
``llama-quantize``). Encoding goes through ``gguf.quants.quantize``, the bit-exact reference of
ggml's own quantizers, chunk by chunk into a preallocated output, so the float32 copies it makes
are bounded by the chunk, not by the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adaptr.errors import InvalidInputError

QUANTS = ("f16", "bf16", "q8_0", "q4_0")
_CHUNK_ELEMENTS = 1 << 22  # float32 working set per chunk: 16 MiB (x a few temporaries in gguf.quants)


def quant_types(quant: str) -> tuple[Any, Any]:
    """(tensor type, ``general.file_type``) for a ``--quant`` name."""
    import gguf

    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    table = {
        "f16": (T.F16, F.MOSTLY_F16),
        "bf16": (T.BF16, F.MOSTLY_BF16),
        "q8_0": (T.Q8_0, F.MOSTLY_Q8_0),
        "q4_0": (T.Q4_0, F.MOSTLY_Q4_0),
    }
    if quant not in table:
        raise InvalidInputError(
            f"--quant {quant!r} is not a GGUF type adaptr writes; use one of: {', '.join(QUANTS)}"
        )
    return table[quant]


def choose_type(name: str, shape: tuple[int, ...], quant: str, *, is_output: bool = False) -> Any:
    """The ggml type llama.cpp would give tensor ``name`` (GGUF name) of torch ``shape`` under ``quant``."""
    import gguf

    T = gguf.GGMLQuantizationType
    if (
        len(shape) <= 1
        or name.endswith("_norm.weight")
        or not name.endswith((".weight", ".lora_a", ".lora_b"))
    ):
        return T.F32
    qtype = quant_types(quant)[0]
    if quant == "q4_0" and is_output:
        # llama-quantize gives the output head Q6_K (Q8_0 when its rows do not split into 256-blocks);
        # the gguf package cannot write K-quants, so Q8_0 it is.
        qtype = T.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return T.F16
    return qtype


def byte_shape(shape: tuple[int, ...], qtype: Any) -> tuple[int, ...]:
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype in (T.F32, T.F16):
        return tuple(shape)
    return tuple(gguf.quant_shape_to_byte_shape(shape, qtype))


def _np_dtype(qtype: Any) -> Any:
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    return {T.F32: np.float32, T.F16: np.float16}.get(qtype, np.uint8)


def nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    return math.prod(byte_shape(shape, qtype)) * _np_dtype(qtype)().itemsize


def qk_permutation(rows: int, n_head: int) -> Any:
    """Row order of llama.cpp's ``LlamaModel.permute`` as an index: ``permute(W) == W[index]``.

    (It moves only output rows, so it works the same on a weight, a bias or a LoRA B.)
    """
    import torch

    if rows % (2 * n_head):
        raise InvalidInputError(f"{rows} rows do not split into {n_head} rotary heads; check config.json")
    index = torch.arange(rows).reshape(n_head, 2, rows // n_head // 2)
    return index.swapaxes(1, 2).reshape(rows)


@dataclass
class Planned:
    """One output tensor: where its data comes from and how it is encoded."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order (rows last-dim-contiguous)
    qtype: Any
    load: Callable[[], Any]  # -> torch tensor or numpy array in ``shape`` (lazy: a memory-mapped view)
    rows: Any = None  # optional row index (the q/k permutation), applied chunk by chunk
    scale: float | None = None  # optional factor applied in float32 before encoding
    source_bytes: int = 0  # bytes read from the input, for progress

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.qtype)

    def add_info(self, writer: Any) -> None:
        import gguf
        import numpy as np

        T = gguf.GGMLQuantizationType
        if self.qtype in (T.F32, T.F16):
            writer.add_tensor_info(self.name, self.shape, np.dtype(_np_dtype(self.qtype)), self.nbytes)
        else:
            shape = byte_shape(self.shape, self.qtype)
            writer.add_tensor_info(self.name, shape, np.dtype(np.uint8), self.nbytes, raw_dtype=self.qtype)

    def encode(self) -> Any:
        """The tensor's bytes as a numpy array, built chunk by chunk."""
        import gguf
        import numpy as np
        import torch

        src = self.load()
        if isinstance(src, np.ndarray):
            src = torch.from_numpy(src)
        if tuple(src.shape) != self.shape:
            raise InvalidInputError(
                f"tensor for {self.name} has shape {list(src.shape)}, expected {list(self.shape)}"
            )
        if not (src.dtype.is_floating_point):
            raise InvalidInputError(f"tensor for {self.name} is {src.dtype}; GGUF export takes float weights")
        rows = self.rows
        if src.dim() == 1 and rows is not None:  # a bias: its elements are the rows
            src, rows = src[rows], None
        ncols = self.shape[-1] if self.shape else 1
        flat = src.reshape(-1, ncols)
        out = np.empty(byte_shape((flat.shape[0], ncols), self.qtype), dtype=_np_dtype(self.qtype))
        step = max(1, _CHUNK_ELEMENTS // max(ncols, 1))
        for i in range(0, flat.shape[0], step):
            chunk = flat[rows[i : i + step]] if rows is not None else flat[i : i + step]
            x = chunk.to(torch.float32)
            if self.scale is not None:
                x = x * self.scale
            out[i : i + step] = gguf.quants.quantize(x.numpy(), self.qtype)
        return out.reshape(byte_shape(self.shape, self.qtype))


def write_gguf(
    path: Any,
    arch_name: str,
    kv: Callable[[Any], None],
    planned: list[Planned],
    progress: Callable[..., None] | None,
) -> None:
    """Header, metadata and tensor infos first, then each tensor's data in the same order.

    Peak memory is one encoded tensor plus one chunk's float32 temporaries.
    """
    import gguf

    writer = gguf.GGUFWriter(path, arch_name)
    try:
        kv(writer)
        for t in planned:
            t.add_info(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(planned, start=1):
            data = t.encode()
            writer.write_tensor_data(data)
            del data
            if progress is not None:
                progress(t.source_bytes, f"{i}/{len(planned)} tensors")
        writer.flush()
        for fout in writer.fout or ():
            import os

            os.fsync(fout.fileno())
    finally:
        writer.close()
