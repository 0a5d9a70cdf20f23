"""The merge service: resolve and validate a MergeSpec, stream the merge, record lineage.

Front ends (CLI, REST, pipelines, Python) build a ``MergeSpec`` and call ``merge``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from adaptr import backends
from adaptr.errors import IncompatibleAdapterError, InvalidInputError, VerificationError
from adaptr.interfaces import AdapterManifest, ModelManifest
from adaptr.plugins import get_host, get_registry
from adaptr.recipe import recipe_hash
from adaptr.refs import check_name
from adaptr.services.catalog import Catalog, Parent
from adaptr.services.quantize import dry_run_result, quant_step, refuse_quantized
from adaptr.specs import MergeSpec, validate_spec

log = logging.getLogger("adaptr")

# Flags whose adapters cannot be merged into the plain base they were registered on.
_REFUSED_FLAGS = {
    "vocab_resize": "resizes the vocabulary (modules_to_save with a different number of rows); merge it with "
    "a base whose embeddings already have that size",
    "layer_replication": "uses layer_replication, which changes the model's layer layout",
    "trainable_tokens": "uses trainable_token_indices, which adaptr cannot merge yet",
}


_QUANTIZABLE_DTYPES = ("bfloat16", "float16", "float32")


def _trained_on(spec: MergeSpec, adapters: list[Any]) -> tuple[str, dict[str, Any]] | None:
    """The quantized base the adapters were trained against: ``--qlora`` or what ``adapter add
    --trained-on`` recorded. Adapters trained on different bases cannot share one merge."""
    recorded = {f"{a.name}@{a.version}": (a.meta or {}).get("trained_on") for a in adapters}
    if spec.qlora:
        for ref, t in recorded.items():
            if t and t["method"] != spec.qlora:
                raise IncompatibleAdapterError(
                    f"adapter {ref} was registered as trained on a {t['method']} base, not {spec.qlora}; "
                    f"pass --qlora {t['method']} or register the adapter again"
                )
        given = next((t["params"] for t in recorded.values() if t), {})
        return spec.qlora, {**given, **spec.qlora_params}
    kinds = {json.dumps(t, sort_keys=True) if t else None for t in recorded.values()}
    if len(kinds) > 1:
        told = ", ".join(f"{ref} on {t['method'] if t else 'the 16-bit base'}" for ref, t in recorded.items())
        raise IncompatibleAdapterError(
            f"the adapters were trained on different bases ({told}); merge them separately"
        )
    first = next(iter(recorded.values()))
    return (first["method"], dict(first["params"])) if first else None


def default_strategy(n_adapters: int) -> str:
    """Setting, not a code path: ADAPTR_DEFAULT_STRATEGY / ADAPTR_DEFAULT_MULTI_STRATEGY."""
    if n_adapters == 1:
        return os.environ.get("ADAPTR_DEFAULT_STRATEGY", "simple")
    return os.environ.get("ADAPTR_DEFAULT_MULTI_STRATEGY", "linear")


def merge(
    spec: MergeSpec | dict[str, Any],
    *,
    catalog: Catalog | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Merge ``spec.adapters`` into ``spec.base`` with ``spec.strategy``; return the recorded artifact.

    An artifact with the same recipe is reused before any tensor is read (``"reused": true``);
    ``force`` recomputes it as a new version; ``dry_run`` validates everything, looks the recipe
    up and returns what would happen (``{"dry_run": true, "reused": ..., "recipe_hash": ...}``).
    """
    started = time.perf_counter()
    from adaptr import plan as planning
    from adaptr.io.files import ensure_space
    from adaptr.io.safetensors_io import parse_size

    if isinstance(spec, dict):
        spec = validate_spec(MergeSpec, spec)
    catalog = catalog or Catalog()
    strategy_name = spec.strategy or default_strategy(len(spec.adapters))
    strategy = get_registry("strategy").get(strategy_name)
    plugin = get_registry("strategy").plugin_of(strategy_name)

    weights = spec.weights if spec.weights is not None else [1.0] * len(spec.adapters)
    if len(weights) != len(spec.adapters):
        raise InvalidInputError(
            f"--weights has {len(weights)} value(s) for {len(spec.adapters)} adapter(s); give one weight per "
            "--adapter, in the same order"
        )
    if spec.verify and len(spec.adapters) != 1:  # refuse before the merge runs, not after
        raise InvalidInputError(
            "--verify compares against one unmerged adapter; merge a single adapter to use it"
        )
    if strategy.max_adapters is not None and len(spec.adapters) > strategy.max_adapters:
        raise InvalidInputError(
            f"strategy {strategy_name!r} merges at most {strategy.max_adapters} adapter(s), got "
            f"{len(spec.adapters)}; use linear, ties or dare_ties for several"
        )
    if not strategy.allows_negative_weights and any(w < 0 for w in weights):
        raise InvalidInputError(
            f"strategy {strategy_name!r} does not accept negative weights (its weighted mean is undefined); "
            "use linear or task_arithmetic for task negation"
        )
    params = planning.resolve_params(strategy, spec.strategy_args())
    backends.check_name(spec.backend)
    max_shard = parse_size(spec.max_shard_size)
    if spec.qlora_params and not spec.qlora:
        raise InvalidInputError(
            "--qlora-param needs --qlora METHOD (the quantizer the adapters were trained on)"
        )
    if spec.quant_params and not spec.requantize:
        raise InvalidInputError("--quant-param needs --requantize METHOD")
    requant, requant_plugin = (
        quant_step(spec.requantize, spec.quant_params) if spec.requantize else (None, None)
    )
    kind = "quantized" if requant else "merged"
    check_name(spec.name)
    new_version = spec.new_version or force

    with catalog.session() as s:
        adapter_arts = [catalog.resolve(s, ref) for ref in spec.adapters]
        for ref, a in zip(spec.adapters, adapter_arts):
            if a.kind != "adapter":
                raise InvalidInputError(f"{ref} is a {a.kind}, not an adapter; pass adapters to --adapter")
        if len({a.id for a in adapter_arts}) != len(adapter_arts):
            raise InvalidInputError(
                "the same adapter is listed twice; give each adapter once (use --weights)"
            )
        base_ids = {a.base_id for a in adapter_arts}
        if spec.base:
            base_art = catalog.resolve(s, spec.base)
        elif len(base_ids) == 1:
            base_art = catalog.resolve(s, _ref_of(s, base_ids.pop()))
        else:
            refs = ", ".join(f"{a.name}@{a.version} -> {_ref_of(s, a.base_id)}" for a in adapter_arts)
            raise IncompatibleAdapterError(
                f"the adapters were registered on different bases ({refs}); merge adapters of one base"
            )
        for a in adapter_arts:
            if a.base_id != base_art.id and not _same_content(s, a.base_id, base_art):
                raise IncompatibleAdapterError(
                    f"adapter {a.name}@{a.version} was registered on {_ref_of(s, a.base_id)}, not on "
                    f"{base_art.name}@{base_art.version}; merge it into its own base"
                )
        base_manifest = ModelManifest.from_dict(base_art.manifest)
        inputs = []
        for a, w in zip(adapter_arts, weights):
            m = AdapterManifest.from_dict(a.manifest)
            _refuse_flags(f"{a.name}@{a.version}", a.flags, strategy, len(adapter_arts))
            inputs.append(planning.AdapterInput(f"{a.name}@{a.version}", Path(a.path), m, float(w)))
        base_path, base_ref = Path(base_art.path), f"{base_art.name}@{base_art.version}"
        base_dtype = base_manifest.dtype
        trained_on = _trained_on(spec, adapter_arts)
        if trained_on or requant:
            refuse_quantized(base_ref, base_art.kind, base_art.path)

    mts_from = None
    if spec.modules_to_save_from is not None:
        matches = [
            i
            for i, ref in enumerate(spec.adapters)
            if ref.split("@")[0] == spec.modules_to_save_from or inputs[i].ref == spec.modules_to_save_from
        ]
        if not matches:
            raise InvalidInputError(
                f"--modules-to-save-from {spec.modules_to_save_from!r} is not one of the adapters"
            )
        mts_from = matches[0]

    plan = planning.plan_merge(base_manifest, inputs, dtype=spec.dtype, modules_to_save_from=mts_from)
    if spec.skip is not None and not (trained_on or requant):
        raise InvalidInputError(
            "--skip chooses what --qlora or --requantize leave unquantized; give one of them"
        )
    skip = list(planning.DEFAULT_SKIP if spec.skip is None else spec.skip)
    qlora = qlora_plugin = None
    if trained_on:
        if base_dtype not in _QUANTIZABLE_DTYPES:
            raise InvalidInputError(
                f"--qlora {trained_on[0]} needs a float16, bfloat16 or float32 base; {base_ref} is "
                f"{base_dtype or 'of unknown dtype'}"
            )
        qlora, qlora_plugin = quant_step(*trained_on)
        planning.plan_quantization(plan, qlora, skip, parts=False)
        if not any(t.roundtrip for t in plan.tensors):
            raise InvalidInputError(
                f"--qlora {trained_on[0]} quantizes no weight of {base_ref} with --skip {','.join(skip)}"
            )
    skipped = planning.plan_quantization(plan, requant, skip, parts=True) if requant else []
    if plan.untied:
        log.warning(
            "an adapter changes the tied input embedding/lm_head of %s: writing %s separately and setting "
            "tie_word_embeddings=false in the merged config",
            base_ref,
            plan.untied,
        )
    version = get_host().plugin_version(plugin)
    edge_params = {
        "strategy": strategy_name,
        "params": params,
        "weights": weights,
        "adapters": [i.ref for i in inputs],
        "dtype": spec.dtype or base_dtype,
    }
    if qlora is not None:
        edge_params["qlora"] = {"method": qlora.quantizer.name, "params": qlora.params, "skip": skip}
    if requant is not None:
        edge_params["requantize"] = {"method": requant.quantizer.name, "params": requant.params, "skip": skip}
    parents = [Parent(base_art, "merge", edge_params, plugin, version, spec.seed)]
    parents += [
        Parent(a, "merge", {**edge_params, "weight": w}, plugin, version, spec.seed)
        for a, w in zip(adapter_arts, weights)
    ]
    plugins = [(plugin, version)] + [
        (p, get_host().plugin_version(p)) for p in (qlora_plugin, requant_plugin) if p is not None
    ]
    recipe = recipe_hash(
        "merge",
        [{"base": base_art.content_hash}]
        + [{"adapter": a.content_hash, "weight": w} for a, w in zip(adapter_arts, weights)],
        {**{k: v for k, v in edge_params.items() if k != "adapters"}, "max_shard_size": max_shard,
         "modules_to_save_from": mts_from},
        plugins,
        spec.seed,
    )  # fmt: skip
    existing = None
    if not force:
        with catalog.session() as s:
            existing = catalog.find_recipe(s, recipe, spec.name)
        checked = (existing.meta or {}).get("verify") if existing is not None else None
        if existing is not None and (
            "verify_failed" in existing.flags
            or (spec.verify and (checked or {}).get("max_abs_logit_diff", math.inf) > spec.verify_tolerance)
        ):
            existing = None  # a failed check, or one never made to this tolerance: compute it
        if existing is not None and not dry_run:
            art = catalog.adopt(
                existing, name=spec.name, new_version=new_version, parents=parents, operation="merge"
            )
            return {**art, "reused": True, **_took(started)}
    # a named backend that cannot run here fails before any work (auto never fails: no probe needed)
    chosen = backends.select(spec.backend) if spec.backend != backends.AUTO or not dry_run else backends.TORCH
    if dry_run:
        return dry_run_result(catalog, existing, recipe, spec.name, kind, new_version)
    with catalog.session() as s:  # fail on a taken name before reading a tensor
        catalog.next_version(s, spec.name, kind, new_version)
    ensure_space(
        catalog.store.root if catalog.store.root.exists() else catalog.store.root.parent,
        int(plan.output_bytes * 1.01) + (1 << 20),
        f"merged model {spec.name}",
    )

    staged = catalog.store.staging()
    # The QLoRA report compares the 16-bit merge too: with --requantize it is written beside.
    tee = catalog.store.staging() if (spec.verify and requant) else None
    report: dict[str, dict[str, Any]] = {}
    stats: dict[str, Any] = {}
    qconfig = requant.quantizer.config(requant.params, skipped, base_dtype or "bfloat16") if requant else None
    try:
        with catalog.progress.task(f"merging {spec.name}", plan.source_bytes) as advance:
            hashes = _engine().execute(
                plan,
                base_path=base_path,
                adapters=inputs,
                strategy=strategy,
                params=params,
                seed=spec.seed,
                dest=staged,
                max_shard_size=max_shard,
                progress=advance,
                quantize=requant,
                qlora=qlora,
                tee=tee,
                report=report,
                backend=chosen,
                stats=stats,
            )
        untied = plan.untied is not None
        planning.copy_side_files(
            base_path, staged, dtype=spec.dtype, untied=untied, quantization_config=qconfig
        )
        if tee is not None:
            planning.copy_side_files(base_path, tee, dtype=spec.dtype, untied=untied)
        check = qlora_report = None
        if spec.verify and qlora is not None:
            from adaptr.verify import qlora_logit_report

            qlora_report = qlora_logit_report(
                base_path,
                inputs[0],
                plan,
                qlora,
                merged_path=tee or staged,
                requantized=(staged, plan, requant) if requant else None,
                tolerance=spec.verify_tolerance,
            )
            check = qlora_report["models"]["merged_16bit"] | {"ok": qlora_report["ok"]}
        elif spec.verify:
            from adaptr.verify import logit_check

            if requant is not None:
                raise InvalidInputError(
                    "--verify with --requantize compares QLoRA merges; add --qlora METHOD"
                )
            check = logit_check(base_path, inputs, staged, tolerance=spec.verify_tolerance)
        _, manifest = catalog._read(staged, "base")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        if tee is not None:
            shutil.rmtree(tee, ignore_errors=True)

    meta = {
        **{k: v for k, v in manifest.to_dict().items() if k not in ("tensors", "weight_files", "format")},
        "strategy": strategy_name,
        "strategy_params": params,
        "weights": weights,
        "adapters": [i.ref for i in inputs],
        "seed": spec.seed,
        "untied": plan.untied,
        "merged_tensors": sum(1 for t in plan.tensors if t.lora or t.bias or t.replacement),
        **stats,
    }
    if qlora is not None:
        meta["qlora"] = edge_params["qlora"]
    if qlora_report is not None:
        meta["qlora_report"] = qlora_report
    if requant is not None:
        from adaptr.services.quantize import summarize

        meta["quantization"] = {
            "method": requant.quantizer.name,
            "params": requant.params,
            "skip": skipped,
            "quantized_tensors": len(report),
        }
        meta["quant_report"] = summarize(report, plan.source_bytes, plan.output_bytes)
        meta["quant_errors"] = report
    flags = []
    if check is not None:
        meta["verify"] = check
        if not check["ok"]:
            flags.append("verify_failed")
    if plan.untied:
        flags.append("untied_embeddings")
    art = catalog.record(
        name=spec.name,
        kind=kind,
        new_version=new_version,
        recipe_hash=recipe,
        staged=staged,
        manifest=manifest.to_dict(),
        meta=meta,
        parents=parents,
        base_id=base_art.id,
        flags=flags,
        operation="merge",
        known_hashes=hashes,
    )
    if check is not None and not check["ok"]:
        raise VerificationError(
            f"merged model {art['ref']} differs from {base_ref} + adapter by max |Δlogit| "
            f"{check['max_abs_logit_diff']:.3g} > tolerance {check['tolerance']:.3g}; it is recorded with flag "
            f"verify_failed (remove it with `adaptr rm {art['ref']}`)"
        )
    return {**art, "reused": False, **_took(started)}


