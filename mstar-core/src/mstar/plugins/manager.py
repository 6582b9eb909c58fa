"""Plugin discovery and the registries plugins fill.

Plugins are the entry points of group "mstar" (plus core's own built-in plugin module).
Each is loaded on its own, so a plugin that fails to import or whose hook raises is reported
by `mstar plugins` and skipped while the others still load. A plugin's hooks first fill a
scratch registry (a failing hook leaves nothing behind); its entries then join the shared
registries under its distribution's name, so a name registered twice names both
distributions. Such a conflict is fatal for anyone asking for the registry (a deployment
must never silently pick one), yet `get_plugins()` still describes everything.

Loading a plugin imports only its plugin module, which registers import strings: listing
plugins and models never imports torch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy

from mstar.plugins import hookspecs
from mstar.plugins.registry import (
    DuplicateNameError,
    ModelRegistry,
    RouteSet,
    RouteSets,
    TransportRegistry,
)

GROUP = "mstar"
#: Core's transports register through the same hook, from this module (when it exists).
BUILTIN_MODULE = "mstar.communication.builtin"


@dataclass(frozen=True)
class PluginInfo:
    """What `mstar plugins` shows about one plugin. `error` is set when `status` is
    "error"; `models` and `transports` are the names it registered."""

    name: str
    distribution: str | None
    version: str | None
    status: Literal["ok", "error"]
    error: str | None = None
    models: tuple[str, ...] = ()
    transports: tuple[str, ...] = ()


@dataclass
class _Loaded:
    hooks: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    #: owner (as registries name it) -> its loaded plugin objects, for the hooks called
    #: on one model's plugin only (`model_routes`)
    objects: dict[str, list[Any]] = field(default_factory=dict)
    models: ModelRegistry = field(default_factory=ModelRegistry)
    transports: TransportRegistry = field(default_factory=TransportRegistry)
    model_conflicts: list[str] = field(default_factory=list)
    transport_conflicts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Source:
    name: str
    distribution: str | None
    version: str | None
    load: Callable[[], Any]

    @property
    def owner(self) -> str:
        """How registries name this plugin in conflict messages."""
        return self.distribution or f"plugin {self.name!r}"


def _import_builtin() -> Any:
    try:
        return importlib.import_module(BUILTIN_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == BUILTIN_MODULE:
            return None  # core ships no built-in plugin (yet)
        raise


def _core_version() -> str | None:
    try:
        return importlib.metadata.version("mstar-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def _sources() -> Iterator[_Source]:
    yield _Source("builtin", "mstar-core", _core_version(), _import_builtin)
    entry_points = sorted(importlib.metadata.entry_points(group=GROUP),
                          key=lambda ep: (ep.name, ep.dist.name if ep.dist else ""))
    for ep in entry_points:
        dist = ep.dist
        yield _Source(ep.name, dist.name if dist else None, dist.version if dist else None,
                      ep.load)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _register(pm: pluggy.PluginManager,
              source: _Source) -> tuple[Any, ModelRegistry, TransportRegistry] | None:
    """Import the plugin and run its hooks into scratch registries: (the plugin, its
    models, its transports); None when absent."""
    plugin = source.load()
    if plugin is None:
        return None
    plugin_name = f"{source.owner}:{source.name}"
    pm.register(plugin, name=plugin_name)
    try:
        pm.check_pending()  # a misspelt mstar_* hook would otherwise be ignored silently
    except pluggy.PluginValidationError:
        pm.unregister(name=plugin_name)
        raise
    others = [p for p in pm.get_plugins() if p is not plugin]
    models, transports = ModelRegistry(), TransportRegistry()
    models.current_distribution = transports.current_distribution = source.owner
    pm.subset_hook_caller("mstar_register_models", others)(registry=models)
    pm.subset_hook_caller("mstar_register_transports", others)(registry=transports)
    return plugin, models, transports


def _merge(scratch: ModelRegistry | TransportRegistry, shared: ModelRegistry | TransportRegistry,
           owner: str) -> tuple[tuple[str, ...], list[str]]:
    """Add a plugin's entries to the shared registry: (names added, conflict messages)."""
    shared.current_distribution = owner
    added, conflicts = [], []
    for name, spec in zip(scratch.names(), scratch, strict=True):
        try:
            shared.add(spec)
        except DuplicateNameError as exc:
            conflicts.append(str(exc))
        else:
            added.append(name)
    return tuple(added), conflicts


