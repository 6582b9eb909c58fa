"""Pi0.5 served to many robots: latency per action chunk at 1 client and throughput
(chunks/s) at 1, 8 and 32 concurrent clients, on the `small` preset (dummy weights),
against a sequential loop over the reference in the same run, as ratios.

The reference is our model called one request at a time in process (`mstar.load`, no
HTTP): a server that serves one robot at a time, as openpi's does (lerobot is not in the
main environment). The served runs are `mstar-serve --config pi05_tiny --preset small`,
each client a thread sending observations back to back: over HTTP (`/generate`, images as
tensors), then over openpi's websocket protocol (`--policy-ws-port`, DROID keys,
msgpack-numpy). Every request is one robot's observation: two 224x224 uint8 cameras, an
instruction, an 8-wide state, 8 actions per step back; each carries pixels of its own (no
encoder-cache hits) and its own seed.

Each row is the best of `--repeat` rounds (the machine is shared: load only slows a run).

    python benchmarks/bench_pi05.py            # about 5 minutes on 2 cores
    python benchmarks/bench_pi05.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from bench_serving import free_port, launch
from websockets.sync.client import connect

import mstar
from mstar import events
from mstar_pi05.routes import MsgpackNumpy

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb")
PROMPT = "put the marker in the cup"


@dataclass
class Result:
    system: str
    clients: int
    latencies: list[float]  # seconds per chunk
    wall: float

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall

    def row(self) -> str:
        ms = [1000 * s for s in self.latencies]
        return (f"{self.system:<36} {self.clients:>7} {len(ms):>6} {self.wall:>8.2f} "
                f"{self.rate:>9.2f} {statistics.mean(ms):>9.1f} {statistics.median(ms):>9.1f}")


HEADER = (f"{'system':<36} {'clients':>7} {'chunks':>6} {'seconds':>8} {'chunks/s':>9} "
          f"{'mean ms':>9} {'p50 ms':>9}")


def observation(robot: int, k: int) -> dict:
    """Robot `robot`'s k-th observation, with numpy images (in process)."""
    rng = np.random.RandomState(10_000 * robot + k)
    return {"images": {cam: rng.randint(0, 256, (224, 224, 3), dtype=np.uint8)
                       for cam in CAMERAS},
            "prompt": PROMPT, "state": rng.uniform(-1, 1, 8).tolist(), "action_dim": 8,
            "seed": 10_000 * robot + k}


def as_json(obs: dict) -> dict:
    """`observation` as a `/generate` JSON body (images as tensors)."""
    def tensor(a: np.ndarray) -> dict:
        return {"dtype": "uint8", "shape": list(a.shape),
                "data": base64.b64encode(a.tobytes()).decode()}

    return {**obs, "images": {cam: tensor(img) for cam, img in obs["images"].items()}}


def best(rounds: list[Result]) -> Result:
    """The fastest round: the machine is shared, and load only ever slows a run."""
    return max(rounds, key=lambda r: r.rate)


def reference(args: argparse.Namespace) -> Result:
    """The model one request at a time, in process (best of `--repeat` rounds)."""
    with mstar.load("pi05", config="pi05_tiny", preset=args.preset,
                    load_format="dummy") as model:
        list(model.generate(observation(999, 0)))  # warm-up
        bodies = [observation(0, k) for k in range(args.reference_chunks)]
        rounds = []
        for _ in range(args.repeat):
            latencies = []
            wall = time.perf_counter()
            for obs in bodies:
                start = time.perf_counter()
                evs = list(model.generate(obs))
                latencies.append(time.perf_counter() - start)
                assert any(isinstance(e, events.NamedTensor) for e in evs), evs[-1]
            rounds.append(Result("reference: sequential, in process", 1, latencies,
                                 time.perf_counter() - wall))
        return best(rounds)


