"""One input schema per operation: CLI flags, YAML files and REST bodies all validate here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adaptr.errors import InvalidInputError

DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}


class MergeSpec(BaseModel):
    """What to merge, how, and where the result goes."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    base: str | None = Field(None, description="Base model (NAME[@N]); default: the adapters' base.")
    adapters: list[str] = Field(..., min_length=1, description="Adapters to merge (NAME[@N]).")
    strategy: str | None = Field(None, description="Merge strategy; default: simple for one adapter.")
    weights: list[float] | None = Field(None, description="One weight per adapter (default 1.0 each).")
    density: float | None = Field(
        None, description="Fraction of each delta kept (ties, dare_*, magnitude_prune)."
    )
    lambda_: float | None = Field(None, alias="lambda", description="Scale applied to the merged delta.")
    normalize: bool | None = Field(None, description="Divide by the sum of weights (linear, dare_linear).")
    rescale: Literal["density", "l1", "none"] | None = Field(
        None, description="DARE rescale of kept entries."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Extra parameters of plugin strategies.")
    seed: int = Field(0, ge=0, lt=2**63, description="Seed for random steps (DARE).")
    dtype: str | None = Field(None, description="Output dtype: bf16, fp16 or fp32 (default: the base's).")
    max_shard_size: str | int = Field("5GB", description="Largest output shard (decimal units, e.g. 5GB).")
    modules_to_save_from: str | None = Field(None, description="Adapter whose modules_to_save tensors win.")
    name: str = Field(..., description="Catalog name of the merged model.")
    new_version: bool = Field(False, description="Add a new version when NAME exists.")
    verify: bool = Field(False, description="Compare logits against the unmerged adapter (simple merges).")
    verify_tolerance: float = Field(0.05, gt=0, description="Largest allowed max |logit difference|.")
    qlora: str | None = Field(
        None, description="Quantizer the adapters were trained on (nf4): merge into its dequantized base."
    )
    qlora_params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of the --qlora quantizer (e.g. double_quant)."
    )
    requantize: str | None = Field(None, description="Quantize the merged result in the same pass (nf4).")
    quant_params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of the --requantize quantizer."
    )
    skip: list[str] | None = Field(
        None, description="Modules left unquantized (default: lm_head and the embeddings)."
    )
    backend: str = Field(
        "auto",
        description="Where the arithmetic runs: auto (a GPU backend when usable), torch, or a backend.",
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.lower() not in DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {v!r}; use bf16, fp16 or fp32")
        return DTYPE_ALIASES[v.lower()]

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(w) for w in v):
            raise ValueError("weights must be finite numbers")
        return v

    @field_validator("density", "lambda_")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    def strategy_args(self) -> dict[str, Any]:
        """The parameters a strategy may declare, as given (None = not given)."""
        given = {
            "density": self.density,
            "lambda": self.lambda_,
            "normalize": self.normalize,
            "rescale": self.rescale,
        }
        return {**{k: v for k, v in given.items() if v is not None}, **self.params}


class QuantizeSpec(BaseModel):
    """Which model to quantize, with which quantizer, and the name of the result."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    input: str = Field(..., description="Base or merged model to quantize (NAME[@N]).")
    method: str = Field(..., description="Quantizer: nf4, fp4, int8, fp8 or a plugin's.")
    double_quant: bool | None = Field(None, description="Quantize the block scales too (nf4, fp4).")
    blocksize: int | None = Field(None, description="Weights per scale block (nf4, fp4; default 64).")
    params: dict[str, Any] = Field(default_factory=dict, description="Other quantizer parameters.")
    skip: list[str] | None = Field(
        None, description="Modules left unquantized (default: lm_head and the embeddings)."
    )
    name: str = Field(..., description="Catalog name of the quantized model.")
    new_version: bool = Field(False, description="Add a new version when NAME exists.")
    max_shard_size: str | int = Field("5GB", description="Largest output shard (decimal units, e.g. 5GB).")
    backend: str = Field(
        "auto",
        description="Where the arithmetic runs: auto (a GPU backend when usable), torch, or a backend.",
    )

    def quantizer_args(self) -> dict[str, Any]:
        given = {"double_quant": self.double_quant, "blocksize": self.blocksize}
        return {**{k: v for k, v in given.items() if v is not None}, **self.params}


class ExportSpec(BaseModel):
    """Which artifact to export, in which format, to which path."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    input: str = Field(..., description="Artifact to export (NAME[@N]).")
    format: str = Field(..., description="Exporter: gguf or a plugin's.")
    out: Path = Field(..., description="Output path: a file (gguf) or a folder.")
    quant: str | None = Field(
        None, description="Tensor type inside the export (gguf: f16, bf16, q8_0, q4_0)."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Other exporter parameters.")
    force: bool = Field(False, description="Replace an existing output path.")

    def exporter_args(self) -> dict[str, Any]:
        return {**({"quant": self.quant} if self.quant is not None else {}), **self.params}


def validate_spec(cls: type[BaseModel], data: dict[str, Any], source: str = "merge options") -> Any:
    """Build a spec, turning pydantic's multi-line report into one actionable line."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "input"
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidInputError(f"{source}: {where}: {msg}") from None


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise InvalidInputError(f"{path}: invalid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: expected a mapping of merge options at the top level")
    return data
