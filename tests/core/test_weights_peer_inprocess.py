"""Peer weights in one process (`mstar.weights.peer`): a node's module loads bit for bit
from a running peer's `WeightService` over the real SHM and TCP transports, with its
checkpoint gone; a tensor whose bytes no longer match its checksum, a peer of other shapes
and no peer at all fall back to the checkpoint."""

from __future__ import annotations

import logging
import uuid

import pytest
import torch

from mstar.communication.shm import ShmTransport
from mstar.communication.tcp import TcpTransport
from mstar.config.validate import NodePlacement
from mstar.plugins import model_registry
from mstar.runtime.builder import LoadOptions, build_module, make_model, weight_key
from mstar.weights import WeightSourceError
from mstar.weights.peer import PeerRegistry, WeightService, registry_dir

NODE = "LLM"
CPU = torch.device("cpu")
WHERE = NodePlacement(module=NODE, ranks=(0,))


@pytest.fixture
def ckpt(tmp_path):
    from mstar_testvla.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path / "ckpt", preset="tiny")


def module_of(path, cache, *, peers: bool, preset: str = "tiny") -> torch.nn.Module:
    spec = model_registry().get("testvla")
    options = LoadOptions.of(spec, model_path=str(path), cache_dir=str(cache),
                             weights_from_peers=peers)
    model = make_model(spec, None, preset=preset, options=options)
    return build_module(model, NODE, WHERE, 0, options, CPU)


@pytest.fixture(params=["SHM", "TCP"])
def peer(request, ckpt, tmp_path):
    """A module loaded from disk and served by a `WeightService` over the transport."""
    kind = {"SHM": ShmTransport, "TCP": TcpTransport}[request.param]
    transport = kind("worker:0", deployment_id=f"p{uuid.uuid4().hex[:7]}")
    cache = tmp_path / "cache"
    service = WeightService(transport, protocol=request.param,
                            deployment_id=transport.deployment_id, host="127.0.0.1",
                            registry=PeerRegistry(registry_dir(str(cache))))
    served = module_of(ckpt, cache, peers=False)
    spec = model_registry().get("testvla")
    options = LoadOptions.of(spec, model_path=str(ckpt), cache_dir=str(cache))
    model = make_model(spec, None, preset="tiny", options=options)
    service.publish(weight_key(model, NODE, WHERE, 0, options, CPU), served)
    yield served, cache
    service.close()
    assert transport.live_handles() == 0  # every streamed tensor was freed
    transport.close()


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loads_from_a_peer_without_the_checkpoint(peer, ckpt, caplog):
    served, cache = peer
    ckpt.rename(ckpt.with_name("moved"))
    with caplog.at_level(logging.INFO, "mstar.weights.peer"):
        received = module_of(ckpt, cache, peers=True)
    assert same(received, served)
    assert "bytes from peer" in caplog.text


def test_a_corrupted_tensor_falls_back_to_the_checkpoint(peer, ckpt, caplog):
    served, cache = peer
    assert same(module_of(ckpt, cache, peers=True), served)  # checksums taken
    with torch.no_grad():
        next(served.parameters()).add_(1.0)  # the peer's memory changed since
    with caplog.at_level(logging.WARNING, "mstar.weights.peer"):
        received = module_of(ckpt, cache, peers=True)
    assert "checksum mismatch" in caplog.text
    assert same(received, module_of(ckpt, cache, peers=False))
    assert not same(received, served)


def test_a_peer_of_other_shapes_falls_back(peer, ckpt, tmp_path, caplog):
    from mstar_testvla.checkpoint import write_tiny_checkpoint

    _, cache = peer
    other = write_tiny_checkpoint(tmp_path / "small", preset="small")
    other.rename(tmp_path / "tmp")
    ckpt.rename(tmp_path / "ckpt-old")
    (tmp_path / "tmp").rename(ckpt)  # same path, another model size
    with caplog.at_level(logging.WARNING, "mstar.weights.peer"):
        received = module_of(ckpt, cache, peers=True, preset="small")
    assert "holds other tensors" in caplog.text
    assert same(received, module_of(ckpt, cache, peers=False, preset="small"))


def test_no_peer_reads_the_checkpoint(ckpt, tmp_path, caplog):
    cache = tmp_path / "cache"
    assert same(module_of(ckpt, cache, peers=True), module_of(ckpt, cache, peers=False))
    unusable = tmp_path / "a-file"
    unusable.write_text("")  # no registry can live under it
    with caplog.at_level(logging.WARNING, "mstar.weights.peer"):
        assert same(module_of(ckpt, unusable, peers=True), module_of(ckpt, cache, peers=False))
    assert "the peer registry under" in caplog.text
    ckpt.rename(ckpt.with_name("moved"))
    with pytest.raises(WeightSourceError, match="does not exist"):
        module_of(ckpt, cache, peers=True)
