"""The adaptr hook contract: every hook a plugin may implement.

Plugins are modules or objects with ``@adaptr.hookimpl`` functions, found through the
``adaptr`` entry-point group (built-ins included). An implementation may accept fewer
arguments than the spec lists; specs only ever grow by adding arguments.

Registration hooks take a ``register`` callback rather than returning values so the
host can reject bad names immediately, naming the plugin at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer

hookspec = pluggy.HookspecMarker("adaptr")
hookimpl = pluggy.HookimplMarker("adaptr")


# --- Registration hooks: called once when a registry is first used ----------------------


@hookspec
def register_readers(register: Callable[[Any], None]) -> None:
    """Register readers that understand base-model and adapter folders.

    :param register: call ``register(reader)`` once per reader. ``reader.name`` must be a
        unique lowercase name, ``reader.kind`` is ``"base"`` or ``"adapter"``, and the
        reader implements ``can_read(path) -> bool`` and ``read(path) -> manifest``
        (see :mod:`adaptr.interfaces`). Raises DuplicateNameError on a taken name.
    """


@hookspec
def register_merge_strategies(register: Callable[[Any], None]) -> None:
    """Register merge strategies (objects implementing ``adaptr.interfaces.MergeStrategy``).

    :param register: call ``register(strategy)`` once per strategy; names are unique and
        lowercase. Raises DuplicateNameError naming both plugins on a clash.
    """


@hookspec
def register_quantizers(register: Callable[[Any], None]) -> None:
    """Register quantization backends (``adaptr.interfaces.Quantizer``), same contract as above.

    :param register: call ``register(quantizer)`` once per backend.
    """


@hookspec
def register_exporters(register: Callable[[Any], None]) -> None:
    """Register exporters (``adaptr.interfaces.Exporter``), same contract as above.

    :param register: call ``register(exporter)`` once per output format.
    """


@hookspec
def register_pipeline_steps(register: Callable[[Any], None]) -> None:
    """Register pipeline step types (``adaptr.interfaces.StepType``) for ``adaptr run``.

    :param register: call ``register(step_type)`` once per type; its ``name`` is the key a
        step uses in the pipeline file (``merge:``, ``quantize:``, ``export:``).
    """


@hookspec
def register_backends(register: Callable[[Any], None]) -> None:
    """Register compute backends (``adaptr.interfaces.ComputeBackend``) for ``--backend NAME``.

    :param register: call ``register(backend)`` once per backend; its kernels are claimed
        through ``get_kernel`` when ``params["backend"]`` is its name.
    """


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add commands or sub-command groups to the ``adaptr`` CLI.

    :param app: the root ``typer.Typer``; call ``app.command()`` or ``app.add_typer()``.
        Commands should call :mod:`adaptr.services` and raise ``AdaptrError`` subclasses
        for user mistakes; the CLI turns those into one-line messages and exit codes.
    """


# --- Dispatch hooks: first non-None result wins -----------------------------------------


@hookspec(firstresult=True)
def get_kernel(op: str, device: str, dtype: str, params: Mapping[str, Any]) -> Callable[..., Any] | None:
    """Claim an operation for an accelerated implementation.

    Stops at the first non-None result. adaptr asks before running ``op`` (for example
    ``"merge_tensor"``, with the strategy name and parameters in ``params``) on a tensor of
    ``dtype`` that lives on ``device`` (``"cpu"``, ``"cuda:0"``). Return a callable with the
    same signature as the reference implementation documented for ``op`` to run it
    instead, or None to decline; when nobody claims it, the pure-torch reference in
    :mod:`adaptr.ops` runs.

    :param op: operation name.
    :param device: torch device string of the inputs.
    :param dtype: torch dtype name of the output (``"bfloat16"``).
    :param params: operation parameters (read-only).
    :returns: a callable, or None.
    """


# --- Lifecycle hooks: notifications; return values are ignored --------------------------


@hookspec
def artifact_recorded(artifact: Mapping[str, Any], operation: str) -> None:
    """Called after an artifact's files are in place and its catalog row is committed.

    :param artifact: the artifact as ``adaptr show NAME --json`` prints it.
    :param operation: what produced it: ``"add"``, ``"merge"``, ``"quantize"``, ``"export"``.
    """
