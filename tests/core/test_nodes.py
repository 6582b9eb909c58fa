"""The node link (`mstar.serving.nodes`) over real sockets: who may join node 0 (refusals
name the difference), the welcome, a worker death reported by a node, a node lost when its
link closes or falls silent, the stop; and the config's map of ranks to nodes."""

from __future__ import annotations

import queue
import socket

import pytest

from mstar.config import DeploymentConfig, NodeHosts
from mstar.config.nodes import node_hosts, node_ranks
from mstar.config.validate import ConfigError
from mstar.serving import nodes
from mstar.serving.nodes import (
    ChildDied,
    Heartbeat,
    Hello,
    NodeLinks,
    Refused,
    Stop,
    Welcome,
    identity,
    receive,
    refusal,
    send,
)

CONFIG = {"model": "testvla", "max_seq_len": 512}
IDENT, DIGEST = identity(CONFIG, model="testvla", preset="tiny", load_format="dummy")


def hello(node_rank: int = 1, nnodes: int = 2, config=CONFIG, preset="tiny") -> Hello:
    ident, digest = identity(config, model="testvla", preset=preset, load_format="dummy")
    return Hello(node_rank, nnodes, "127.0.0.2", ident, digest)


@pytest.mark.parametrize("joining, joined, reason", [
    (hello(nnodes=3), {}, "--nnodes differs: node 0 runs 2 node(s), node 1 says 3"),
    (hello(node_rank=0), {}, "--node-rank 0 cannot join: nodes 1..1 join node 0 (--nnodes 2)"),
    (hello(preset="small"), {}, "preset differs: node 0 has 'tiny', node 1 has 'small'"),
    (hello(config={**CONFIG, "max_seq_len": 256}), {},
     "the deployment config differs from node 0's: max_seq_len (node 0: 512, node 1: 256)"),
    (hello(), {1: "10.0.0.2"}, "node rank 1 has already joined (from 10.0.0.2)"),
    (hello(), {}, None),
])
def test_refusals_name_the_difference(joining, joined, reason):
    assert refusal(joining, nnodes=2, identity=IDENT, digest=DIGEST, joined=joined) == reason


def connect(links: NodeLinks) -> tuple[socket.socket, object]:
    link = socket.create_connection(("127.0.0.1", links.port), timeout=10)
    return link, link.makefile("rb")


def test_a_node_joins_reports_a_death_and_is_lost_when_its_link_closes():
    lost, died = queue.Queue(), queue.Queue()
    links = NodeLinks("127.0.0.1", 0, nnodes=2, identity=IDENT, digest=DIGEST,
                      on_lost=lambda k, m: lost.put((k, m)),
                      on_child_died=lambda a, m: died.put((a, m)))
    try:
        wrong, wrong_reader = connect(links)
        send(wrong, hello(config={**CONFIG, "max_seq_len": 8}))
        assert isinstance(receive(wrong_reader), Refused)
        assert receive(wrong_reader) is None  # refused: node 0 closed the link
        agent, reader = connect(links)
        send(agent, hello())
        assert links.wait_joined(10, lambda: False) == []
        assert links.hosts() == {1: "127.0.0.2"}
        welcome = Welcome("d1", "TCP", [1], {"worker:1": "tcp://127.0.0.2:7001"}, 7002,
                          "127.0.0.1")
        links.welcome(1, welcome)
        assert receive(reader) == welcome
        twin, twin_reader = connect(links)
        send(twin, hello())
        assert receive(twin_reader) == Refused(
            "node rank 1 has already joined (from 127.0.0.2)")
        send(agent, Heartbeat())
        send(agent, ChildDied("worker:1", "worker:1 on node 1 exited with code -9"))
        assert died.get(timeout=10) == ("worker:1", "worker:1 on node 1 exited with code -9")
        reader.close()
        agent.close()
        assert lost.get(timeout=10) == (1, "node 1 (127.0.0.2) is gone: its link closed")
    finally:
        links.stop(0)


def joined_node(links: NodeLinks) -> tuple[socket.socket, object]:
    """Node 1 of two, joined and welcomed."""
    agent, reader = connect(links)
    send(agent, hello())
    assert links.wait_joined(10, lambda: False) == []
    links.welcome(1, Welcome("d1", "TCP", [1], {}, 0, "127.0.0.1"))
    assert isinstance(receive(reader), Welcome)
    return agent, reader


def test_a_silent_node_is_lost(monkeypatch):
    monkeypatch.setattr(nodes, "HEARTBEAT_TIMEOUT_S", 1.0)
    lost = queue.Queue()
    links = NodeLinks("127.0.0.1", 0, nnodes=2, identity=IDENT, digest=DIGEST,
                      on_lost=lambda k, m: lost.put((k, m)), on_child_died=print)
    try:
        agent, reader = joined_node(links)
        assert lost.get(timeout=10) == (1, "node 1 (127.0.0.2) is gone: it sent no "
                                           "heartbeat for 1 s")
    finally:
        links.stop(0)


def test_stop_reaches_the_nodes_and_closes_their_links():
    links = NodeLinks("127.0.0.1", 0, nnodes=2, identity=IDENT, digest=DIGEST,
                      on_lost=print, on_child_died=print)
    agent, reader = joined_node(links)
    links.stop(3)
    assert receive(reader) == Stop(3)
    assert receive(reader) is None


def test_ranks_per_node_and_explicit_nodes_map_every_rank_once():
    config = DeploymentConfig(model="m", ranks_per_node=2)
    assert node_ranks(config, [0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert node_hosts(config, 2, "10.0.0.1") == ["10.0.0.1", None]
    with pytest.raises(ConfigError, match="it needs 3 nodes"):
        node_ranks(config, range(5), 2)
    with pytest.raises(ConfigError, match=r"node\(s\) 1 of 2 \(--nnodes\) would run no rank"):
        node_ranks(config, [0, 1], 2)
    listed = DeploymentConfig(model="m", nodes=[NodeHosts(host="a", ranks=[1]),
                                                NodeHosts(host="b", ranks=[0])])
    assert node_ranks(listed, [0, 1], 2) == [[1], [0]]
    assert node_hosts(listed, 2, "x") == ["a", "b"]
    with pytest.raises(ConfigError, match=r"nodes: 2 node\(s\) listed, but --nnodes is 3"):
        node_ranks(listed, [0, 1], 3)
    with pytest.raises(ConfigError, match=r"nodes: 1 rank\(s\) \(2\) of the placement on no"):
        node_ranks(listed, [0, 1, 2], 2)
    assert node_ranks(DeploymentConfig(model="m"), [0, 1], 1) == [[0, 1]]
