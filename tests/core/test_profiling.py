"""`--enable-nvtx`: NVTX ranges around engine steps on CUDA, a no-op without it."""

import contextlib

import pytest
import torch

from mstar.engine.profiling import step_range


def test_nvtx_is_a_no_op_without_cuda_or_when_disabled():
    assert isinstance(step_range("LLM step", False), contextlib.nullcontext)
    if not torch.cuda.is_available():
        assert isinstance(step_range("LLM step", True), contextlib.nullcontext)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvtx_range_on_cuda():
    with step_range("LLM step", True):
        torch.ones(1, device="cuda").add_(1)
