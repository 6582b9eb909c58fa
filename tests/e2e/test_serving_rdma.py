"""Two nodes over the RDMA transport (Mooncake, over its TCP protocol here): testvla split by
walk (`testvla_pd_disaggregated`, `ranks_per_node: 1`) with node 0 on 127.0.0.1 and node 1
on 127.0.0.2, as in test_multinode.py. The prefill rank's K/V pages and the frontend's image
reach their readers through Mooncake, the outputs equal the in-process run's (as SHM's do,
test_serving.py), and each child's transfer engine listens on the port its node's
`--mooncake-port` gave it."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket

import pytest
import torch
from conftest import collect, image, tokens
from serving_harness import Server
from test_multinode import Agent, free_ports
from test_serving import decoded

import mstar
from mstar.communication.mooncake import port_free

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mooncake") is None,
                                reason="Mooncake is not installed")

#: An 80x80 image: its pixels (75 KiB) and the prompt's K/V pages (400 image tokens) are
#: larger than what travels inline in a handle, so they go through Mooncake.
BIG = {"prompt": "the picture <image> shows", "image": image(31, 80, 80), "max_tokens": 8,
       "temperature": 0, "logprobs": 2}
SMALL = {"prompt": "the picture <image> shows", "image": image(32), "max_tokens": 8,
         "temperature": 0, "logprobs": 2}


def summary(evs: list) -> tuple[list[int], torch.Tensor]:
    logprobs = [lp.logprob for e in evs if isinstance(e, mstar.events.TextDelta)
                for lp in (e.logprobs or [])]
    return tokens(evs), torch.tensor(logprobs)


def listening(host: str, port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((host, port)) == 0


@pytest.mark.timeout(240)
def test_two_nodes_over_rdma_give_the_in_process_outputs(tmp_path, tiny_ckpt):
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=512) as deployment:
        expected = {name: summary(collect(deployment, req))
                    for name, req in (("big", BIG), ("small", SMALL))}
    # six free ports below 32768 (Mooncake's limit): node 0's data worker and rank, then
    # node 1's rank, two each
    first = next(p for p in range(20000 + os.getpid() % 10000, 32760)
                 if all(port_free(q) for q in range(p, p + 6)))
    common = ["--config", "testvla_pd_disaggregated", "--set", "ranks_per_node=1",
              "--model-path", str(tiny_ckpt), "--nnodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(free_ports(12)), "--tensor-comm-protocol", "RDMA",
              "--socket-path-prefix", str(tmp_path / "sockets"), "--host", "127.0.0.2"]
    node0 = Server(tmp_path, *common, "--node-rank", "0", "--mooncake-port", str(first))
    node1 = Agent(tmp_path, "node1", *common, "--node-rank", "1",
                  "--mooncake-port", str(first + 4))
    try:
        node0.wait_healthy()
        for name, req in (("big", BIG), ("small", SMALL)):
            response = node0.generate(req)
            assert response.status_code == 200, response.text
            got = summary(decoded(response.json()))
            assert got[0] == expected[name][0]
            torch.testing.assert_close(got[1], expected[name][1], atol=1e-4, rtol=1e-4)
        # each child listens on its port (handshake) or the next one (Mooncake TCP data)
        for host, port in (("127.0.0.1", first), ("127.0.0.1", first + 2),
                           ("127.0.0.2", first + 4)):
            assert listening(host, port) or listening(host, port + 1), (host, port)
    finally:
        assert node0.stop(signal.SIGTERM) == 0, node0.output()
        assert node1.wait(timeout=60) == 0, node1.output()
    node0.assert_clean()
