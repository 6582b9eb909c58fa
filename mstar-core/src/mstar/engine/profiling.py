"""NVTX ranges around engine steps (`--enable-nvtx`), for Nsight timelines on CUDA. On a
machine without CUDA they are a documented no-op."""

from __future__ import annotations

import contextlib

import torch


def step_range(name: str, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()
