"""Plugins: the hooks a plugin implements, discovery, and the model/transport registries.

Importing this package imports no torch: plugins register import strings only.
"""

from mstar.plugins.hookspecs import hookimpl
from mstar.plugins.manager import (
    PluginInfo,
    get_plugins,
    load_model_class,
    model_registry,
    model_routes,
    transport_registry,
)
from mstar.plugins.registry import (
    DuplicateNameError,
    ModelRegistry,
    ModelSpec,
    RouteSet,
    RouteSets,
    TransportRegistry,
    TransportSpec,
)

__all__ = [
    "DuplicateNameError",
    "ModelRegistry",
    "ModelSpec",
    "PluginInfo",
    "RouteSet",
    "RouteSets",
    "TransportRegistry",
    "TransportSpec",
    "get_plugins",
    "hookimpl",
    "load_model_class",
    "model_registry",
    "model_routes",
    "transport_registry",
]
