"""mstar: one runtime for composite multimodal models.

`mstar.load(model, ...)` starts a deployment in this process; `mstar.events` are what it
yields; `mstar.MStarClient` / `mstar.AsyncMStarClient` talk to a server. Heavy modules
(torch) are imported on first use, so `import mstar` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("load", "LocalDeployment"):
        from mstar.runtime import local

        return getattr(local, name)
    if name == "RequestError":
        from mstar.errors import RequestError

        return RequestError
    if name in ("MStarClient", "AsyncMStarClient"):
        from mstar import client

        return getattr(client, name)
    if name == "events":
        import importlib

        return importlib.import_module("mstar.events")
    raise AttributeError(f"module 'mstar' has no attribute {name!r}")


__all__ = ["AsyncMStarClient", "LocalDeployment", "MStarClient", "RequestError", "events",
           "load"]
