"""The plugin manager: discovery through entry points, blocking, and strict registries.

Built-in plugins and third-party ones are found the same way, through the ``adaptr``
entry-point group, so either can be disabled by name with ``ADAPTR_DISABLE_PLUGINS``
(comma-separated) or narrowed with an ``ADAPTR_LOAD_PLUGINS`` allowlist.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from adaptr import hookspecs
from adaptr.errors import DuplicateNameError, PluginError, UnknownNameError
from adaptr.settings import get_settings

log = logging.getLogger("adaptr.plugins")

GROUP = "adaptr"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")

# registry kind -> hook name
REGISTRY_HOOKS = {
    "reader": "register_readers",
    "strategy": "register_merge_strategies",
    "quantizer": "register_quantizers",
    "exporter": "register_exporters",
    "step": "register_pipeline_steps",
    "backend": "register_backends",
}


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str | None
    version: str | None
    hooks: list[str] = field(default_factory=list)


class Registry:
    """Named objects of one kind, each remembered with the plugin that registered it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, tuple[Any, str]] = {}

    def add(self, obj: Any, plugin: str) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(
                f"plugin {plugin!r} registered a {self.kind} with invalid name {name!r}: "
                "names are lowercase letters, digits, '_' or '-'"
            )
        if name in self._items:
            other = self._items[name][1]
            raise DuplicateNameError(
                f"{self.kind} name {name!r} is registered by both plugin {other!r} and plugin {plugin!r}; "
                f"disable one with ADAPTR_DISABLE_PLUGINS"
            )
        self._items[name] = (obj, plugin)

    def get(self, name: str) -> Any:
        try:
            return self._items[name][0]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def plugin_of(self, name: str) -> str:
        self.get(name)
        return self._items[name][1]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, Any, str]]:
        for name in sorted(self._items):
            obj, plugin = self._items[name]
            yield name, obj, plugin

    def __contains__(self, name: object) -> bool:
        return name in self._items


class PluginHost:
    """One loaded set of plugins and the registries built from them."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self._registries: dict[str, Registry] = {}

    def load_entry_points(self) -> None:
        settings = get_settings()
        for name in settings.disable_plugins:
            self.pm.set_blocked(name)
        for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
            if self.pm.is_blocked(ep.name) or self.pm.has_plugin(ep.name):
                continue
            if settings.load_plugins is not None and ep.name not in settings.load_plugins:
                continue
            try:
                plugin = ep.load()
            except Exception as e:
                dist = ep.dist.name if ep.dist else "?"
                raise PluginError(f"plugin {ep.name!r} ({dist}) failed to load: {e}") from e
            dist = ep.dist
            self.add(
                plugin,
                ep.name,
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
            )
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:  # a misspelled hook would otherwise never run
            name = self.pm.get_name(e.plugin) if e.plugin is not None else "?"
            raise PluginError(
                f"plugin {name!r}: {e}; fix the hook name or disable it with ADAPTR_DISABLE_PLUGINS={name}"
            ) from e
        if settings.trace_plugins:
            self.pm.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
            self.pm.enable_tracing()

    def add(
        self, plugin: Any, name: str, *, distribution: str | None = None, version: str | None = None
    ) -> None:
        """Register a plugin object directly (used by tests and embedding applications)."""
        if self.pm.is_blocked(name):
            return
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as e:
            raise PluginError(
                f"plugin {name!r} ({distribution or 'not installed'}) cannot be registered: {e}"
            ) from e
        module = getattr(plugin, "__name__", type(plugin).__module__)
        hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
        self.info[name] = PluginInfo(name, module, distribution, version, hooks)
        self._registries.clear()

    def remove(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.info.pop(name, None)
        self._registries.clear()

    def registry(self, kind: str) -> Registry:
        if kind not in self._registries:
            reg = Registry(kind)
            hook = getattr(self.pm.hook, REGISTRY_HOOKS[kind])
            # Call each implementation on its own so a duplicate names the plugin at fault.
            for impl in reversed(hook.get_hookimpls()):
                impl.function(register=lambda obj, _p=impl.plugin_name: reg.add(obj, _p))
            self._registries[kind] = reg
        return self._registries[kind]

    def plugin_version(self, plugin: str) -> str | None:
        info = self.info.get(plugin)
        if info and info.version:
            return info.version
        from adaptr import __version__

        return __version__

    def describe(self) -> list[dict[str, Any]]:
        registered: dict[str, dict[str, list[str]]] = {n: {} for n in self.info}
        accelerates: dict[str, dict[str, dict[str, str]]] = {}
        for kind in REGISTRY_HOOKS:
            for name, obj, plugin in self.registry(kind).items():
                registered.setdefault(plugin, {}).setdefault(kind, []).append(name)
                if kind == "backend":
                    accelerates.setdefault(plugin, {})[name] = dict(obj.operations)
        return [
            {
                "name": i.name,
                "module": i.module,
                "distribution": i.distribution,
                "version": i.version,
                "hooks": i.hooks,
                "registers": registered.get(i.name, {}),
                "accelerates": accelerates.get(i.name, {}),
            }
            for i in sorted(self.info.values(), key=lambda i: i.name)
        ]


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process's plugin host, loaded on first use."""
    global _host
    if _host is None:
        host = PluginHost()
        host.load_entry_points()
        _host = host
    return _host


def reset_plugins() -> None:
    """Forget loaded plugins so the next use re-reads the environment (tests, servers)."""
    global _host
    _host = None


def get_registry(kind: str) -> Registry:
    return get_host().registry(kind)


def get_strategy(name: str) -> Any:
    return get_registry("strategy").get(name)


def get_reader(name: str) -> Any:
    return get_registry("reader").get(name)
