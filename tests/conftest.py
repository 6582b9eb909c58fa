"""Shared test settings: one torch thread per test process (CPU CI has 2 cores), and
servers whose RDMA transports take any free Mooncake port (several servers run at once;
`--mooncake-port`'s fixed default would make them collide); `hub`: a local hub for the
download tests (`tests/hub_server.py`)."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MSTAR_MOONCAKE_PORT", "0")


@pytest.fixture
def hub(monkeypatch):
    """A local hub (`tests/hub_server.py`) that huggingface_hub in this process and in
    subprocesses given `hub_env(hub)` talks to instead of huggingface.co."""
    from hub_server import HubServer, point_hub_at

    with HubServer() as server:
        point_hub_at(server, monkeypatch)
        yield server
