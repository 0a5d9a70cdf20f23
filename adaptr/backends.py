"""Choosing where tensor arithmetic runs: the torch reference on the CPU, or a registered backend.

``--backend auto`` (the default) takes the first registered backend that has a device now
and otherwise the torch reference, saying why at debug level; ``--backend torch`` always
takes the reference; ``--backend NAME`` takes that backend or fails with its reason. The
choice is made once per operation and is visible to plugins through :func:`kernel` while
the engine runs, so a quantizer can hand its per-tensor work to the same backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from adaptr.errors import BackendUnavailableError, InvalidInputError

log = logging.getLogger("adaptr.backends")

REFERENCE = "torch"
AUTO = "auto"


@dataclass(frozen=True)
class Selected:
    """The backend an operation runs on: its name, its device, and the plugin that registered it."""

    name: str
    device: str
    why: str
    plugin: str | None = None
    version: str | None = None

    @property
    def accelerated(self) -> bool:
        return self.name != REFERENCE

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device, "plugin": self.plugin, "version": self.version}


TORCH = Selected(REFERENCE, "cpu", "the torch reference")
_current: contextvars.ContextVar[Selected] = contextvars.ContextVar("adaptr_backend", default=TORCH)


def choices() -> list[str]:
    """What ``--backend`` accepts: auto, torch and every registered backend."""
    from adaptr.plugins import get_registry

    return [AUTO, REFERENCE, *get_registry("backend").names()]


def check_name(name: str) -> str:
    """Refuse an unknown backend name up front (cheap: no torch, no device probe)."""
    if name not in choices():
        raise InvalidInputError(f"unknown backend {name!r}; choose one of {', '.join(choices())}")
    return name


def select(name: str) -> Selected:
    """Resolve ``name`` to a backend with a device, or raise ``BackendUnavailableError`` saying why."""
    from adaptr.plugins import get_host, get_registry

    check_name(name)
    if name == REFERENCE:
        return TORCH
    registry = get_registry("backend")
    candidates = registry.names() if name == AUTO else [name]
    reasons = []
    for candidate in candidates:
        backend = registry.get(candidate)
        device, why = backend.probe(name != AUTO)
        if device is not None:
            plugin = registry.plugin_of(candidate)
            chosen = Selected(candidate, device, why, plugin, get_host().plugin_version(plugin))
            log.debug("backend %s on %s (%s)", candidate, device, why)
            return chosen
        if name != AUTO:
            raise BackendUnavailableError(f"backend {name!r} cannot run here: {why}")
        reasons.append(f"{candidate}: {why}")
    log.debug("backend auto -> torch (%s)", "; ".join(reasons) or "no accelerated backend installed")
    return TORCH


def current() -> Selected:
    """The backend of the operation running in this context (torch outside one)."""
    return _current.get()


@contextlib.contextmanager
def using(selected: Selected) -> Iterator[None]:
    """Make ``selected`` the current backend for this context (engine worker threads copy it)."""
    token = _current.set(selected)
    try:
        yield
    finally:
        _current.reset(token)


def kernel(
    op: str, device: str, dtype: str, params: dict[str, Any] | None = None
) -> Callable[..., Any] | None:
    """The current backend's implementation of ``op``, or None for the torch reference."""
    selected = current()
    if not selected.accelerated:
        return None
    from adaptr.plugins import get_host

    return get_host().pm.hook.get_kernel(
        op=op, device=device, dtype=dtype, params={**(params or {}), "backend": selected.name}
    )
