"""Peer-to-peer weights: the time to ready of a second deployment that reads its checkpoint
from disk versus one that streams the weights from a running peer (`--weights-from-peers`),
side by side in one run.

Why: a new replica (or a restarted worker) of a model that already runs somewhere need
not touch the disk or the hub. Setup: a testvla checkpoint of `--preset` (default
`small`) is written once; a first deployment (`--config`, default `testvla_single`) runs
with `--weights-from-peers` and stays up. Each round then starts, times and stops a second
deployment twice, alternating the order: `disk` (no flag: reads the checkpoint, which the
first one's start left in the page cache, so this is the fast case of a disk) and `peer`
(the flag: the weights come from the first deployment's workers over the tensor
transport, checksums verified). Time to ready is from spawning `mstar-serve` to `/health`
answering 200 (process start, imports, model build, weights, KV allocation); the peer
side also reports the bytes and seconds its workers logged for the streams. Last, with
the peer still up, this process builds the LLM node (most of the weights) both ways,
`build_module` alone, to show the load itself without the process start around it.

    python benchmarks/bench_weights_peer.py                  # ~1 minute on 2 cores
    python benchmarks/bench_weights_peer.py --protocol TCP --rounds 1
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from bench_serving import launch

from mstar_testvla.checkpoint import write_tiny_checkpoint

STREAM = re.compile(r"weights of node (\S+) \(tp \d+/\d+\): (\d+) bytes from peer .* in "
                    r"([\d.]+) s")


def ready_seconds(options: Sequence[str], tmp: Path) -> tuple[float, list[tuple[str, int, float]]]:
    """Seconds from spawning a deployment to healthy, and the peer streams its log names
    (node, bytes, seconds)."""
    started = time.perf_counter()
    with launch(options, tmp) as server:
        ready = time.perf_counter() - started
        port = server.url.rsplit(":", 1)[1]
    log = (tmp / f"server-{port}.log").read_text()
    return ready, [(n, int(b), float(s)) for n, b, s in STREAM.findall(log)]


def llm_load_seconds(ckpt: Path, cache: Path, preset: str, peers: bool) -> float:
    """Seconds `build_module` takes for the LLM node, from disk or from the peer."""
    from mstar.config.validate import NodePlacement
    from mstar.plugins import model_registry
    from mstar.runtime.builder import LoadOptions, build_module, make_model

    spec = model_registry().get("testvla")
    options = LoadOptions.of(spec, model_path=str(ckpt), cache_dir=str(cache),
                             weights_from_peers=peers)
    model = make_model(spec, None, preset=preset, options=options)
    started = time.perf_counter()
    build_module(model, "LLM", NodePlacement("LLM", (0,)), 0, options, torch.device("cpu"))
    return time.perf_counter() - started


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--config", default="testvla_single")
    parser.add_argument("--protocol", default="SHM", choices=("SHM", "TCP"))
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-weights-peer-") as name:
        tmp = Path(name)
        ckpt = write_tiny_checkpoint(tmp / "ckpt", preset=args.preset)
        weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        common = ["--config", args.config, "--preset", args.preset, "--model-path", str(ckpt),
                  "--cache-dir", str(tmp / "cache"), "--tensor-comm-protocol", args.protocol,
                  "--log-level", "INFO"]
        sides = {"disk": common, "peer": [*common, "--weights-from-peers"]}
        times: dict[str, list[float]] = {side: [] for side in sides}
        streams: list[tuple[str, int, float]] = []
        print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{args.config} preset {args.preset} ({weights / 2**20:.1f} MiB checkpoint), "
              f"{args.protocol}", flush=True)
        with launch([*common, "--weights-from-peers"], tmp):  # the running peer
            for round_ in range(args.rounds):
                order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for side in order:
                    ready, streamed = ready_seconds(sides[side], tmp)
                    times[side].append(ready)
                    if side == "peer":
                        if not streamed:
                            raise SystemExit("the peer side loaded nothing from the peer")
                        streams += streamed
                    print(f"  round {round_ + 1} {side}: ready in {ready:.2f} s", flush=True)
            loads = {side: min(llm_load_seconds(ckpt, tmp / "cache", args.preset,
                                                side == "peer") for _ in range(args.rounds))
                     for side in sides}
    print(f"\n{'side':<6} {'median s':>9} {'best s':>7}")
    for side, values in times.items():
        print(f"{side:<6} {statistics.median(values):>9.2f} {min(values):>7.2f}")
    print(f"\nLLM node load alone (best of {args.rounds}): disk {loads['disk']:.2f} s, "
          f"peer {loads['peer']:.2f} s")
    per_round = sum(b for _, b, _ in streams) / args.rounds
    seconds = sum(s for _, _, s in streams) / args.rounds
    print(f"\npeer streams per start: {per_round / 2**20:.1f} MiB in {seconds:.2f} s "
          f"({per_round / 2**20 / max(seconds, 1e-9):.0f} MiB/s, checksums included)")


if __name__ == "__main__":
    main()
