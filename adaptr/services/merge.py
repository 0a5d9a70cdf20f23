"""The merge service: resolve and validate a MergeSpec, stream the merge, record lineage.

Front ends (CLI, REST, pipelines, Python) build a ``MergeSpec`` and call ``merge``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from adaptr.errors import IncompatibleAdapterError, InvalidInputError, VerificationError
from adaptr.interfaces import AdapterManifest, ModelManifest
from adaptr.plugins import get_host, get_registry
from adaptr.services.catalog import Catalog, Parent
from adaptr.specs import MergeSpec, validate_spec

log = logging.getLogger("adaptr")

# Flags whose adapters cannot be merged into the plain base they were registered on.
_REFUSED_FLAGS = {
    "vocab_resize": "resizes the vocabulary (modules_to_save with a different number of rows); merge it with "
    "a base whose embeddings already have that size",
    "layer_replication": "uses layer_replication, which changes the model's layer layout",
    "trainable_tokens": "uses trainable_token_indices, which adaptr cannot merge yet",
}


def default_strategy(n_adapters: int) -> str:
    """Setting, not a code path: ADAPTR_DEFAULT_STRATEGY / ADAPTR_DEFAULT_MULTI_STRATEGY."""
    if n_adapters == 1:
        return os.environ.get("ADAPTR_DEFAULT_STRATEGY", "simple")
    return os.environ.get("ADAPTR_DEFAULT_MULTI_STRATEGY", "linear")


def merge(spec: MergeSpec | dict[str, Any], *, catalog: Catalog | None = None) -> dict[str, Any]:
    """Merge ``spec.adapters`` into ``spec.base`` with ``spec.strategy``; return the recorded artifact."""
    from adaptr import engine
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
    params = engine.resolve_params(strategy, spec.strategy_args())
    max_shard = parse_size(spec.max_shard_size)

    with catalog.session() as s:
        catalog.next_version(s, spec.name, "merged", spec.new_version)
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
            inputs.append(engine.AdapterInput(f"{a.name}@{a.version}", Path(a.path), m, float(w)))
        base_path, base_ref = Path(base_art.path), f"{base_art.name}@{base_art.version}"
        base_dtype = base_manifest.dtype

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

    plan = engine.plan_merge(base_manifest, inputs, dtype=spec.dtype, modules_to_save_from=mts_from)
    if plan.untied:
        log.warning(
            "an adapter changes the tied input embedding/lm_head of %s: writing %s separately and setting "
            "tie_word_embeddings=false in the merged config",
            base_ref,
            plan.untied,
        )
    ensure_space(
        catalog.store.root if catalog.store.root.exists() else catalog.store.root.parent,
        int(plan.output_bytes * 1.01) + (1 << 20),
        f"merged model {spec.name}",
    )

    staged = catalog.store.staging()
    try:
        with catalog.progress.task(f"merging {spec.name}", plan.output_bytes) as advance:
            hashes = engine.execute(
                plan,
                base_path=base_path,
                adapters=inputs,
                strategy=strategy,
                params=params,
                seed=spec.seed,
                dest=staged,
                max_shard_size=max_shard,
                progress=advance,
            )
        engine.copy_side_files(base_path, staged, dtype=spec.dtype, untied=plan.untied is not None)
        check = None
        if spec.verify:
            from adaptr.verify import logit_check

            check = logit_check(base_path, inputs, staged, tolerance=spec.verify_tolerance)
        _, manifest = catalog._read(staged, "base")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise

    version = get_host().plugin_version(plugin)
    edge_params = {
        "strategy": strategy_name,
        "params": params,
        "weights": weights,
        "adapters": [i.ref for i in inputs],
        "dtype": spec.dtype or base_dtype,
    }
    parents = [Parent(base_art, "merge", edge_params, plugin, version, spec.seed)]
    parents += [
        Parent(a, "merge", {**edge_params, "weight": w}, plugin, version, spec.seed)
        for a, w in zip(adapter_arts, weights)
    ]
    meta = {
        **{k: v for k, v in manifest.to_dict().items() if k not in ("tensors", "weight_files", "format")},
        "strategy": strategy_name,
        "strategy_params": params,
        "weights": weights,
        "adapters": [i.ref for i in inputs],
        "seed": spec.seed,
        "untied": plan.untied,
        "merged_tensors": sum(1 for t in plan.tensors if t.lora or t.bias or t.replacement),
    }
    flags = []
    if check is not None:
        meta["verify"] = check
        if not check["ok"]:
            flags.append("verify_failed")
    if plan.untied:
        flags.append("untied_embeddings")
    art = catalog.record(
        name=spec.name,
        kind="merged",
        new_version=spec.new_version,
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
    return art


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
