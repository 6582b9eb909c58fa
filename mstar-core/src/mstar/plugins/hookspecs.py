"""The hooks a plugin implements (pluggy project "mstar"). Add one only when a second
caller needs it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from mstar.plugins.registry import ModelRegistry, RouteSets, TransportRegistry

hookspec = pluggy.HookspecMarker("mstar")
hookimpl = pluggy.HookimplMarker("mstar")


@hookspec
def mstar_register_models(registry: ModelRegistry) -> None:
    """Add `ModelSpec`s (import strings only, so listing models imports no torch)."""


@hookspec
def mstar_register_transports(registry: TransportRegistry) -> None:
    """Add `TransportSpec`s: tensor transports by protocol name."""


@hookspec
def mstar_register_routes(routes: RouteSets) -> None:
    """Add route sets for `routes.model`, the model being served: `routes.add(capability,
    add)`. Called when an HTTP app starts, on the plugin that registered that model only;
    `add(context)` then runs if the model declares `capability` (see
    `mstar.api_server.plugin_routes`). Import FastAPI and route modules inside the hook,
    never at the plugin module's top (listing plugins stays light)."""