def _took(started: float) -> dict[str, float]:
    return {"seconds": round(time.perf_counter() - started, 3)}


def _ref_of(session: Any, artifact_id: int | None) -> str:
    from adaptr.catalog.models import Artifact

    a = session.get(Artifact, artifact_id) if artifact_id else None
    return f"{a.name}@{a.version}" if a else "?"


def _same_content(session: Any, base_id: int | None, base: Any) -> bool:
    from adaptr.catalog.models import Artifact

    other = session.get(Artifact, base_id) if base_id else None
    return other is not None and other.content_hash == base.content_hash


def _refuse_flags(ref: str, flags: list[str], strategy: Any, n: int) -> None:
    for flag in flags:
        if flag.startswith("residual_init:"):
            method = flag.split(":", 1)[1]
            raise IncompatibleAdapterError(
                f"adapter {ref} was initialised with {method.upper()}: its factors assume a modified base; "
                "convert it with PEFT's path_initial_model_for_weight_conversion and register the result"
            )
        if flag in _REFUSED_FLAGS:
            raise IncompatibleAdapterError(f"adapter {ref} {_REFUSED_FLAGS[flag]}")
        if flag == "dora" and (n > 1 or not getattr(strategy, "supports_dora", False)):
            raise IncompatibleAdapterError(
                f"adapter {ref} is a DoRA adapter: DoRA has no defined linear combination; merge it alone with "
                "--strategy simple"
            )


def _engine() -> Any:
    """The engine (and torch) load only when something is computed; reuse and planning stay fast."""
    from adaptr import engine

    return engine
