"""Data-parallel replicas: one `mstar-serve` with 2 replicas of a layout (`--dp-size 2`)
versus the same layout once, under the same load, side by side in one run.

Why: a replica is a whole copy of the layout (its own ranks, weights and KV cache); the
conductor sends each request to the least loaded one. What that buys depends on the cores
each replica's ranks get: on a machine with few cores two replicas share them (each rank's
worker gets `cores / ranks` torch threads), so expect little gain there; the figure
measures what routing and a second copy cost or give, not a speed-up a bigger machine
would show.

Workload: `--streams` concurrent SSE clients (default 16), each sending
`--requests-per-client` greedy requests back to back (ragged prompts, `ignore_eos`,
`--new-tokens` each), after a random start within `--stagger-ms`. Throughput is all output
tokens over the wall time from the first submission to the last end; latency is each
request's time from submission to its last event (p50, p90) and to its first token (TTFT
p50). Both servers stay up; the rounds alternate between them (so a change in the
machine's load hits both) and each side keeps its best round by throughput.

    python benchmarks/bench_replicas.py            # ~2 minutes on 2 cores
    python benchmarks/bench_replicas.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from bench_inprocess import Timing, mstar_request
from bench_serving import Server, cache_overrides, client_plans, cores, launch, stream_request


@dataclass
class Result:
    """One round of one side."""

    side: str
    timings: list[Timing]

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.timings)

    @property
    def wall(self) -> float:
        return (max(t.done for t in self.timings)
                - min(t.submitted for t in self.timings))

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall

    def latency_ms(self, q: int) -> float:
        """The q-th percentile of the requests' end-to-end time."""
        cuts = statistics.quantiles([t.done - t.submitted for t in self.timings], n=100,
                                    method="inclusive")
        return 1000 * cuts[q - 1]

    @property
    def ttft_p50_ms(self) -> float:
        return 1000 * statistics.median(t.first_token - t.submitted for t in self.timings)


async def one_round(server: Server, side: str, args: argparse.Namespace, seed: int) -> Result:
    """`args.streams` clients on one connection pool, each sending its requests back to
    back after its start delay."""
    limits = httpx.Limits(max_connections=args.streams, max_keepalive_connections=None)
    plans = client_plans(args.streams, args.requests_per_client, args.prompt_tokens,
                         args.stagger_ms / 1000, seed)
    async with httpx.AsyncClient(base_url=server.url, limits=limits,
                                 timeout=httpx.Timeout(600.0)) as client:
        async def one(index: int, delay: float, prompts: list[str]) -> list[Timing]:
            await asyncio.sleep(delay)
            return [await stream_request(client, mstar_request(text, args.new_tokens,
                                                               seed=index * 1000 + j))
                    for j, text in enumerate(prompts)]

        per = await asyncio.gather(*(one(i, d, p) for i, (d, p) in enumerate(plans)))
    return Result(side, [t for ts in per for t in ts])


def options(args: argparse.Namespace, replicas: int) -> list[str]:
    return ["--config", args.config, "--preset", args.preset, "--load-format", "dummy",
            "--tensor-comm-protocol", "SHM", "--dp-size", str(replicas),
            "--log-level", "WARNING",
            *(["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []),
            *cache_overrides(args.streams, args.prompt_tokens, args.new_tokens)]


def print_results(best: dict[str, Result], args: argparse.Namespace) -> None:
    print(f"\n{args.streams} concurrent streams x {args.requests_per_client} requests, "
          f"{args.new_tokens} new tokens, prompts ~{args.prompt_tokens} tokens; "
          f"{args.config}, preset {args.preset}; torch threads per rank: "
          f"{args.cpu_threads or 'cores / ranks'}; best of {args.repeat} round(s)")
    print(f"{'deployment':<14}{'requests':>9}{'tokens':>8}{'seconds':>9}{'tok/s':>9}"
          f"{'p50 ms':>9}{'p90 ms':>9}{'TTFT p50':>10}")
    for side, r in best.items():
        print(f"{side:<14}{len(r.timings):>9}{r.tokens:>8}{r.wall:>9.2f}{r.tok_s:>9.1f}"
              f"{r.latency_ms(50):>9.0f}{r.latency_ms(90):>9.0f}{r.ttft_p50_ms:>10.0f}")
    one, two = best["1 replica"], best["2 replicas"]
    print(f"ratio 2 replicas / 1: throughput {two.tok_s / one.tok_s:.2f}x, latency p50 "
          f"{two.latency_ms(50) / one.latency_ms(50):.2f}x, p90 "
          f"{two.latency_ms(90) / one.latency_ms(90):.2f}x")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="testvla_single",
                        help="the layout each replica runs (default: testvla_single)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--stagger-ms", type=float, default=50.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpu-threads", type=int,
                        help="torch threads of every rank's worker on both sides (default: "
                             "the server's, the cores divided among its ranks: 2 replicas "
                             "get half as many threads per rank)")
    parser.add_argument("--quick", action="store_true",
                        help="one round, 2 requests per client, 32 new tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.requests_per_client, args.new_tokens = 1, 2, 32
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, {cores()} cores "
          f"(os.cpu_count {os.cpu_count()}), torch {torch.__version__}, load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    sides = {"1 replica": 1, "2 replicas": 2}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        servers = {side: stack.enter_context(launch(options(args, n), Path(tmp)))
                   for side, n in sides.items()}
        for side, server in servers.items():  # warm-up: every rank prefills and decodes
            asyncio.run(one_round(server, side, argparse.Namespace(
                **{**vars(args), "requests_per_client": 1, "new_tokens": 8}), seed=999))
        best: dict[str, Result] = {}
        for round_index in range(args.repeat):
            for side, server in servers.items():
                result = asyncio.run(one_round(server, side, args, seed=round_index))
                print(f"  round {round_index}: {side:<11} {result.tok_s:7.1f} tok/s, p50 "
                      f"{result.latency_ms(50):.0f} ms (load {os.getloadavg()[0]:.2f})",
                      flush=True)
                if side not in best or result.tok_s > best[side].tok_s:
                    best[side] = result
    print_results(best, args)


if __name__ == "__main__":
    main()
