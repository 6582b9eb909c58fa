"""Materialising a module built on the meta device directly on its own device.

A node's module is constructed under `torch.device("meta")` (shapes only, no memory), then
`materialize` allocates every parameter and buffer, uninitialised, on the rank's device,
lets the loader (checkpoint or dummy) fill them, and calls `reset_buffers()` on every
submodule that has one, to recompute buffers that no checkpoint holds (rotary `inv_freq`).
Nothing is allocated twice (no CPU module moved to the GPU: peak memory is the weights).
A parameter or buffer left unfilled would hold whatever memory `empty` returned, so it is
an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class UninitializedError(ValueError):
    """Parameters or buffers that neither the loader nor a `reset_buffers()` filled."""

    def __init__(self, module_name: str, names: list[str]):
        self.names = names
        super().__init__(
            f"{module_name}: {len(names)} tensor(s) neither loaded nor recomputed after "
            "materialising from the meta device: " + ", ".join(names) + ". Load them from "
            "the checkpoint, or give their module a reset_buffers() that computes them.")


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under every name (tied ones under each)."""
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def allocate(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every tensor of `module` uninitialised storage on `device`, floating ones in
    `dtype`. Unlike `nn.Module.to_empty`, a tensor shared by several modules (tied
    embeddings) stays one tensor, and a parameter keeps its attributes (`tp_shard_dim`)."""
    new: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for slots in (mod._parameters, mod._buffers):
            for name, old in slots.items():
                if old is None:
                    continue
                if id(old) not in new:
                    empty = torch.empty_like(
                        old, device=device, dtype=dtype if old.is_floating_point() else None)
                    if isinstance(old, nn.Parameter):
                        empty = nn.Parameter(empty, requires_grad=old.requires_grad)
                        empty.__dict__.update(old.__dict__)
                    new[id(old)] = empty
                slots[name] = new[id(old)]


def reset_buffers(module: nn.Module) -> list[str]:
    """Call `reset_buffers()` on every submodule that has one; the names of the buffers
    those submodules own (they are taken as recomputed)."""
    names = []
    for prefix, mod in module.named_modules():
        reset = getattr(mod, "reset_buffers", None)
        if callable(reset):
            reset()
            dot = f"{prefix}." if prefix else ""
            names += [dot + name for name, _ in mod.named_buffers(recurse=False)]
    return names


def materialize(module: nn.Module, device: torch.device, dtype: torch.dtype,
                load: Callable[[nn.Module], Iterable[str]]) -> nn.Module:
    """Allocate `module` (built on meta) on `device`, fill it with `load(module)` (returns
    the names it filled), recompute its non-checkpoint buffers, and check that every
    parameter and buffer was filled (`UninitializedError` otherwise)."""
    allocate(module, device, dtype)
    tensors = _named_tensors(module)
    filled = {id(tensors[name]) for name in load(module)}
    filled |= {id(tensors[name]) for name in reset_buffers(module)}
    unfilled = [name for name, t in tensors.items() if id(t) not in filled]
    if unfilled:
        raise UninitializedError(type(module).__name__, unfilled)
    return module