def http_robot(url: str, observations: list[dict]) -> list[float]:
    """One robot posting its observations to `/generate` back to back: seconds each."""
    bodies = [as_json(obs) for obs in observations]
    out = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for body in bodies:
            start = time.perf_counter()
            response = client.post("/generate", json=body)
            out.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
            assert response.json()["outputs"]["actions"]["shape"][1] == 8
    return out


def openpi_robot(url: str, observations: list[dict]) -> list[float]:
    """One robot on the openpi websocket (msgpack-numpy frames, as openpi's client packs
    them; DROID keys: 8 actions a step back)."""
    codec = MsgpackNumpy()  # the same framing both ways
    frames = [codec.encode({
        "observation/exterior_image_1_left": obs["images"][CAMERAS[0]],
        "observation/wrist_image_left": obs["images"][CAMERAS[1]],
        "observation/joint_position": np.asarray(obs["state"][:7]),
        "observation/gripper_position": np.asarray(obs["state"][7:]),
        "prompt": obs["prompt"], "seed": obs["seed"]}) for obs in observations]
    out = []
    with connect(url, max_size=None, open_timeout=60) as ws:
        ws.recv(timeout=60)  # the metadata
        for frame in frames:
            start = time.perf_counter()
            ws.send(frame)
            answer = codec.decode(ws.recv(timeout=600))
            out.append(time.perf_counter() - start)
            assert answer["actions"].shape[1] == 8, answer
    return out


def robots(system: str, robot: Callable[[str, list[dict]], list[float]], url: str,
           clients: int, chunks: int) -> Result:
    """`clients` threads, each a robot sending `chunks` observations back to back."""
    mine = [[observation(r, k) for k in range(chunks)] for r in range(clients)]
    wall = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [s for run in pool.map(lambda o: robot(url, o), mine) for s in run]
    return Result(system, clients, latencies, time.perf_counter() - wall)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--chunks", type=int, default=64,
                        help="chunks per level (split among its clients, at least 2 each)")
    parser.add_argument("--reference-chunks", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="rounds per row (the best "
                        "is shown)")
    parser.add_argument("--quick", action="store_true", help="16 chunks per level, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.chunks, args.reference_chunks, args.repeat = 16, 16, 1
    torch_threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; preset "
          f"{args.preset!r}; torch threads {torch_threads}", flush=True)

    ref = reference(args)
    results: dict[str, list[Result]] = {}
    ws_port = free_port()
    with tempfile.TemporaryDirectory() as tmp, launch(
            ["--config", "pi05_tiny", "--preset", args.preset, "--load-format", "dummy",
             "--log-level", "WARNING", "--policy-ws-port", str(ws_port)], Path(tmp)) as server:
        protocols = {"mstar served, HTTP /generate": (http_robot, server.url),
                     "mstar served, openpi websocket": (openpi_robot,
                                                        f"ws://127.0.0.1:{ws_port}")}
        for system, (robot, url) in protocols.items():
            robots(system, robot, url, 1, 2)  # warm-up
            for clients in args.levels:
                results.setdefault(system, []).append(best([
                    robots(system, robot, url, clients, max(2, args.chunks // clients))
                    for _ in range(args.repeat)]))
                print(results[system][-1].row(), flush=True)

    print(f"\n{HEADER}\n{ref.row()}")
    for rows in results.values():
        for result in rows:
            print(result.row())
    for system, rows in results.items():
        one = next((r for r in rows if r.clients == 1), None)
        print(f"\n{system}: chunks/s over the sequential reference"
              f"{' | over its own 1 client (what batching adds)' if one else ''}")
        for result in rows:
            print(f"  @{result.clients:<3} {result.rate / ref.rate:6.2f}" +
                  (f" | {result.rate / one.rate:6.2f}" if one else ""))
        if one is not None:
            print(f"  latency per chunk at 1 client: {statistics.mean(one.latencies) * 1000:.1f}"
                  f" ms, reference {statistics.mean(ref.latencies) * 1000:.1f} ms (ratio "
                  f"{statistics.mean(one.latencies) / statistics.mean(ref.latencies):.2f})")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
