"""Shared test settings: one torch thread per test process (CPU CI has 2 cores)."""

import torch

torch.set_num_threads(1)
