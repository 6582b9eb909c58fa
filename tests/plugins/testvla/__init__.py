"""Tests of the mstar-testvla plugin, and the harness they share.

The harness does what the runtime does for one node, and no more, so the modules can be
checked against `reference.py` without the engine: load a node's weights from the
checkpoint files through `mstar.weights`, and run the LLM on hand-built `ForwardBatch`es
over a real `KVCacheManager` and the reference `TorchAttention` backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mstar.engine import rng
from mstar.engine.attention_torch import forward_step
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.model.contract import BuildContext, Model
from mstar.model.forward import ForwardBatch, Segment, SeqChunk, SeqKey
from mstar.weights.loader import iter_checkpoint, load_weights
from mstar.weights.sources import checkpoint_files, read_checkpoint_config


def load_model(checkpoint: Path) -> Model:
    """The TestVLA model as the runtime builds it: config from the checkpoint's
    config.json."""
    from mstar_testvla.model import TestVLA

    return TestVLA(TestVLA.make_config(checkpoint_config=read_checkpoint_config(checkpoint)))


def load_node(model: Model, node: str, checkpoint: Path) -> nn.Module:
    """Build `node` and load its weights from the checkpoint files by its WeightSpec."""
    module = model.build_submodule(node, BuildContext(node=node, device=torch.device("cpu"),
                                                      dtype=torch.float32))
    spec = model.weight_spec(node)
    files = checkpoint_files(checkpoint, spec.patterns)
    load_weights(module, iter_checkpoint(files, spec.format), spec)
    return module


def new_cache(model: Model, num_pages: int = 64, page_size: int = 4) -> KVCacheManager:
    return KVCacheManager(PagePool(model.kv_spec("LLM"), num_pages, page_size))


@dataclass
class Chunk:
    """One sequence's new tokens in a step: the per-invocation values a prepare rule
    produces (`input_ids`, `positions`, `segments`, `chunk_mode`, extras by name) and the
    outputs it wants (names of the node's declared outputs)."""

    key: SeqKey
    inputs: dict[str, Any]
    want: tuple[str, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)


def _output_range(at: str, n: int, segments: list[Segment]) -> tuple[int, int]:
    if at == "last":
        return n - 1, 1
    if at == "all":
        return 0, n
    k = int(at.removeprefix("segment:"))
    starts = [sum(s.length for s in segments[:i]) for i in range(len(segments))]
    return starts[k], segments[k].length


def run_llm(model: Model, module: nn.Module, cache: KVCacheManager,
            chunks: list[Chunk]) -> list[dict[str, torch.Tensor]]:
    """One engine step of the LLM over `chunks`; returns each chunk's outputs."""
    spec = model.kv_spec("LLM")
    seqs, ids, pos = [], [], []
    start = 0
    for ch in chunks:
        input_ids = torch.as_tensor(ch.inputs["input_ids"], dtype=torch.long).reshape(-1)
        n = int(input_ids.shape[0])
        segs = [Segment(length, kind) for length, kind in ch.inputs.get("segments",
                                                                        [(n, "causal")])]
        mode = ch.inputs.get("chunk_mode", "append")
        if not cache.has(ch.key):
            cache.create(ch.key)
        if mode == "append":
            cache.reserve(ch.key, n)
        outputs = {name: _output_range(spec.outputs[name], n, segs) for name in ch.want}
        seqs.append(SeqChunk(key=ch.key, start=start, length=n,
                             context_len=cache.length(ch.key), segments=segs, mode=mode,
                             outputs=outputs))
        ids.append(input_ids)
        p = ch.inputs["positions"]
        if isinstance(p, int):  # a run of text positions from p, on every axis
            p = torch.arange(p, p + n)
        pos.append(p if p.dim() == 2 else p.expand(3, n))
        start += n
    extras: dict[str, torch.Tensor] = {}
    for ex in spec.extras:
        if not any(ex.name in ch.inputs for ch in chunks):
            continue
        parts = []
        for ch, s in zip(chunks, seqs):
            rows = s.length if ex.per == "token" else 1
            value = ch.inputs.get(ex.name)
            if value is None:
                value = torch.full((rows, *ex.shape), ex.default, dtype=ex.dtype)
            parts.append(torch.as_tensor(value).to(ex.dtype).reshape(rows, *ex.shape))
        extras[ex.name] = torch.cat(parts)
    batch = ForwardBatch(input_ids=torch.cat(ids), positions=torch.cat(pos, dim=1), seqs=seqs,
                         extras=extras)
    return forward_step(module, batch, cache)


class KeyedNoise:
    """The `StepContext.randn` service for stateless nodes: item i's noise is keyed by its
    request seed (child 0, loop step 0), as core keys it."""

    def __init__(self, seeds: list[int]):
        self.seeds = seeds

    def randn(self, seq_index: int, shape: tuple[int, ...], site: str, *,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return rng.randn(shape, seed=self.seeds[seq_index], child=0, site=site, step=0,
                         dtype=dtype)
