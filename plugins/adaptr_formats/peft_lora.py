"""Reads a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors/.bin).

Computes each module's effective rank, alpha and scaling exactly as PEFT does
(rank_pattern/alpha_pattern, rsLoRA), validates the factors against each other and
refuses non-finite weights, so nothing broken ever reaches the catalog.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

from adaptr.errors import CorruptFileError, IncompatibleAdapterError, InvalidInputError
from adaptr.interfaces import AdapterManifest, LoraModule, TensorMeta

from .jsonfile import load_json_object

PREFIX = "base_model.model."
SAFETENSORS = "adapter_model.safetensors"
LEGACY_BIN = "adapter_model.bin"
# init_lora_weights values whose saved factors assume a modified (residual) base.
_RESIDUAL_INITS = ("pissa", "olora", "loftq", "corda")

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!weight$|bias$)[^.]+)?(?:\.(?P<leaf>weight|bias))?$"
)


def get_pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's rule: the first pattern (dict order) matching the end of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _tensor_layout(path: Path, weights_file: str) -> tuple[dict[str, TensorMeta], dict[str, Any] | None]:
    """Header-only layout for safetensors; a legacy .bin must be loaded to know shapes."""
    file = path / weights_file
    if weights_file == SAFETENSORS:
        from adaptr.io.safetensors_io import read_header

        header = read_header(file)
        return {k: TensorMeta(list(t.shape), t.dtype, weights_file) for k, t in header.tensors.items()}, None
    from adaptr.io.safetensors_io import dtype_code, load_torch_bin

    state = load_torch_bin(file)
    bad = [k for k, v in state.items() if not hasattr(v, "shape")]
    if bad:
        raise CorruptFileError(f"{file}: entry {bad[0]!r} is not a tensor; re-export the adapter")
    return {k: TensorMeta(list(v.shape), dtype_code(v.dtype), weights_file) for k, v in state.items()}, state


def _check_finite(path: Path, weights_file: str, state: dict[str, Any] | None) -> None:
    from adaptr.io.safetensors_io import check_finite

    file = path / weights_file
    if state is not None:
        for k, v in state.items():
            check_finite(v, k, file)
        return
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            check_finite(f.get_tensor(k), k, file)


class PeftLoraReader:
    name = "peft-lora"
    kind = "adapter"

    def can_read(self, path: Path) -> bool:
        return (path / "adapter_config.json").is_file()

    def _weights_file(self, path: Path) -> str:
        if (path / SAFETENSORS).is_file():
            return SAFETENSORS
        if (path / LEGACY_BIN).is_file():
            return LEGACY_BIN
        raise InvalidInputError(
            f"{path}: no {SAFETENSORS} (or legacy {LEGACY_BIN}); save the adapter with "
            "PeftModel.save_pretrained"
        )

    def read(self, path: Path) -> AdapterManifest:
        if not path.is_dir():
            raise InvalidInputError(f"{path}: not a directory; pass a PEFT adapter folder")
        cfg = load_json_object(
            path / "adapter_config.json", "a PEFT adapter folder needs adapter_config.json"
        )
        cfg_file = path / "adapter_config.json"
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise InvalidInputError(
                f"{cfg_file}: peft_type is {cfg.get('peft_type')!r}; adaptr handles LoRA adapters only"
            )
        weights_file = self._weights_file(path)
        tensors, state = _tensor_layout(path, weights_file)
        if not tensors:
            raise CorruptFileError(f"{path / weights_file}: holds no tensors; re-export the adapter")

        r = cfg.get("r", 8)
        alpha = cfg.get("lora_alpha", 8)
        if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float):
            raise InvalidInputError(f"{cfg_file}: r must be a positive integer and lora_alpha a number")
        rank_pattern = dict(cfg.get("rank_pattern") or {})
        alpha_pattern = dict(cfg.get("alpha_pattern") or {})
        use_rslora = bool(cfg.get("use_rslora", False))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))

        parts: dict[str, dict[str, str]] = {}
        replacements: dict[str, str] = {}
        base_layers: dict[str, str] = {}
        for key in tensors:
            rel = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            m = _LORA_KEY.match(rel)
            if m:
                part = m["part"] + (".bias" if m["leaf"] == "bias" else "")
                parts.setdefault(m["module"], {})[part] = key
            elif ".base_layer." in rel:
                base_layers[rel] = key
            else:
                replacements[rel] = key

        # PEFT saves a targeted module's base weight too (`<m>.base_layer.weight`): a copy of
        # the base, not a replacement, unless the module is not LoRA-targeted at all.
        for rel, key in base_layers.items():
            module = rel.split(".base_layer.")[0]
            if module not in parts:
                replacements[rel.replace(".base_layer.", ".")] = key

        modules: dict[str, LoraModule] = {}
        for module, p in sorted(parts.items()):
            embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
            a_key = p.get("lora_embedding_A" if embedding else "lora_A")
            b_key = p.get("lora_embedding_B" if embedding else "lora_B")
            if a_key is None or b_key is None:
                missing = "A" if a_key is None else "B"
                raise CorruptFileError(
                    f"{path / weights_file}: module {module} has no lora_{missing} tensor; re-export the adapter"
                )
            a_shape, b_shape = tensors[a_key].shape, tensors[b_key].shape
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise InvalidInputError(
                    f"{path / weights_file}: module {module} has {len(a_shape)}-D LoRA factors; "
                    "only linear and embedding LoRA layers are supported"
                )
            if a_shape[0] != b_shape[1]:
                raise IncompatibleAdapterError(
                    f"{path / weights_file}: module {module}: lora_A is {a_shape} (rank {a_shape[0]}) but "
                    f"lora_B is {b_shape} (rank {b_shape[1]}); the factors do not belong together"
                )
            rk = get_pattern_key(rank_pattern, module)
            ak = get_pattern_key(alpha_pattern, module)
            m_r = int(rank_pattern[rk]) if rk is not None else r
            m_alpha = float(alpha_pattern[ak]) if ak is not None else float(alpha)
            if a_shape[0] != m_r:
                raise IncompatibleAdapterError(
                    f"{path / weights_file}: module {module} has rank {a_shape[0]} but adapter_config.json "
                    f"implies r={m_r}; fix r/rank_pattern in the config"
                )
            scaling = m_alpha / math.sqrt(m_r) if use_rslora else m_alpha / m_r
            modules[module] = LoraModule(
                module=module,
                target=f"{module}.weight",
                kind="embedding" if embedding else "linear",
                r=m_r,
                alpha=m_alpha,
                scaling=scaling,
                a_key=a_key,
                b_key=b_key,
                a_shape=list(a_shape),
                b_shape=list(b_shape),
                bias_key=p.get("lora_B.bias"),
                magnitude_key=p.get("lora_magnitude_vector"),
                fan_in_fan_out=fan_in_fan_out and not embedding,
            )
        if not modules and not replacements:
            raise CorruptFileError(f"{path / weights_file}: holds no LoRA tensors; re-export the adapter")

        _check_finite(path, weights_file, state)

        flags: list[str] = []
        init = cfg.get("init_lora_weights", True)
        if bool(cfg.get("use_dora")) or any(m.magnitude_key for m in modules.values()):
            flags.append("dora")
        if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
            flags.append(f"residual_init:{init.lower().split('_')[0]}")
        if replacements:
            flags.append("modules_to_save")
        if weights_file == LEGACY_BIN:
            flags.append("legacy_bin")
        if cfg.get("layer_replication"):
            flags.append("layer_replication")
        if cfg.get("trainable_token_indices"):
            flags.append("trainable_tokens")

        target = cfg.get("target_modules")
        return AdapterManifest(
            format=self.name,
            weights_file=SAFETENSORS,
            r=r,
            lora_alpha=float(alpha),
            use_rslora=use_rslora,
            use_dora="dora" in flags,
            lora_bias=bool(cfg.get("lora_bias", False)) or any(m.bias_key for m in modules.values()),
            fan_in_fan_out=fan_in_fan_out,
            target_modules=sorted(target) if isinstance(target, list) else target,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            modules_to_save=list(cfg.get("modules_to_save") or []),
            init_lora_weights=init,
            base_model_name_or_path=cfg.get("base_model_name_or_path"),
            modules=modules,
            replacements=replacements,
            tensors={k: TensorMeta(v.shape, v.dtype, SAFETENSORS) for k, v in tensors.items()},
            trainable_parameters=sum(math.prod(t.shape) for t in tensors.values()),
            flags=flags,
            legacy_bin=weights_file == LEGACY_BIN,
            config=cfg,
        )

    def canonical_files(self, path: Path, dest: Path) -> list[str]:
        """Copy the config and weights; a legacy .bin is rewritten as safetensors."""
        shutil.copyfile(path / "adapter_config.json", dest / "adapter_config.json")
        if (path / SAFETENSORS).is_file():
            shutil.copyfile(path / SAFETENSORS, dest / SAFETENSORS)
        else:
            from safetensors.torch import save_file

            from adaptr.io.safetensors_io import load_torch_bin

            state = {k: v.detach().contiguous().clone() for k, v in load_torch_bin(path / LEGACY_BIN).items()}
            save_file(state, str(dest / SAFETENSORS), metadata={"format": "pt"})
        return ["adapter_config.json", SAFETENSORS]
