"""Reads a Hugging Face model folder (config.json + safetensors, single or sharded)."""

from __future__ import annotations

from pathlib import Path

from adaptr.errors import InvalidInputError
from adaptr.interfaces import ModelManifest, TensorMeta
from adaptr.io.safetensors_io import open_weights

from .jsonfile import load_json_object

_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _first(cfg: dict, *keys: str) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int):
            return v
    text = cfg.get("text_config")
    if isinstance(text, dict):
        return _first(text, *keys)
    return None


class HFModelReader:
    name = "hf-safetensors"
    kind = "base"

    def can_read(self, path: Path) -> bool:
        return (path / "config.json").is_file() and (
            (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
        )

    def read(self, path: Path) -> ModelManifest:
        if not path.is_dir():
            raise InvalidInputError(f"{path}: not a directory; pass a Hugging Face model folder")
        cfg = load_json_object(
            path / "config.json",
            "a Hugging Face model folder needs config.json and model.safetensors (or shards + index)",
        )
        if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
            raise InvalidInputError(
                f"{path}: no model.safetensors or model.safetensors.index.json; "
                "save the model with safetensors (save_pretrained does by default)"
            )
        weights = open_weights(path)
        tensors = {
            name: TensorMeta(list(t.shape), t.dtype, t.file.relative_to(path).as_posix())
            for name, t in weights.tensors.items()
        }
        float_dtypes = [t.dtype for t in tensors.values() if t.dtype in _DTYPE_NAMES]
        dtype = cfg.get("dtype") or cfg.get("torch_dtype")
        if not isinstance(dtype, str) and float_dtypes:
            dtype = _DTYPE_NAMES[max(set(float_dtypes), key=float_dtypes.count)]
        archs = cfg.get("architectures") or [None]
        return ModelManifest(
            format=self.name,
            architecture=archs[0],
            model_type=cfg.get("model_type"),
            hidden_size=_first(cfg, "hidden_size", "n_embd", "d_model"),
            intermediate_size=_first(cfg, "intermediate_size", "n_inner", "ffn_dim"),
            num_layers=_first(cfg, "num_hidden_layers", "n_layer", "num_layers"),
            vocab_size=_first(cfg, "vocab_size"),
            dtype=dtype if isinstance(dtype, str) else None,
            num_parameters=weights.num_parameters,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", "lm_head.weight" not in tensors)),
            weight_files=[f.relative_to(path).as_posix() for f in weights.files],
            tensors=tensors,
        )

    def canonical_files(self, path: Path, dest: Path) -> list[str]:
        import shutil

        from adaptr.store import list_files

        rels = []
        for src in list_files(path):
            rel = src.relative_to(path)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / rel)
            rels.append(rel.as_posix())
        return rels
