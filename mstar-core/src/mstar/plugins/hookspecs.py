"""The hooks a plugin implements (pluggy project "mstar"). Add one only when a second
caller needs it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from mstar.plugins.registry import ModelRegistry, TransportRegistry

hookspec = pluggy.HookspecMarker("mstar")
hookimpl = pluggy.HookimplMarker("mstar")


@hookspec
def mstar_register_models(registry: ModelRegistry) -> None:
    """Add `ModelSpec`s (import strings only, so listing models imports no torch)."""


@hookspec
def mstar_register_transports(registry: TransportRegistry) -> None:
    """Add `TransportSpec`s: tensor transports by protocol name."""
