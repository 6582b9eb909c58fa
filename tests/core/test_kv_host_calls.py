"""A decode step makes as many torch calls for many sequences as for few.

Why: every torch call releases the GIL, and in a served process the threads relaying
tokens to clients hold it often, so each call on the engine's host path may wait to win it
back. The per-sequence work of a step (submission, commit, sampling, outputs) is therefore
plain Python, and the torch calls are made once per step for the whole batch. Counted with
a `TorchFunctionMode` around `submit` and `step` of testvla's tiny LLM; the calls made
inside the node's forward are counted apart from those of the host path around it.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mstar.config.deployment import SchedulerConfig
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.engine.kv_engine import KVEngine
from mstar.engine.prefix_cache import page_hashes
from mstar.engine.work import NodeWork
from mstar.graph.primitives import GraphNode
from mstar.model.forward import Segment
from mstar.model.sampling import SamplingParams

#: testvla's decode invocation: explicit positions, a sampled token and the mid hidden state.
NODE = GraphNode("LLM", inputs=("input_ids", "positions"), outputs=("token_ids", "mid_hidden"))
PROMPT = list(range(40, 47))
#: Reading a tensor's metadata runs no operator and never releases the GIL.
METADATA = {"dim", "__get__", "is_contiguous", "size", "numel"}


class CountCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called inside it, by name; those of
    `module`'s forward under the name "forward:<name>"."""

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self._in_forward = False
        self._hooks = [] if module is None else [
            module.register_forward_pre_hook(lambda *_: self._forward(True)),
            module.register_forward_hook(lambda *_: self._forward(False))]

    def _forward(self, inside: bool) -> None:
        self._in_forward = inside

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        name = getattr(func, "__name__", repr(func))
        if name not in METADATA:
            self.calls[f"forward:{name}" if self._in_forward else name] += 1
        return func(*args, **(kwargs or {}))


def positions(at: int) -> torch.Tensor:
    """One text token's 3-axis positions, as a model may prepare them."""
    return torch.arange(at, at + 1).expand(3, 1)


def decode_step_calls(llm, sequences: int, given: str = "tensor") -> collections.Counter[str]:
    """Torch calls of submitting one decode token per sequence and running the step, its
    positions `given` as a tensor or as an int (a text run, as testvla's decode gives them)."""
    model, module = llm
    spec = model.kv_spec("LLM")
    e = KVEngine("LLM", module, spec, KVCacheManager(PagePool(spec, 64, 4)), max_seq_len=32,
                 scheduler=SchedulerConfig(), prefix_caching=False)

    def work(rid: str, ids: list[int], at: int) -> NodeWork:
        decode = positions(at) if given == "tensor" else at
        return NodeWork(rid, 0, NODE, {"input_ids": torch.tensor(ids),
                                       "positions": decode if len(ids) == 1 else None},
                        seed=0, sampling=SamplingParams(temperature=0.0))

    rids = [f"r{i}" for i in range(sequences)]
    for rid in rids:
        e.submit(work(rid, PROMPT, 0))
    sampled = {r.work.request_id: r.outputs["token_ids"] for r in e.step()}
    assert sampled.keys() == set(rids)
    for rid in rids:  # a first decode step: what the next ones reuse is made
        e.submit(work(rid, sampled[rid].tolist(), len(PROMPT)))
    sampled = {r.work.request_id: r.outputs["token_ids"] for r in e.step()}
    works = [work(rid, sampled[rid].tolist(), len(PROMPT) + 1) for rid in rids]
    with CountCalls(module) as counter:
        for w in works:
            e.submit(w)
        results = e.step()
    assert sorted(r.work.request_id for r in results) == rids
    assert all(r.error is None and r.outputs["token_ids"].shape == (1,) for r in results)
    return counter.calls


@pytest.mark.parametrize("given", ["tensor", "int"])
def test_a_decode_step_makes_as_many_torch_calls_for_many_sequences_as_for_few(llm, given):
    few, many = decode_step_calls(llm, 2, given), decode_step_calls(llm, 7, given)
    assert sum(few.values()) > 0  # the step was counted (the forward at least)
    assert many == few, {name: (few[name], many[name]) for name in few.keys() | many.keys()
                         if few[name] != many[name]}


def test_a_decode_steps_host_path_makes_few_torch_calls(llm):
    """Outside the forward: the new position's run, the attention's slot table and mask,
    the batch's ids and positions, their host copies, the outputs' split and the sampling:
    20 calls (a 7-sequence step made 45 before one-token runs were made once per position
    and the slot table came from one page-table lookup)."""
    calls = decode_step_calls(llm, 7, "int")
    host = {name: n for name, n in calls.items() if not name.startswith("forward:")}
    assert sum(host.values()) <= 20, host


def hashing_calls(tokens: int) -> collections.Counter[str]:
    """Torch calls of hashing the pages of a `tokens`-token prompt with a bfloat16 extra."""
    ids, pos = torch.arange(tokens), torch.arange(tokens).expand(3, -1)
    rows = {"media": torch.ones(tokens, 4, dtype=torch.bfloat16)}
    with CountCalls() as counter:
        hashes = page_hashes(ids, pos, [Segment(tokens, "causal")], rows, {}, page_size=4,
                             salt="LLM")
    assert len(hashes) == tokens // 4
    return counter.calls


def test_hashing_a_prompts_pages_makes_as_many_torch_calls_for_many_pages_as_for_few():
    """A new request's prompt is hashed for the prefix cache by the worker, between the
    decode steps of the others."""
    assert hashing_calls(8) == hashing_calls(64)
