"""``adaptr merge``: flags (or a YAML file with the same keys) → MergeSpec → merge service."""

from __future__ import annotations

from pathlib import Path

import typer

from adaptr.cli.output import BACKEND_OPTION, JSON_OPTION, build_spec, catalog, emit_json, report_lines


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from adaptr.errors import InvalidInputError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidInputError(f"--weights {text!r}: expected comma-separated numbers like 1,0.5") from None


def merge(
    adapter: list[str] = typer.Option(
        None, "--adapter", "-a", metavar="NAME[@N]", help="Adapter to merge (NAME[@N]); repeatable."
    ),
    base: str = typer.Option(
        None, "--base", metavar="NAME[@N]", help="Base model (default: the adapters' base)."
    ),
    strategy: str = typer.Option(
        None,
        "--strategy",
        "-s",
        metavar="STRATEGY",
        help="simple, linear, task_arithmetic, ties, dare_linear, dare_ties, "
        "magnitude_prune or a plugin's (default: simple for one adapter).",
    ),
    weights: str = typer.Option(
        None, "--weights", metavar="W1,W2,...", help="Comma-separated weights, one per --adapter."
    ),
    density: float = typer.Option(
        None, "--density", metavar="FLOAT", help="Fraction kept (ties, dare_*, magnitude_prune; default 0.2)."
    ),
    lambda_: float = typer.Option(
        None, "--lambda", metavar="FLOAT", help="Scale of the merged delta (default 1.0)."
    ),
    normalize: bool = typer.Option(None, "--normalize/--no-normalize", help="Divide by the sum of weights."),
    rescale: str = typer.Option(
        None, "--rescale", metavar="density|l1|none", help="DARE rescale: density (default), l1 or none."
    ),
    seed: int = typer.Option(None, "--seed", metavar="INT", help="Seed for random steps (default 0)."),
    dtype: str = typer.Option(
        None,
        "--dtype",
        metavar="bf16|fp16|fp32",
        help="Output dtype: bf16, fp16 or fp32 (default: the base's).",
    ),
    max_shard_size: str = typer.Option(
        None, "--max-shard-size", metavar="SIZE", help="Largest output shard (default 5GB)."
    ),
    modules_to_save_from: str = typer.Option(
        None, "--modules-to-save-from", metavar="NAME", help="Adapter whose modules_to_save tensors are used."
    ),
    name: str = typer.Option(None, "--name", metavar="NAME", help="Catalog name of the merged model."),
    new_version: bool = typer.Option(None, "--new-version", help="Add a new version when NAME exists."),
    verify: bool = typer.Option(
        None, "--verify", help="Compare logits with base + adapter (needs transformers)."
    ),
    param: list[str] = typer.Option(
        None,
        "--param",
        metavar="KEY=VALUE",
        help="A parameter of a plugin strategy, KEY=VALUE (repeat for several).",
    ),
    verify_tolerance: float = typer.Option(
        None,
        "--verify-tolerance",
        metavar="FLOAT",
        help="Largest max |logit difference| --verify accepts (default 0.05).",
    ),
    qlora: str = typer.Option(
        None,
        "--qlora",
        metavar="METHOD",
        help="Quantizer the adapters were trained on (nf4): merge into its dequantized base.",
    ),
    qlora_param: list[str] = typer.Option(
        None,
        "--qlora-param",
        metavar="KEY=VALUE",
        help="A parameter of the --qlora quantizer, KEY=VALUE (e.g. double_quant=true).",
    ),
    requantize: str = typer.Option(
        None,
        "--requantize",
        metavar="METHOD",
        help="Quantize the merged result in the same pass (nf4, int8, fp8, ...).",
    ),
    quant_param: list[str] = typer.Option(
        None,
        "--quant-param",
        metavar="KEY=VALUE",
        help="A parameter of the --requantize quantizer, KEY=VALUE.",
    ),
    skip: list[str] = typer.Option(
        None,
        "--skip",
        metavar="MODULE",
        help="Module left unquantized (repeatable; default: lm_head and the embeddings).",
    ),
    backend: str = BACKEND_OPTION,
    config: Path = typer.Option(
        None, "--config", metavar="FILE.yaml", help="YAML file with the same keys as these flags."
    ),
    force: bool = typer.Option(
        False, "--force", help="Recompute (as a new version) even when the same recipe exists."
    ),
    json: bool = JSON_OPTION,
) -> None:
    """Merge adapters into their base and record the result with its lineage."""
    from adaptr.services.merge import merge as run_merge
    from adaptr.specs import MergeSpec

    flags = {
        "adapters": adapter or None,
        "base": base,
        "strategy": strategy,
        "weights": _floats(weights),
        "density": density,
        "lambda": lambda_,
        "normalize": normalize,
        "rescale": rescale,
        "seed": seed,
        "dtype": dtype,
        "max_shard_size": max_shard_size,
        "modules_to_save_from": modules_to_save_from,
        "name": name,
        "new_version": new_version,
        "verify": verify,
        "verify_tolerance": verify_tolerance,
        "qlora": qlora,
        "requantize": requantize,
        "skip": skip or None,
        "backend": backend,
    }
    pairs = (
        ("params", param, "--param"),
        ("qlora_params", qlora_param, "--qlora-param"),
        ("quant_params", quant_param, "--quant-param"),
    )
    spec = build_spec(MergeSpec, flags, config=config, pairs=pairs, what="merge options")
    art = run_merge(spec, catalog=catalog(), force=force)
    if json:
        emit_json(art)
    else:
        meta = art["metadata"]
        extra = f", max |Δlogit| {meta['verify']['max_abs_logit_diff']:.3g}" if "verify" in meta else ""
        into = f"the dequantized {meta['qlora']['method']} base of " if meta.get("qlora") else ""
        how = "reused the merge of" if art["reused"] else "merged"
        typer.echo(
            f"{how} {', '.join(meta['adapters'])} into {into}{art['base']} with {meta['strategy']} → "
            f"{art['ref']} ({art['content_hash'][:12]}){extra}"
        )
        for line in report_lines(meta):
            typer.echo(line)
        typer.echo(art["path"])


def register(app: typer.Typer) -> None:
    app.command()(merge)
