"""The activation peak of a KV node's largest forward, for the CUDA KV budget.

On CUDA the KV cache gets what the weights and one step's forward leave of
`kv_cache.memory_fraction` (`kv_cache.device_kv_budget`, as vLLM's
`gpu_memory_utilization`). The forward's peak depends on the model and the attention
backend, so it is measured, as vLLM's profile run does: the node runs one step at the
scheduler's token budget through the real engine path (scheduler, runner, attention
backend, sampler) on dummy tokens, with a throw-away pool just large enough for them.

The memory figures come from a `DeviceMemory`: CUDA's allocator statistics on a GPU, an
injected reader in tests (so the arithmetic and the profile run on the CPU too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mstar.config.deployment import SchedulerConfig
from mstar.engine.kv_cache import KVCacheManager, PagePool, pages_for
from mstar.engine.kv_engine import KVEngine
from mstar.engine.work import NodeWork
from mstar.graph.primitives import GraphNode
from mstar.model.contract import KVSpec
from mstar.model.sampling import SamplingParams


@dataclass(frozen=True)
class DeviceMemory:
    """A device's memory figures in bytes: its `total`, what tensors hold now
    (`allocated`), the most they held since `reset_peak` (`peak`)."""

    total: Callable[[], int]
    allocated: Callable[[], int]
    peak: Callable[[], int]
    reset_peak: Callable[[], None]


def cuda_memory(device: torch.device) -> DeviceMemory:
    """`device`'s figures from the CUDA caching allocator (this process's tensors)."""
    return DeviceMemory(total=lambda: torch.cuda.mem_get_info(device)[1],
                        allocated=lambda: torch.cuda.memory_allocated(device),
                        peak=lambda: torch.cuda.max_memory_allocated(device),
                        reset_peak=lambda: torch.cuda.reset_peak_memory_stats(device))


def measure_peak(run: Callable[[], object], memory: DeviceMemory) -> int:
    """Bytes `run()` held at its peak beyond what was allocated before it."""
    memory.reset_peak()
    before = memory.allocated()
    run()
    return max(0, memory.peak() - before)


def profile_lengths(scheduler: SchedulerConfig, max_seq_len: int) -> list[int]:
    """The sequences of the largest step the scheduler can plan: its token budget
    (`max_num_batched_tokens`) cut into sequences of at most `max_seq_len` tokens, at most
    `max_num_seqs` of them."""
    tokens = min(scheduler.max_num_batched_tokens, scheduler.max_num_seqs * max_seq_len)
    full, rest = divmod(tokens, max_seq_len)
    return [max_seq_len] * full + ([rest] if rest else [])


def profile_peak(node: str, module: torch.nn.Module, spec: KVSpec, memory: DeviceMemory, *,
                 scheduler: SchedulerConfig, max_seq_len: int, page_size: int,
                 device: torch.device) -> int:
    """The activation peak of one step of `node` at the scheduler's budget: dummy prompts
    (`profile_lengths`, token id 0, default extras) sampling from their logits when the
    node has some (other outputs need a model's own inputs), in a pool of exactly their
    pages, freed after."""
    lengths = profile_lengths(scheduler, max_seq_len)
    pool = PagePool(spec, sum(pages_for(n, page_size) for n in lengths), page_size, device)
    engine = KVEngine(node, module, spec, KVCacheManager(pool), max_seq_len=max_seq_len,
                      scheduler=scheduler, device=device, prefix_caching=False)
    outputs = ("token_ids",) if "logits" in spec.outputs else ()
    for i, n in enumerate(lengths):
        engine.submit(NodeWork(f"profile-{i}", 0, GraphNode(node, outputs=outputs),
                               {"input_ids": torch.zeros(n, dtype=torch.long)}, 0,
                               SamplingParams(), walk="profile"))

    def run() -> None:
        while engine.has_work():
            for result in engine.step():
                if result.error is not None:
                    raise RuntimeError(f"the profile forward of {node} failed: "
                                       f"{result.error}") from result.error

    return measure_peak(run, memory)
