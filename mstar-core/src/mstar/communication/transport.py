"""Tensor transports: tensors move worker to worker by handle, never through the conductor.

A transport stores a tensor under a key and hands out a `Handle`; the receiver fetches it
with `get`. Every handle belongs to a scope, its `request_id`: a request's id, so
`free_request` releases whatever a finished, cancelled or failed request left behind, or a
weights scope (`weights_scope`: a node's weights streamed to a peer, `mstar.weights.peer`),
which no request's end ever names and which the weights service frees by itself. `LocalTransport` serves components in
one process (no copy); SHM/TCP/RDMA transports implement the same interface across
processes and register through the `mstar_register_transports` hook.
"""

from __future__ import annotations

import itertools
import threading
from typing import Protocol

import torch

from mstar.communication.messages import Handle

#: The prefix of a weights scope; request ids never start with it.
WEIGHTS_SCOPE = "weights:"


def weights_scope(name: str) -> str:
    """The scope of weight tensors served to a peer, e.g. `weights:<model>@<rev>/<node>/..`."""
    return WEIGHTS_SCOPE + name


class Transport(Protocol):
    """Tensors by handle. A handle is owned by the component it was sent to (`owner`):
    the receiver frees it once read; `free_request` frees what a component still owns of a
    request (values never consumed, e.g. after a cancel)."""

    address: str

    def put(self, tensor: torch.Tensor, request_id: str, owner: str | None = None) -> Handle: ...

    def get(self, handle: Handle) -> torch.Tensor: ...

    def free(self, handle: Handle) -> None: ...

    def free_request(self, request_id: str) -> None: ...

    def live_handles(self) -> int:
        """How many tensors are held now, by every component sharing the store."""


class LocalStore:
    """The tensors of every component of one process, by key."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[str, str, torch.Tensor]] = {}  # key -> (owner, rid, t)
        self.ids = itertools.count()
        self.lock = threading.Lock()


class LocalTransport:
    """One process: components share a `LocalStore`; `get` returns the tensor itself
    (senders never modify a tensor after handing it over)."""

    def __init__(self, address: str, store: LocalStore) -> None:
        self.address = address
        self._store = store

    def put(self, tensor: torch.Tensor, request_id: str, owner: str | None = None) -> Handle:
        owner = owner or self.address
        with self._store.lock:
            key = f"t{next(self._store.ids)}"
            # detach only what needs it: in one process every torch call lets another
            # thread take the GIL, and this runs once per emitted token
            kept = tensor.detach() if tensor.requires_grad else tensor
            self._store.items[key] = (owner, request_id, kept)
        return Handle(key=key, owner=owner, request_id=request_id,
                      dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape))

    def get(self, handle: Handle) -> torch.Tensor:
        with self._store.lock:
            item = self._store.items.get(handle.key)
        if item is None:
            raise KeyError(f"tensor {handle.key} of request {handle.request_id} is gone")
        return item[2]

    def free(self, handle: Handle) -> None:
        with self._store.lock:
            self._store.items.pop(handle.key, None)

    def free_request(self, request_id: str) -> None:
        with self._store.lock:
            for key in [k for k, (owner, rid, _) in self._store.items.items()
                        if rid == request_id and owner == self.address]:
                del self._store.items[key]

    def live_handles(self) -> int:
        with self._store.lock:
            return len(self._store.items)
