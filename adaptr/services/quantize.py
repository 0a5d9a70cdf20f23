"""The quantize service: a base or merged model through a quantizer plugin, streamed, with lineage.

It runs the merge engine with no adapters: the same one-tensor-at-a-time pass, workers,
memory budget, writer and hasher threads and atomic commit, with each weight turned into
its quantized parts on the way out. Front ends build a ``QuantizeSpec`` and call ``quantize``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from adaptr import backends
from adaptr.errors import InvalidInputError
from adaptr.interfaces import ModelManifest
from adaptr.plugins import get_host, get_registry
from adaptr.recipe import recipe_hash
from adaptr.refs import check_name
from adaptr.services.catalog import Catalog, Parent
from adaptr.specs import QuantizeSpec, validate_spec

QUANTIZABLE_KINDS = ("base", "merged")


def quant_step(method: str, given: dict[str, Any]) -> tuple[Any, str]:
    """The quantizer ``method`` with resolved parameters, and the plugin that registered it."""
    from adaptr import plan as planning

    registry = get_registry("quantizer")
    quantizer = registry.get(method)
    params = planning.resolve_params(quantizer, given, "quantizer")
    return planning.QuantStep(quantizer, params), registry.plugin_of(method)


def refuse_quantized(ref: str, kind: str, path: str | Path) -> None:
    """A quantized model cannot be quantized, merged into or re-quantized again: say from what to start."""
    cfg = Path(path) / "config.json"
    method = None
    if kind == "quantized":
        method = "quantized"
    elif cfg.is_file():
        try:
            qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config")
        except (ValueError, OSError):
            qc = None
        if isinstance(qc, dict):
            method = f"quantized ({qc.get('quant_method', '?')})"
    if method:
        raise InvalidInputError(
            f"{ref} is already {method}; quantize the float model it was made from (see `adaptr lineage {ref}`)"
        )


def dry_run_result(
    catalog: Catalog, existing: Any, recipe: str, name: str, kind: str, new_version: bool
) -> dict[str, Any]:
    """What a run would do, without doing it: reuse ``existing``, or compute NAME@next."""
    if existing is not None:
        ref = f"{existing.name}@{existing.version}"
        return {"dry_run": True, "reused": True, "ref": ref, "recipe_hash": recipe,
                "content_hash": existing.content_hash}  # fmt: skip
    with catalog.session() as s:
        version = catalog.next_version(s, name, kind, new_version)
    return {"dry_run": True, "reused": False, "ref": f"{name}@{version}", "recipe_hash": recipe}


def summarize(report: dict[str, dict[str, float]], source_bytes: int, stored_bytes: int) -> dict[str, Any]:
    """Whole-model figures for ``adaptr show``; the per-tensor rows stay beside them."""
    if not report:
        return {"tensors": 0}
    rows = list(report.values())
    return {
        "tensors": len(rows),
        "mean_rel_error": sum(r["rel_error"] for r in rows) / len(rows),
        "max_rel_error": max(r["rel_error"] for r in rows),
        "max_abs_error": max(r["max_abs_error"] for r in rows),
        "min_snr_db": min((r["snr_db"] for r in rows if r["snr_db"] is not None), default=None),
        "source_bytes": source_bytes,
        "stored_bytes": stored_bytes,
    }


def quantize(
    spec: QuantizeSpec | dict[str, Any],
    *,
    catalog: Catalog | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Quantize ``spec.input`` with ``spec.method``; return the recorded ``quantized`` artifact.

    An artifact with the same recipe is reused before any tensor is read (``"reused": true``);
    ``force`` recomputes it as a new version; ``dry_run`` validates everything, looks the recipe
    up and returns what would happen (``{"dry_run": true, "reused": ..., "recipe_hash": ...}``).
    """
    started = time.perf_counter()
    from adaptr import plan as planning
    from adaptr.io.files import ensure_space
    from adaptr.io.safetensors_io import parse_size

    if isinstance(spec, dict):
        spec = validate_spec(QuantizeSpec, spec, source="quantize options")
    catalog = catalog or Catalog()
    step, plugin = quant_step(spec.method, spec.quantizer_args())
    max_shard = parse_size(spec.max_shard_size)
    backends.check_name(spec.backend)

    check_name(spec.name)
    new_version = spec.new_version or force
    with catalog.session() as s:
        src = catalog.resolve(s, spec.input)
        ref = f"{src.name}@{src.version}"
        refuse_quantized(ref, src.kind, src.path)
        if src.kind not in QUANTIZABLE_KINDS:
            raise InvalidInputError(
                f"{ref} is a {src.kind}; quantize a base or merged model (merge the adapter first with "
                "`adaptr merge`)"
            )
        manifest = ModelManifest.from_dict(src.manifest)
        src_path = Path(src.path)
        root_base = src.base_id or src.id

    plan = planning.plan_merge(manifest, [], dtype=None, modules_to_save_from=None)
    skip = list(planning.DEFAULT_SKIP if spec.skip is None else spec.skip)
    skipped = planning.plan_quantization(plan, step, skip, parts=True)
    quantized = [t.name for t in plan.tensors if t.parts is not None]
    if not quantized:
        raise InvalidInputError(
            f"{ref} has no weight that {spec.method} can quantize with --skip {','.join(skip) or '(none)'}; "
            "check the skip list"
        )
    edge = {"method": spec.method, "params": step.params, "skip": skip}
    version = get_host().plugin_version(plugin)
    parent = Parent(src, "quantize", edge, plugin, version)
    recipe = recipe_hash(
        "quantize", [{"input": src.content_hash}], {**edge, "max_shard_size": max_shard}, [(plugin, version)]
    )
    existing = None
    if not force:
        with catalog.session() as s:
            existing = catalog.find_recipe(s, recipe, spec.name)
        if existing is not None and not dry_run:
            art = catalog.adopt(
                existing, name=spec.name, new_version=new_version, parents=[parent], operation="quantize"
            )
            return {**art, "reused": True, "seconds": round(time.perf_counter() - started, 3)}
    # a named backend that cannot run here fails before any work (auto never fails: no probe needed)
    chosen = backends.select(spec.backend) if spec.backend != backends.AUTO or not dry_run else backends.TORCH
    if dry_run:
        return dry_run_result(catalog, existing, recipe, spec.name, "quantized", new_version)
    with catalog.session() as s:  # fail on a taken name before reading a tensor
        catalog.next_version(s, spec.name, "quantized", new_version)
    ensure_space(
        catalog.store.root if catalog.store.root.exists() else catalog.store.root.parent,
        int(plan.output_bytes * 1.01) + (1 << 20),
        f"quantized model {spec.name}",
    )
    report: dict[str, dict[str, float]] = {}
    stats: dict[str, Any] = {}
    staged = catalog.store.staging()
    try:
        with catalog.progress.task(f"quantizing {spec.name}", plan.source_bytes) as advance:
            hashes = _engine().execute(
                plan,
                base_path=src_path,
                adapters=[],
                strategy=None,
                params={},
                seed=0,
                dest=staged,
                max_shard_size=max_shard,
                progress=advance,
                quantize=step,
                report=report,
                backend=chosen,
                stats=stats,
            )
        compute = manifest.dtype or "bfloat16"
        planning.copy_side_files(
            src_path,
            staged,
            dtype=None,
            untied=False,
            quantization_config=step.quantizer.config(step.params, skipped, compute),
        )
        _, out_manifest = catalog._read(staged, "base")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise

    meta = {
        **{
            k: v
            for k, v in out_manifest.to_dict().items()
            if k not in ("tensors", "weight_files", "format", "num_parameters")
        },
        "num_parameters": manifest.num_parameters,
        "quantization": {
            "method": spec.method,
            "params": step.params,
            "skip": skipped,
            "quantized_tensors": len(quantized),
        },
        "quant_report": summarize(report, plan.source_bytes, plan.output_bytes),
        "quant_errors": report,
        **stats,
    }
    art = catalog.record(
        name=spec.name,
        kind="quantized",
        new_version=new_version,
        recipe_hash=recipe,
        staged=staged,
        manifest=out_manifest.to_dict(),
        meta=meta,
        parents=[parent],
        base_id=root_base,
        operation="quantize",
        known_hashes=hashes,
    )
    return {**art, "reused": False, "seconds": round(time.perf_counter() - started, 3)}


def _engine() -> Any:
    """The engine (and torch) load only when something is computed; reuse and planning stay fast."""
    from adaptr import engine

    return engine