@functools.cache
def _load() -> _Loaded:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    loaded = _Loaded(pm)
    for source in _sources():
        info = functools.partial(PluginInfo, source.name, source.distribution, source.version)
        try:
            registered = _register(pm, source)
        except Exception as exc:  # a broken plugin must not stop the others; one that
            # names an entry twice itself is broken too (skipped, so nothing is ambiguous)
            loaded.plugins.append(info("error", _one_line(exc)))
            continue
        if registered is None:
            continue
        plugin, models, transports = registered
        loaded.objects.setdefault(source.owner, []).append(plugin)
        model_names, model_conflicts = _merge(models, loaded.models, source.owner)
        transport_names, transport_conflicts = _merge(transports, loaded.transports,
                                                      source.owner)
        loaded.model_conflicts += model_conflicts
        loaded.transport_conflicts += transport_conflicts
        problems = model_conflicts + transport_conflicts
        loaded.plugins.append(info("error" if problems else "ok", "; ".join(problems) or None,
                                   model_names, transport_names))
    return loaded


def get_plugins() -> list[PluginInfo]:
    """Every plugin found, loaded or not (never raises for a broken plugin)."""
    return list(_load().plugins)


def model_registry(*, strict: bool = True) -> ModelRegistry:
    """Every installed model. Raises `DuplicateNameError` if two plugins claim a name,
    unless `strict` is False (listing: the first registration of a name is kept)."""
    loaded = _load()
    if strict and loaded.model_conflicts:
        raise DuplicateNameError("\n".join(loaded.model_conflicts))
    return loaded.models


def transport_registry(*, strict: bool = True) -> TransportRegistry:
    """Every installed tensor transport. Raises `DuplicateNameError` on a conflict, unless
    `strict` is False (listing only)."""
    loaded = _load()
    if strict and loaded.transport_conflicts:
        raise DuplicateNameError("\n".join(loaded.transport_conflicts))
    return loaded.transports


def model_routes(name: str) -> list[RouteSet]:
    """The route sets of model `name`: its own plugin's `mstar_register_routes` alone is
    asked (another plugin never adds routes to a model it did not register); none for a
    model no plugin registered. A failing hook raises, naming the plugin."""
    loaded = _load()
    if name not in loaded.models:
        return []
    owner = loaded.models.owner(name)
    own = loaded.objects.get(owner, [])
    others = [p for p in loaded.hooks.get_plugins() if not any(p is o for o in own)]
    routes = RouteSets(name, owner)
    try:
        loaded.hooks.subset_hook_caller("mstar_register_routes", others)(routes=routes)
    except Exception as exc:
        raise RuntimeError(f"model {name!r}: the routes of {owner} failed to register: "
                           f"{_one_line(exc)}") from exc
    return routes.sets


def load_model_class(name: str) -> type:
    """Import the `Model` subclass registered as `name` (this is where torch is imported).
    An unknown name raises KeyError listing the installed models."""
    from mstar.model.contract import Model

    spec = model_registry().get(name)
    try:
        cls = spec.load_class()
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"model {name!r} from {model_registry().owner(name)}: cannot import "
                          f"{spec.model_class}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise TypeError(f"model {name!r}: {spec.model_class} is not an mstar.model.Model "
                        f"subclass")
    return cls


def reset() -> None:
    """Forget what was discovered (tests that install plugins on the fly)."""
    _load.cache_clear()
