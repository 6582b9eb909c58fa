"""Plugins: the hooks a plugin implements, discovery, and the model/transport registries.

Importing this package imports no torch: plugins register import strings only.
"""

from mstar.plugins.hookspecs import hookimpl
from mstar.plugins.manager import (
    PluginInfo,
    get_plugins,
    load_model_class,
    model_registry,
    transport_registry,
)
from mstar.plugins.registry import (
    DuplicateNameError,
    ModelRegistry,
    ModelSpec,
    TransportRegistry,
    TransportSpec,
)

__all__ = [
    "DuplicateNameError",
    "ModelRegistry",
    "ModelSpec",
    "PluginInfo",
    "TransportRegistry",
    "TransportSpec",
    "get_plugins",
    "hookimpl",
    "load_model_class",
    "model_registry",
    "transport_registry",
]
