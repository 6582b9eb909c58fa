"""Tensor transports: put -> get -> free latency and bandwidth of SHM, TCP and RDMA
(Mooncake; over its TCP protocol where the machine has no RDMA devices, "Mooncake-tcp")
against an in-memory `copy_` into a preallocated tensor. RDMA is left out where Mooncake is
not installed (pip install 'mstar-core[rdma]').

For each size (float32) and transport it times, median of N rounds:
- cross-process (the honest figure): the sender puts, sends the msgspec-encoded handle to a
  receiver process over a pipe; the receiver gets it, reads one value per 4 KiB page (so
  lazily mapped pages count), frees it and answers; the sender's clock stops at the answer.
  The pipe round trip alone is printed too.
- in-process: the same with sender and receiver instances in this process.
Bandwidth is the tensor's bytes over the latency; "of copy_" compares with the baseline.
`clone` (a copy into new memory) is printed too: a receiver needs memory of its own for
every tensor, and where fresh pages are expensive (VMs) it bounds what a transport can do.

    python benchmarks/bench_transport.py            # ~30 s
    python benchmarks/bench_transport.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection

import msgspec
import torch

from mstar.communication.messages import Handle
from mstar.communication.mooncake import engine_protocol
from mstar.communication.shm import cleanup_deployment
from mstar.communication.tensor_bytes import INLINE_MAX
from mstar.plugins import transport_registry
from mstar.plugins.registry import import_string

SIZES = {"4 KiB": 4 << 10, "1 MiB": 1 << 20, "64 MiB": 64 << 20}
ROUNDS = {"4 KiB": 400, "1 MiB": 100, "64 MiB": 15}
PROTOCOLS = ("SHM", "TCP") + (("RDMA",) if importlib.util.find_spec("mooncake") else ())


def _transport(protocol: str, address: str, deployment_id: str):
    cls = import_string(transport_registry().get(protocol).transport_class)
    return cls(address, deployment_id=deployment_id)


def _touch(tensor: torch.Tensor) -> float:
    """Read one float32 per 4 KiB page: what a consumer's first pass at least costs."""
    return float(tensor.reshape(-1)[::1024].sum())


def _receiver(conn: Connection, protocol: str, deployment_id: str) -> None:
    """The receiving process: get, touch, free each handle it is sent; b"" ends it."""
    torch.set_num_threads(1)
    transport = _transport(protocol, "worker:1", deployment_id) if protocol else None
    decoder = msgspec.msgpack.Decoder(Handle)
    while data := conn.recv_bytes():
        if transport is not None:
            handle = decoder.decode(data)
            _touch(transport.get(handle))
            transport.free(handle)
        conn.send_bytes(b"k")
    if transport is not None:
        transport.close()


def _median_seconds(step: Callable[[], object], rounds: int) -> float:
    for _ in range(max(2, rounds // 10)):  # warm-up
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cross_process(protocol: str | None, tensor: torch.Tensor, rounds: int,
                   deployment_id: str) -> float:
    """Median put -> handle over a pipe -> get, touch, free in the child -> answer.
    `protocol` None times the pipe round trip alone."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_receiver, args=(there, protocol or "", deployment_id))
    child.start()
    sender = _transport(protocol, "worker:0", deployment_id) if protocol else None
    encoder = msgspec.msgpack.Encoder()

    def step() -> None:
        data = b"h" if sender is None else encoder.encode(
            sender.put(tensor, "bench", owner="worker:1"))
        here.send_bytes(data)
        here.recv_bytes()

    try:
        return _median_seconds(step, rounds)
    finally:
        here.send_bytes(b"")
        child.join(timeout=30)
        if sender is not None:
            left = sender.live_handles()
            sender.close()
            assert left == 0, f"{protocol}: {left} items left after the run"


def _in_process(protocol: str, tensor: torch.Tensor, rounds: int, deployment_id: str) -> float:
    sender = _transport(protocol, "worker:0", deployment_id)
    receiver = _transport(protocol, "worker:1", deployment_id)

    def step() -> None:
        handle = sender.put(tensor, "bench", owner="worker:1")
        _touch(receiver.get(handle))
        receiver.free(handle)

    try:
        return _median_seconds(step, rounds)
    finally:
        sender.close()
        receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    deployment_id = uuid.uuid4().hex[:8]
    print(f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"1 torch thread per process, load {os.getloadavg()[0]:.2f}")
    pipe = _cross_process(None, torch.empty(0), 200, deployment_id)
    print(f"handle round trip over the pipe alone: {pipe * 1e6:.0f} us (part of every "
          f"cross-process figure)\n")
    names = {"RDMA": f"Mooncake-{engine_protocol()}"}
    print(f"4 KiB tensors travel inside their handle (up to {INLINE_MAX >> 10} KiB do): their "
          "rows time the handle's trip, not the transport's data path.")
    print(f"{'size':>7} {'transport':<28} {'latency us':>11} {'GB/s':>7} {'of copy_':>9}")
    shm_ratio = None
    for label, nbytes in SIZES.items():
        rounds = max(5, ROUNDS[label] // (5 if args.quick else 1))
        tensor = torch.randn(nbytes // 4)
        target = torch.empty_like(tensor)
        baseline = _median_seconds(lambda t=tensor, d=target: d.copy_(t), rounds)
        rows = [("copy_ (preallocated)", baseline),
                ("clone (new memory)", _median_seconds(tensor.clone, rounds))]
        for protocol in PROTOCOLS:
            name = names.get(protocol, protocol)
            rows.append((f"{name} cross-process",
                         _cross_process(protocol, tensor, rounds, deployment_id)))
            rows.append((f"{name} in-process",
                         _in_process(protocol, tensor, rounds, deployment_id)))
        for name, seconds in rows:
            print(f"{label:>7} {name:<28} {seconds * 1e6:11.1f} {nbytes / seconds / 1e9:7.2f} "
                  f"{baseline / seconds:9.1%}")
            if label == "64 MiB" and name == "SHM cross-process":
                shm_ratio = baseline / seconds
        print()
    if shm_ratio is not None:
        verdict = "met" if shm_ratio >= 0.5 else "NOT met"
        print(f"SHM cross-process / copy_ bandwidth at 64 MiB: {shm_ratio:.2f}  "
              f"goal >= 0.50: {verdict}")
    left = cleanup_deployment(deployment_id)
    print(f"SHM segments left behind: {left}")


if __name__ == "__main__":
    main()
