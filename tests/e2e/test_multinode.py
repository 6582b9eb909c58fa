"""Two nodes on one machine: node 0 (`mstar-serve --node-rank 0`: HTTP, conductor, rank 0)
bound to 127.0.0.1 and node 1 (`--node-rank 1 --host 127.0.0.2`: an agent and rank 1)
bound to 127.0.0.2 (Linux routes all of 127/8 to the loopback device), with testvla split
by walk across them (`testvla_pd_disaggregated`, `ranks_per_node: 1`: prefill on node 0,
the rest on node 1), control over ZMQ tcp:// and tensors over TCP. Outputs equal the in-process run, each
node runs its own rank's part, a node that does not belong is refused at the handshake
naming the difference, and a node that disappears fails its requests with a message naming
it and stops node 0 for a restart."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from placement_check import check_placement
from serving_harness import SERVE, Server, children, worker_pids
from test_serving import (  # noqa: F401 (fixtures)
    PREFILL_WALKS,
    REQUESTS,
    STUCK,
    assert_same,
    decoded,
    expected,
    single_rank_bytes,
    summary,
    wait_running,
)

from mstar.serving.launcher import EXIT_CHILD_DIED

HOSTS = ("127.0.0.1", "127.0.0.2")


def free_ports(count: int) -> int:
    """A port p with p..p+count-1 free on both loopback addresses (the join port, then
    every component's control endpoint and the tensor-parallel rendezvous)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    for host in HOSTS:
                        s = held.enter_context(socket.socket())
                        s.bind((host, port))
            except OSError:
                continue
            return first
    raise AssertionError("no free port range")


class Agent:
    """`mstar-serve --node-rank K` for K > 0: no HTTP, its ranks' workers."""

    def __init__(self, tmp: Path, name: str, *args: str):
        self.log = tmp / f"{name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVE, *args], stdout=log,
                                         stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, tiny_ckpt):
    """Node 0 and node 1 serving, after a node with another deployment config was refused
    (node 0 goes on waiting for the right one); yields (node 0, node 1, refused node)."""
    tmp = tmp_path_factory.mktemp("multinode")
    port = free_ports(12)
    common = ["--config", "testvla_pd_disaggregated", "--set", "ranks_per_node=1",
              "--model-path", str(tiny_ckpt), "--nnodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(port), "--tensor-comm-protocol", "TCP",
              "--socket-path-prefix", str(tmp / "sockets"), "--host", "127.0.0.2"]
    node0 = Server(tmp, *common, "--node-rank", "0")  # its own --host 127.0.0.1 comes last
    node1 = None
    try:
        refused = Agent(tmp, "refused", *common, "--node-rank", "1", "--set", "max_seq_len=256")
        assert refused.wait() == 1, refused.output()
        node1 = Agent(tmp, "node1", *common, "--node-rank", "1")
        node0.wait_healthy()
        assert "mstar: node 1 (127.0.0.2) runs rank(s) 1 of testvla" in node1.output()
        yield node0, node1, refused, common
    finally:
        node0.stop(signal.SIGTERM)
        if node1 is not None:
            node1.wait(timeout=60)


@pytest.mark.timeout(300)
def test_two_nodes_give_the_single_node_outputs_each_running_its_ranks(
        nodes, expected, single_rank_bytes):  # noqa: F811 (the fixtures imported above)
    node0, node1, _, _ = nodes
    for name, req in REQUESTS.items():
        response = node0.generate(req)
        assert response.status_code == 200, response.text
        assert_same(summary(decoded(response.json())), expected[name])
    # per-rank counters: rank 0 prefilled, rank 1 decoded, denoised, rolled out, planned
    check_placement(node0, "testvla_pd_disaggregated", prefill_walks=PREFILL_WALKS,
                    single_rank_bytes=single_rank_bytes)
    # ... and each rank is a process of its own node
    assert set(worker_pids(node0.proc.pid)) == {"conductor", "worker:0"}
    assert set(worker_pids(node1.proc.pid)) == {"worker:1"}
    node0.wait_idle()


@pytest.mark.timeout(120)
def test_a_node_that_does_not_belong_is_refused_at_the_handshake(nodes, tmp_path):
    node0, _, refused, common = nodes
    assert ("node 0 refused node 1: the deployment config differs from node 0's: "
            "max_seq_len (node 0: 512, node 1: 256)") in refused.output()
    assert "refused a node: the deployment config differs" in node0.output()
    twin = Agent(tmp_path, "twin", *common, "--node-rank", "1")
    assert twin.wait() == 1, twin.output()
    assert "node 0 refused node 1: node rank 1 has already joined (from 127.0.0.2)" \
        in twin.output()
    assert node0.client.get("/health").status_code == 200


@pytest.mark.timeout(180)
def test_a_lost_node_fails_its_requests_and_stops_node_0(nodes):
    """Last in the module: node 1's agent is killed (its workers die with it) while
    requests run on its rank; they fail with a 503 naming the node, `/health` says so
    while node 0 still answers, and node 0 exits with `EXIT_CHILD_DIED`, as for a dead
    child."""
    node0, node1, _, _ = nodes
    plain: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: plain.append(httpx.post(
        node0.url + "/generate", json={**STUCK, "stream": False}, timeout=60)))
    waiting.start()
    events: list[str] = []
    with httpx.stream("POST", node0.url + "/generate", timeout=60,
                      json={**STUCK, "prompt": "streamed"}) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                events.append(line)
                if len(events) == 2:
                    wait_running(node0, 2)
                    node1.proc.kill()
            elif line.startswith("data:") and events[-1:] == ["event: error"]:
                events.append(line)
    waiting.join(timeout=60)
    assert events[-2] == "event: error" and "node 1 (127.0.0.2) is gone" in events[-1], \
        events[-3:]
    assert plain[0].status_code == 503, plain[0].text
    assert "worker:1 died: node 1 (127.0.0.2) is gone: its link closed" in \
        plain[0].json()["error"]["message"]
    while node0.proc.poll() is None:
        try:
            health = node0.client.get("/health")
        except httpx.TransportError:
            break  # no longer listening: exiting
        assert health.status_code == 503, health.text
        assert "node 1 (127.0.0.2) is gone" in health.json()["detail"]
    assert node0.stop() == EXIT_CHILD_DIED, node0.output()
    assert "stopping the server (exit status 3) so that it can be started again: node 1 " \
        "(127.0.0.2) is gone" in node0.output()
    node0.assert_clean()
    assert children(node1.proc.pid) == []
