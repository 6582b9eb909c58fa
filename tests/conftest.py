"""Shared test settings: one torch thread per test process (CPU CI has 2 cores), and
servers whose RDMA transports take any free Mooncake port (several servers run at once;
`--mooncake-port`'s fixed default would make them collide)."""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("MSTAR_MOONCAKE_PORT", "0")
