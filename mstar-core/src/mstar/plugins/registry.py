"""Registries filled by plugins: models (by name), tensor transports (by protocol), and
the HTTP route sets a plugin adds for the model it serves.

Entries hold import strings, never imported objects, so listing what is installed imports
no torch model code. A name registered twice is an error naming both distributions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


def import_string(path: str) -> Any:
    """Import "package.module:attr" (or "package.module.attr")."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ModelSpec:
    """A servable model name and where its pieces live.

    - `model_class`: import string of the `mstar.model.Model` subclass.
    - `configs`: packaged deployment configs, name -> import-resource path
      ("mstar_orpheus:configs/orpheus_colocated.yaml"); `default_config` names one.
    - `presets`: preset names the model class defines (`tiny`, `small`, real sizes).
    - `weight_sources`: default checkpoint location (hub repo id or path) per weight source
      name ("default" for the main checkpoint).
    - `capabilities`: routes the model serves (chat, completions, speech, transcription,
      images, image_edits, actions, latents, …): the API server enables routes from these.
    - `request_schema`: import string of the pydantic model of the model-specific fields
      of `POST /generate`, or None.
    """

    name: str
    model_class: str
    configs: dict[str, str] = field(default_factory=dict)
    default_config: str | None = None
    presets: tuple[str, ...] = ()
    weight_sources: dict[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    request_schema: str | None = None
    description: str = ""

    def load_class(self) -> type:
        return import_string(self.model_class)


@dataclass(frozen=True)
class TransportSpec:
    """A tensor transport by protocol name ("SHM", "TCP", "RDMA", "LOCAL")."""

    protocol: str
    transport_class: str
    description: str = ""


@dataclass(frozen=True)
class RouteSet:
    """HTTP or WebSocket routes a plugin adds for one of its models, served only when the
    model declares `capability` (so a deployment shows exactly the routes its capabilities
    say). `add(context)` adds them through an `mstar.api_server.plugin_routes.RouteContext`,
    core's request plumbing; `owner` is the plugin's distribution."""

    capability: str
    add: Callable[[Any], None]
    owner: str


class RouteSets:
    """What a plugin's `mstar_register_routes` hook fills for `model`, the served model."""

    def __init__(self, model: str, owner: str):
        self.model, self.owner = model, owner
        self.sets: list[RouteSet] = []

    def add(self, capability: str, add: Callable[[Any], None]) -> None:
        self.sets.append(RouteSet(capability, add, self.owner))


class DuplicateNameError(ValueError):
    pass


class _Registry:
    kind = "entry"

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}
        self._owners: dict[str, str] = {}
        self.current_distribution = "<unknown>"

    def _add(self, name: str, item: Any) -> None:
        if name in self._items:
            raise DuplicateNameError(
                f"{self.kind} {name!r} is registered twice: by {self._owners[name]} and by "
                f"{self.current_distribution}")
        self._items[name] = item
        self._owners[name] = self.current_distribution

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._items)


class ModelRegistry(_Registry):
    kind = "model"

    def add(self, spec: ModelSpec) -> None:
        self._add(spec.name, spec)

    def get(self, name: str) -> ModelSpec:
        if name not in self._items:
            installed = ", ".join(self.names()) or "none"
            raise KeyError(f"unknown model {name!r}; installed models: {installed} "
                           f"(a model comes from a plugin: pip install mstar-<family>)")
        return self._items[name]


class TransportRegistry(_Registry):
    kind = "transport"

    def add(self, spec: TransportSpec) -> None:
        self._add(spec.protocol.upper(), spec)

    def get(self, protocol: str) -> TransportSpec:
        key = protocol.upper()
        if key not in self._items:
            raise KeyError(f"unknown tensor transport {protocol!r}; available: "
                           f"{', '.join(self.names())}")
        return self._items[key]
