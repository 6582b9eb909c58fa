"""Modules are built on the meta device and materialised by the loader on their device.

Every plugin node built by `build_module` (meta, then `mstar.weights.materialize`) must
hold bit-for-bit what the previous way gave (built on the CPU, moved, then filled),
non-persistent buffers (rotary `inv_freq`, `axis_of_freq`) and tied parameters included;
a parameter's memory is written once (by the loader, not first by a throwaway init); and a
tensor neither loaded nor recomputed is an error that names it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mstar.config.validate import NodePlacement
from mstar.model.contract import BuildContext, Model
from mstar.model.layers.rotary import RotaryEmbedding
from mstar.runtime.builder import LoadOptions, build_module, checkpoint_location
from mstar.weights import (
    UninitializedError,
    checkpoint_files,
    init_dummy_weights,
    iter_checkpoint,
    load_weights,
    materialize,
    resolve_source,
)

CPU = torch.device("cpu")


def _testvla(tmp: Path) -> tuple[Model, Path]:
    from mstar_testvla.checkpoint import write_tiny_checkpoint
    from mstar_testvla.model import TestVLA

    return TestVLA(TestVLA.make_config(preset="tiny")), write_tiny_checkpoint(tmp / "c", "tiny")


def _orpheus(tmp: Path) -> tuple[Model, Path]:
    from mstar_orpheus.checkpoint import write_tiny_checkpoint
    from mstar_orpheus.model import Orpheus

    return Orpheus(Orpheus.make_config(preset="tiny")), write_tiny_checkpoint(tmp / "c", "tiny")


def _qwen3omni(tmp: Path) -> tuple[Model, Path]:
    from mstar_qwen3omni.checkpoint import write_checkpoint
    from mstar_qwen3omni.model import Qwen3Omni

    return Qwen3Omni(Qwen3Omni.make_config(preset="tiny")), write_checkpoint(tmp / "c")


PLUGINS = {"testvla": _testvla, "orpheus": _orpheus, "qwen3omni": _qwen3omni}
NODES = [("testvla", n, 1) for n in ("vision_encoder", "LLM", "action_init", "combine",
                                     "consumer")]
NODES += [("testvla", "LLM", 2), ("orpheus", "LLM", 1), ("orpheus", "LLM", 2),
          ("orpheus", "snac_decoder", 1)]
NODES += [("qwen3omni", n, 1) for n in ("audio_encoder", "vision_encoder", "Thinker",
                                        "Talker", "Code2Wav")]
NODES += [("qwen3omni", "Thinker", 2), ("qwen3omni", "Talker", 2)]
#: Each plugin's main KV node.
LLM = {"testvla": "LLM", "orpheus": "LLM", "qwen3omni": "Thinker"}


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> dict[str, tuple[Model, Path]]:
    """Each plugin's tiny model and a checkpoint of it."""
    return {name: make(tmp_path_factory.mktemp(name)) for name, make in PLUGINS.items()}


def built_on_cpu(model: Model, node: str, options: LoadOptions, tp_rank: int,
                 tp_size: int) -> nn.Module:
    """The previous way, kept here as the reference: build on the CPU, then fill."""
    module = model.build_submodule(node, BuildContext(node, CPU, torch.float32, tp_rank,
                                                      tp_size))
    if options.load_format == "dummy":
        init_dummy_weights(module, seed=options.seed, tp_rank=tp_rank, tp_size=tp_size,
                           adjust=functools.partial(model.adjust_dummy_weight, node))
    else:
        ws = model.weight_spec(node)
        path = resolve_source(checkpoint_location(ws.source, options), patterns=ws.patterns,
                              subfolder=ws.subfolder)
        load_weights(module, iter_checkpoint(checkpoint_files(path, ws.patterns), ws.format),
                     ws, tp_rank=tp_rank, tp_size=tp_size, dtype=ws.dtype or torch.float32)
    return module.eval()


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def sharing(module: nn.Module) -> list[list[str]]:
    """Names grouped by the tensor they are (tied embeddings form one group)."""
    groups: dict[int, list[str]] = {}
    for name, t in tensors(module).items():
        groups.setdefault(id(t), []).append(name)
    return sorted(groups.values())


