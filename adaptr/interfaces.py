"""What plugins implement, and the manifests readers hand to the core.

Manifests are plain dataclasses that serialise to JSON; the catalog stores them as an
artifact's metadata, so later operations (merges, exports) never re-parse the files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorMeta:
    shape: list[int]
    dtype: str  # safetensors code, e.g. "BF16"
    file: str  # path relative to the artifact folder


@dataclass
class ModelManifest:
    """A base model as a reader understood it, without loading its weights."""

    format: str
    architecture: str | None
    model_type: str | None
    hidden_size: int | None
    intermediate_size: int | None
    num_layers: int | None
    vocab_size: int | None
    dtype: str | None
    num_parameters: int
    tie_word_embeddings: bool
    weight_files: list[str]
    tensors: dict[str, TensorMeta]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelManifest:
        d = dict(d)
        d["tensors"] = {k: TensorMeta(**v) for k, v in d["tensors"].items()}
        return cls(**d)


@dataclass
class LoraModule:
    """One targeted base module: where its factors live and how strongly they apply."""

    module: str  # module path inside the base model, e.g. model.layers.0.self_attn.q_proj
    target: str  # base tensor the delta applies to, e.g. <module>.weight
    kind: Literal["linear", "embedding"]
    r: int
    alpha: float
    scaling: float
    a_key: str
    b_key: str
    a_shape: list[int]
    b_shape: list[int]
    bias_key: str | None = None
    magnitude_key: str | None = None
    fan_in_fan_out: bool = False

    @property
    def delta_shape(self) -> list[int]:
        out, inn = self.b_shape[0], self.a_shape[1]
        return [inn, out] if (self.fan_in_fan_out or self.kind == "embedding") else [out, inn]


@dataclass
class AdapterManifest:
    """A LoRA adapter's configuration and tensor layout, with effective per-module scaling."""

    format: str
    weights_file: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    lora_bias: bool
    fan_in_fan_out: bool
    target_modules: list[str] | str | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    modules_to_save: list[str]
    init_lora_weights: Any
    base_model_name_or_path: str | None
    modules: dict[str, LoraModule]
    replacements: dict[str, str]  # base tensor name -> adapter tensor key (absolute values)
    tensors: dict[str, TensorMeta]
    trainable_parameters: int
    flags: list[str] = field(default_factory=list)
    legacy_bin: bool = False
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterManifest:
        d = dict(d)
        d["modules"] = {k: LoraModule(**v) for k, v in d["modules"].items()}
        d["tensors"] = {k: TensorMeta(**v) for k, v in d["tensors"].items()}
        return cls(**d)


@runtime_checkable
class Reader(Protocol):
    """Understands one on-disk layout of base models (``kind="base"``) or adapters."""

    name: str
    kind: Literal["base", "adapter"]

    def can_read(self, path: Path) -> bool:
        """Cheap check (file names, config keys) whether this reader claims ``path``."""

    def read(self, path: Path) -> ModelManifest | AdapterManifest:
        """Parse and validate the folder; raise InvalidInputError subclasses on bad input."""

    def canonical_files(self, path: Path, dest: Path) -> list[str]:
        """Write the files adaptr stores for this artifact into ``dest``; return their relpaths."""


@dataclass(frozen=True)
class ParamDef:
    """A strategy parameter: its name (as in flags, YAML and REST bodies) and default."""

    name: str
    type: type
    default: Any
    help: str


