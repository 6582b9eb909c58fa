"""Peer-to-peer weights served (`--weights-from-peers`, `mstar.weights.peer`): a second
deployment of the same checkpoint starts from the first one's running workers with the
checkpoint directory gone and answers alike, over SHM and TCP; a peer killed in the middle
of a stream gives way to the checkpoint."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import image
from serving_harness import Server

from mstar.config.validate import NodePlacement
from mstar.plugins import model_registry
from mstar.runtime.builder import LoadOptions, build_module, make_model, weight_key
from mstar.weights.peer import PeerError, PeerRegistry, registry_dir, stream_from_peer

TEXT = {"prompt": "the picture <image> shows", "image": image(21), "max_tokens": 8,
        "temperature": 0}
ACT = {"prompt": "<image>stack the cups", "image": image(22), "mode": "act", "num_steps": 3,
       "seed": 5}
NODES = ("LLM", "vision_encoder")


def serve(tmp_path, ckpt, cache, protocol: str) -> Server:
    return Server(tmp_path, "--config", "testvla_node_split", "--preset", "tiny",
                  "--model-path", str(ckpt), "--cache-dir", str(cache),
                  "--weights-from-peers", "--tensor-comm-protocol", protocol)


def answers(server: Server) -> list[dict]:
    out = []
    for body in (TEXT, ACT):
        response = server.generate(body)
        assert response.status_code == 200, response.text
        out.append([e for e in response.json()["events"] if e["event"] != "finished"])
    return out


@pytest.mark.parametrize("protocol", ["SHM", "TCP"])
def test_second_deployment_loads_from_the_first(tmp_path, tiny_ckpt, protocol):
    ckpt, cache = tmp_path / "ckpt", tmp_path / "cache"
    ckpt.mkdir()
    for f in tiny_ckpt.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    first = serve(tmp_path, ckpt, cache, protocol)
    second = None
    try:
        first.wait_healthy()
        expected = answers(first)
        ckpt.rename(tmp_path / "moved")  # the second can only start from the first
        second = serve(tmp_path, ckpt, cache, protocol)
        second.wait_healthy()
        assert answers(second) == expected
        log = second.output()
        assert all(f"weights of node {n} (tp 0/1): " in log for n in NODES), log
    finally:
        for server in (second, first):
            if server is not None:
                assert server.stop() == 0, server.output()
                server.assert_clean()
    registry = PeerRegistry(registry_dir(str(cache)))
    with registry._db() as db:  # every worker left the registry when it stopped
        assert db.execute("SELECT count(*) FROM peers").fetchone() == (0,)


def test_a_peer_killed_mid_stream_falls_back_to_the_checkpoint(tmp_path, tiny_ckpt, caplog):
    cache = tmp_path / "cache"
    first = serve(tmp_path, tiny_ckpt, cache, "SHM")
    try:
        first.wait_healthy()
        spec = model_registry().get("testvla")
        options = LoadOptions.of(spec, model_path=str(tiny_ckpt), cache_dir=str(cache),
                                 weights_from_peers=True)
        model = make_model(spec, None, preset="tiny", options=options)
        where = NodePlacement("LLM", (0,))
        key = weight_key(model, "LLM", where, 0, options, torch.device("cpu"))
        registry = PeerRegistry(registry_dir(str(cache)))
        [(endpoint, host, pid)] = registry.find(key)
        with torch.device("meta"):
            shapes = model.build_submodule("LLM", _context())
        stream = stream_from_peer(shapes.to_empty(device="cpu"), key, endpoint, host, pid,
                                  batch_bytes=1)
        next(stream)  # one tensor arrived, then the peer dies
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(PeerError, match="died"):
            list(stream)
        assert registry.find(key) == []  # gone from the registry too
        received = build_module(model, "LLM", where, 0, options, torch.device("cpu"))
        disk = build_module(model, "LLM", where, 0,
                            LoadOptions.of(spec, model_path=str(tiny_ckpt)),
                            torch.device("cpu"))
        assert all(torch.equal(a, b) for a, b in
                   zip(received.state_dict().values(), disk.state_dict().values(), strict=True))
    finally:
        first.stop()  # it exits on the lost worker (status 3); only what it leaves matters
    first.assert_clean()


def _context():
    from mstar.model.contract import BuildContext

    return BuildContext(node="LLM", device=torch.device("cpu"), dtype=torch.float32,
                        tp_rank=0, tp_size=1, tp_group=None)
