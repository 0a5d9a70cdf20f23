"""What a job runs, by kind: module-level functions of ``(catalog, request, options)``.

The REST API stores a job's ``request`` (the service spec as JSON) in the catalog and sends the
job worker process only its id and ``options``; the worker reads the request back and calls the
task of the job's kind, so a job crosses the process boundary as data, never as a closure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Task = Callable[[Any, dict[str, Any], dict[str, Any]], dict[str, Any]]


def merge(catalog: Any, request: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from adaptr.services.merge import merge
    from adaptr.specs import MergeSpec

    return merge(MergeSpec.model_validate(request), catalog=catalog, force=bool(options.get("force")))


def quantize(catalog: Any, request: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from adaptr.services.quantize import quantize
    from adaptr.specs import QuantizeSpec

    return quantize(QuantizeSpec.model_validate(request), catalog=catalog, force=bool(options.get("force")))


def export(catalog: Any, request: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from adaptr.services.export import export
    from adaptr.specs import ExportSpec

    return export(ExportSpec.model_validate(request), catalog=catalog)


def run(catalog: Any, request: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """A pipeline run: the document the API wrote to ``request["folder"]``, loaded again."""
    from adaptr.pipeline import load
    from adaptr.services.pipeline import run

    force = bool(request.get("force"))
    pipe = load(Path(request["folder"]) / "pipeline.yaml", force=force)
    return run(pipe, catalog=catalog, force=force)


TASKS: dict[str, Task] = {"merge": merge, "quantize": quantize, "export": export, "run": run}
