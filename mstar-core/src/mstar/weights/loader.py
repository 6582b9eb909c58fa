"""Reading checkpoints tensor by tensor and loading them into a module, sharded on load.

Safetensors files are opened on the rank's device and read lazily (`StoredTensor`): a
tensor is read straight onto the device (no host copy moved over), and a tensor-parallel
rank reads only its shard's rows (`get_slice`), so it never holds a sharded layer's full
weight. `.bin`/`.pt`/`.pth` files go through `torch.load(weights_only=True)` on the host
(memory-mapped when they are zip files), with the node's `WeightSpec.safe_globals` as the
only allowlist (never `weights_only=False`); their shards are copied to the device.
`load_weights` maps each key through the node's `WeightSpec`, checks it against the full
(unsharded) shape of its parameter, reads this rank's shard and copies it in. Every
problem is collected first and reported in one `WeightLoadError`, so a wrong key map is
fixed in one round, not one key at a time.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn

from mstar.weights.spec import WeightSpec

_WRAPPERS = ("state_dict", "model")


class WeightLoadError(ValueError):
    """Checkpoint and module disagree. Attributes hold each kind of problem."""

    def __init__(self, module_name: str, *, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]],
                 duplicates: list[tuple[str, str, str]]):
        self.missing, self.unexpected = missing, unexpected
        self.mismatched, self.duplicates = mismatched, duplicates
        lines = [f"weights of {module_name} do not match the checkpoint:"]
        if missing:
            lines.append(f"  missing parameters ({len(missing)}), not in the checkpoint:")
            lines += [f"    {name}" for name in missing]
        if unexpected:
            lines.append(f"  unexpected checkpoint keys ({len(unexpected)}), no such parameter "
                         "(map them with key_map, or ignore them with a None rule):")
            lines += [f"    {key}" for key in unexpected]
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}):")
            lines += [f"    checkpoint key {key!r} -> parameter {name!r}: checkpoint shape "
                      f"{list(got)}, expected {list(want)} (unsharded)"
                      for key, name, got, want in mismatched]
        if duplicates:
            lines.append(f"  parameters loaded twice ({len(duplicates)}):")
            lines += [f"    checkpoint keys {first!r} and {second!r} both map to {name!r}"
                      for first, second, name in duplicates]
        super().__init__("\n".join(lines))


class UnsafeCheckpointError(ValueError):
    """`torch.load(weights_only=True)` refused a pickled checkpoint: it holds an object of
    a type not allowlisted. `type_name` is that type (as torch names it) when known."""

    def __init__(self, path: Path, type_name: str | None, reason: str):
        self.path, self.type_name = path, type_name
        what = f"an object of type {type_name}" if type_name else "an object"
        super().__init__(
            f"{path} holds {what} that torch.load(weights_only=True) refuses to unpickle "
            f"({reason}). If the checkpoint is trusted and that type is plain data, list "
            "the class in the node's WeightSpec(safe_globals=(...,)); mstar never loads "
            "with weights_only=False.")


_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_REASON = re.compile(r"WeightsUnpickler error: (.*)")


def _refusal(path: Path, err: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """torch's refusal, reduced to the type it names (its message is long and suggests
    weights_only=False, which we never do)."""
    text = str(err)
    found, reason = _GLOBAL.search(text), _REASON.search(text)
    return UnsafeCheckpointError(path, found.group(1) if found else None,
                                 reason.group(1).strip() if reason else text.splitlines()[0])


@dataclass
class LoadReport:
    """What was loaded: parameter/buffer names filled, checkpoint keys ignored by rule."""

    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# -- reading ---------------------------------------------------------------------------------


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            yield prefix + key, value
        elif isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")


def _read_torch(path: Path, safe_globals: Sequence[Any] = ()
                ) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            obj = torch.load(path, map_location="cpu", weights_only=True,
                             mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for wrapper in _WRAPPERS:
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    yield from _flatten(obj)


class StoredTensor:
    """One tensor of an open safetensors file, read when asked: whole (`read`) or only
    `length` entries from `start` along `dim` (`narrow`, as `torch.Tensor.narrow`), onto the
    device the file was opened on. Valid while its file is open (until `iter_checkpoint`
    moves past it)."""

    def __init__(self, handle: Any, key: str):
        self._handle, self._key = handle, key
        self._slice = handle.get_slice(key)
        self.shape = tuple(self._slice.get_shape())

    def read(self) -> torch.Tensor:
        return self._handle.get_tensor(self._key)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._slice[(slice(None),) * dim + (slice(start, start + length),)]


def _read_safetensors(path: Path, device: str) -> Iterator[tuple[str, StoredTensor]]:
    with safe_open(path, framework="pt", device=device) as f:
        for key in f.keys():
            yield key, StoredTensor(f, key)


def iter_checkpoint(files: Iterable[str | Path],
                    format: Literal["auto", "safetensors", "torch"] = "auto",
                    device: torch.device | str = "cpu", *, safe_globals: Sequence[Any] = (),
                    ) -> Iterator[tuple[str, torch.Tensor | StoredTensor]]:
    """(key, tensor) of every tensor in `files`, in file order: a `StoredTensor` read onto
    `device` from safetensors files, a host tensor from torch files (unpickled with
    `weights_only=True`, `safe_globals` allowlisted; else `UnsafeCheckpointError`). `auto`
    picks safetensors by the `.safetensors` suffix and torch.load otherwise."""
    for file in files:
        path = Path(file)
        use_safetensors = format == "safetensors" or (
            format == "auto" and path.suffix == ".safetensors")
        yield from (_read_safetensors(path, str(device)) if use_safetensors
                    else _read_torch(path, safe_globals))


# -- sharding --------------------------------------------------------------------------------


def full_shape(target: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    """The unsharded shape of a (possibly TP-sharded) parameter: what the checkpoint holds."""
    shape = list(target.shape)
    dim = getattr(target, "tp_shard_dim", None)
    if dim is not None:
        shape[dim] = getattr(target, "tp_full_size", None) or shape[dim] * tp_size
    return tuple(shape)


def shard_for_rank(full: torch.Tensor | StoredTensor, target: torch.Tensor, tp_rank: int,
                   tp_size: int) -> torch.Tensor:
    """This rank's piece of `full` for `target`: equal chunks along `tp_shard_dim`, the last
    one zero-padded when the dimension does not divide (vocabulary padding). Of a
    `StoredTensor`, only that piece is read."""
    dim = getattr(target, "tp_shard_dim", None)
    if dim is None or tp_size == 1:
        return full.read() if isinstance(full, StoredTensor) else full
    size, total = target.shape[dim], full.shape[dim]
    start = min(tp_rank * size, total)
    piece = full.narrow(dim, start, min(size, total - start))
    if piece.shape[dim] < size:
        pad = list(piece.shape)
        pad[dim] = size - piece.shape[dim]
        piece = torch.cat([piece, piece.new_zeros(pad)], dim=dim)
    return piece


def assign(target: torch.Tensor, value: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Copy `value` into `target`; a floating Parameter is converted to `dtype` if given."""
    with torch.no_grad():
        if (dtype is not None and isinstance(target, nn.Parameter)
                and target.is_floating_point() and target.dtype != dtype):
            target.data = torch.empty_like(target, dtype=dtype).copy_(value)
        else:
            target.data.copy_(value)