@pytest.mark.parametrize("load_format", ["dummy", "auto"])
@pytest.mark.parametrize("name,node_name,tp_size", NODES,
                         ids=[f"{p}-{n}-tp{t}" for p, n, t in NODES])
def test_meta_build_loads_the_same_values(plugins, name, node_name, tp_size, load_format):
    model, checkpoint = plugins[name]
    options = LoadOptions(load_format=load_format, model_path=str(checkpoint), seed=3)
    placement = NodePlacement(module=node_name, ranks=tuple(range(tp_size)), tp_size=tp_size)
    for rank in range(tp_size):
        new = build_module(model, node_name, placement, rank, options, CPU)
        old = built_on_cpu(model, node_name, options, rank, tp_size)
        new_t, old_t = tensors(new), tensors(old)
        assert list(new_t) == list(old_t)
        assert sharing(new) == sharing(old)
        for key, want in old_t.items():
            got = new_t[key]
            assert got.device == CPU and got.dtype == want.dtype, key
            assert torch.equal(got, want), f"{name}/{node_name} rank {rank}: {key} differs"
            assert getattr(got, "tp_shard_dim", None) == getattr(want, "tp_shard_dim", None)


def test_rotary_with_sections_builds_on_meta():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    with torch.device("meta"):
        rope = RotaryEmbedding(16, 500.0, rope_scaling=scaling, sections=(2, 3, 3))
    assert rope.inv_freq.is_meta and rope.axis_of_freq.is_meta
    materialize(rope, CPU, torch.float32, lambda module: [])
    ref = RotaryEmbedding(16, 500.0, rope_scaling=scaling, sections=(2, 3, 3))
    assert torch.equal(rope.inv_freq, ref.inv_freq)
    assert torch.equal(rope.axis_of_freq, ref.axis_of_freq)


class _Writes(TorchDispatchMode):
    """Counts in-place writes into each CPU storage (by address), and notes the shapes of
    the tensors made on the meta device."""

    def __init__(self):
        super().__init__()
        self.writes: dict[int, list[str]] = {}
        self.meta_shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_meta:
            self.meta_shapes.add(tuple(out.shape))
        target = args[0] if args else None
        if (func._schema.is_mutable and isinstance(target, torch.Tensor)
                and target.device.type == "cpu" and target.numel()):
            self.writes.setdefault(target.data_ptr(), []).append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("name", sorted(PLUGINS))
@pytest.mark.parametrize("load_format", ["dummy", "auto"])
def test_parameter_memory_is_written_once_by_the_loader(plugins, name, load_format):
    """Each parameter is first made on the meta device (shapes only: on a GPU rank, no
    CPU copy of the module before the move), and no memory is spent on an initialisation
    the loader then overwrites: its storage on the device is written once, by the loader."""
    model, checkpoint = plugins[name]
    options = LoadOptions(load_format=load_format, model_path=str(checkpoint))
    with _Writes() as mode:
        module = build_module(model, LLM[name], NodePlacement(LLM[name], (0,)), 0, options,
                              CPU)
    assert list(module.parameters())
    for param_name, p in module.named_parameters():
        assert tuple(p.shape) in mode.meta_shapes, param_name
        assert mode.writes.get(p.data_ptr()) == ["copy_"], (param_name, mode.writes.get(
            p.data_ptr()))


class _Masked(nn.Module):
    """A module with a buffer no checkpoint holds, recomputable or not."""

    def __init__(self, recompute: bool, persistent: bool):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("mask", torch.ones(4), persistent=persistent)
        if recompute:
            self.reset_buffers = lambda: self.mask.fill_(1.0)


@pytest.mark.parametrize("persistent", [False, True])
def test_a_tensor_neither_loaded_nor_recomputed_is_named(persistent):
    with torch.device("meta"):
        module = nn.Sequential(_Masked(recompute=False, persistent=persistent))
    with pytest.raises(UninitializedError, match=r"0\.mask") as err:
        materialize(module, CPU, torch.float32, lambda m: init_dummy_weights(m))
    assert err.value.names == ["0.mask"]
    with torch.device("meta"):
        module = nn.Sequential(_Masked(recompute=True, persistent=persistent))
    materialize(module, CPU, torch.float32, lambda m: init_dummy_weights(m))
    assert torch.equal(module[0].mask, torch.ones(4))