@runtime_checkable
class MergeStrategy(Protocol):
    """Combines per-adapter weight deltas of one tensor into one delta.

    ``merge`` receives fp32 deltas ΔW_i (already scaled by each adapter's alpha/r), the
    per-adapter weights, the resolved parameters and one Philox key per delta (derived from
    the merge seed, the tensor name and the adapter's position), and returns the merged
    fp32 delta. Random steps must draw from those keys so results are reproducible.

    Optionally a strategy may also define ``merge_onto(base, deltas, weights, params, *, seeds,
    out_dtype)`` returning ``(base + merge(...)).to(out_dtype)``: the engine then calls it instead,
    so the base add and the cast can be fused into the strategy's last pass over memory.
    """

    name: str
    pretty_name: str
    paper_url: str | None
    description: str
    params: tuple[ParamDef, ...]
    allows_negative_weights: bool
    max_adapters: int | None

    def merge(
        self,
        deltas: list[torch.Tensor],
        weights: list[float],
        params: dict[str, Any],
        *,
        seeds: list[int],
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class PartSpec:
    """One stored tensor a quantizer writes for a source tensor: full name, safetensors code, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@runtime_checkable
class Quantizer(Protocol):
    """A quantization backend (``register_quantizers``): turns one float weight into stored parts.

    The engine streams a model one tensor at a time, so a quantizer works per tensor and must
    say, before any weight is read, exactly which tensors it will write (``layout``): the
    safetensors headers are fixed up front. ``params`` are resolved like a strategy's (flags,
    YAML and REST bodies all use their names) and passed to every method.

    ``name`` is the method users pass (``--method nf4``); ``quant_method`` in the checkpoint's
    ``quantization_config`` is whatever ``config`` returns.
    """

    name: str
    description: str
    params: tuple[ParamDef, ...]

    def refuse(self, name: str, shape: tuple[int, ...], dtype: str, params: dict[str, Any]) -> str | None:
        """Why this tensor cannot be quantized (e.g. "1-D"), or None; refused tensors stay as they are."""

    def layout(self, name: str, shape: tuple[int, ...], dtype: str, params: dict[str, Any]) -> list[PartSpec]:
        """The tensors ``quantize`` returns for weight ``name`` of ``shape`` and safetensors ``dtype``."""

    def quantize(self, name: str, tensor: torch.Tensor, params: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Quantize one weight; returns ``{part name: tensor}`` exactly as ``layout`` announced."""

    def dequantize(
        self, name: str, parts: dict[str, torch.Tensor], params: dict[str, Any], dtype: torch.dtype
    ) -> torch.Tensor:
        """Rebuild weight ``name`` (in ``dtype``, original shape) from its parts."""

    def config(self, params: dict[str, Any], skipped: list[str], compute_dtype: str) -> dict[str, Any]:
        """The ``quantization_config`` for config.json, so transformers (and vLLM) load the result."""


@dataclass
class ExportRequest:
    """Everything an exporter needs; the service resolved and validated it from the catalog.

    ``dest`` is an empty staging folder on the output's filesystem; for single-file formats the
    exporter writes ``dest / filename`` and the service renames it to the user's path.
    """

    artifact: dict[str, Any]  # as ``adaptr show NAME --json`` prints it
    manifest: ModelManifest | AdapterManifest
    source: Path  # the artifact's folder
    dest: Path
    filename: str  # final file name for single-file formats (e.g. model.gguf)
    options: dict[str, Any]  # resolved ``params``
    base_source: Path | None = None  # adapters: the base model's folder (its config.json)
    base_manifest: ModelManifest | None = None
    progress: Any = None  # ``advance(n_bytes, detail=None)``


@runtime_checkable
class Exporter(Protocol):
    """An output format (``register_exporters``): writes an artifact's files into a staging folder.

    ``kinds`` are the artifact kinds it accepts (``base``, ``merged``, ``quantized``,
    ``adapter``); ``single_file`` says whether ``--out`` names a file (GGUF) or a folder.
    ``export`` raises ``InvalidInputError`` subclasses for what it cannot convert
    (an unsupported architecture, say) before writing anything large.
    """

    name: str
    description: str
    kinds: tuple[str, ...]
    single_file: bool
    params: tuple[ParamDef, ...]

    def export(self, request: ExportRequest) -> list[str]:
        """Write the exported files under ``request.dest``; return their relpaths."""


@runtime_checkable
class ComputeBackend(Protocol):
    """Where tensor arithmetic may run instead of the torch reference (``register_backends``).

    ``probe`` says, without side effects, which device the backend would use now, or why it
    cannot run: ``explicit`` is True when the user named it (``--backend NAME``), so a backend
    may accept a setup ``auto`` should not pick (Triton's CPU interpreter). The kernels
    themselves are claimed per operation through the ``get_kernel`` hook, which receives the
    chosen backend's name in ``params["backend"]``. ``operations`` maps each operation the
    backend accelerates to what it covers, for ``adaptr plugins``.
    """

    name: str
    description: str
    operations: dict[str, str]

    def probe(self, explicit: bool) -> tuple[str | None, str]:
        """``(device, why)``: e.g. ``("cuda:0", "NVIDIA H100")`` or ``(None, "no CUDA device; ...")``."""


@runtime_checkable
class StepType(Protocol):
    """A pipeline step type (``register_pipeline_steps``): one key of a step in ``adaptr run``'s YAML.

    ``spec`` is the pydantic model the step's body validates against (the CLI's own, so a
    body uses the same keys as the command's flags). ``refs`` names the body fields that hold
    artifact references, which may also be an earlier step's id or, with
    ``--register-missing``, a folder to register: ``"base"``, ``"adapter"`` or ``"artifact"``
    (anything in the catalog). ``produces`` says whether later steps may name this one.
    """

    name: str
    description: str
    spec: type
    refs: dict[str, str]
    produces: bool

    def run(self, spec: Any, *, catalog: Any, force: bool, dry_run: bool) -> dict[str, Any]:
        """Run the step (or, with ``dry_run``, say what running would do) through the services.

        Returns a dict with ``reused`` (bool) and, when ``produces``, ``ref`` (``NAME@N``).
        """