# -- loading ---------------------------------------------------------------------------------


def load_weights(module: nn.Module,
                 tensors: Iterable[tuple[str, torch.Tensor | StoredTensor]],
                 spec: WeightSpec, *, tp_rank: int = 0, tp_size: int = 1,
                 dtype: torch.dtype | None = None) -> LoadReport:
    """Load `tensors` (checkpoint key, full tensor or `StoredTensor`) into `module`'s
    parameters and persistent buffers as rank `tp_rank` of `tp_size`. Raises
    `WeightLoadError` listing every missing parameter, unexpected key, shape mismatch and
    duplicate. A parameter shared under several names (tied embeddings) counts as loaded
    when any of its names is."""
    # state_dict(keep_vars) lists parameters and persistent buffers under every name.
    targets: dict[str, torch.Tensor] = module.state_dict(keep_vars=True)
    dtype = dtype or spec.dtype
    source_of: dict[str, str] = {}
    report = LoadReport()
    unexpected: list[str] = []
    mismatched: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = []
    duplicates: list[tuple[str, str, str]] = []
    for key, tensor in tensors:
        name = spec.map_key(key)
        if name is None:
            report.ignored.append(key)
            continue
        target = targets.get(name)
        if target is None:
            unexpected.append(key)
            continue
        if name in source_of:
            duplicates.append((source_of[name], key, name))
            continue
        want = full_shape(target, tp_size)
        if tuple(tensor.shape) != want:
            mismatched.append((key, name, tuple(tensor.shape), want))
            continue
        assign(target, shard_for_rank(tensor, target, tp_rank, tp_size), dtype)
        source_of[name] = key
    loaded_ids = {id(targets[name]) for name in source_of}
    # A parameter with a wrong-shaped key is reported as a mismatch, not also as missing.
    found_ids = loaded_ids | {id(targets[name]) for _, name, _, _ in mismatched}
    missing = [name for name, t in targets.items() if id(t) not in found_ids]
    if missing or unexpected or mismatched or duplicates:
        raise WeightLoadError(type(module).__name__, missing=missing, unexpected=unexpected,
                              mismatched=mismatched, duplicates=duplicates)
    report.loaded = [name for name, t in targets.items() if id(t) in loaded_ids]
    return report
