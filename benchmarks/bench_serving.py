"""mstar over HTTP (`mstar-serve`: API server, data worker, conductor and worker as
processes) versus the in-process API and sequential transformers `generate`, on the same
weights, side by side.

Why: the server adds process hops (ZMQ), an asyncio event loop, SSE framing and a client on
the same machine. This measures what that costs: output tokens/s and time
to first token of 1, 4, 16 and 64 concurrent SSE streams, against the in-process API
(`bench_inprocess.py --only mstar`, the same workload: the same seeds give the same
ragged prompts and staggered starts) and sequential `generate` (`--only hf`), as ratios.
Goal of the issue: HTTP within 10 % of in-process at 16 streams.

The three systems never share a process (two OpenMP thread teams in one process halve
throughput on 2 cores; see the README). The rounds alternate: a fresh in-process run, then
the same round over HTTP on the one server, so a change in the machine's load hits both;
each row keeps its best round. The CPU time of every server process (from /proc) and of
the client are printed per level: on a machine with few cores they are where the time goes.

    python benchmarks/bench_serving.py            # full run, ~3.5 minutes on 2 cores
    python benchmarks/bench_serving.py --quick    # smoke run, ~1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
from bench_inprocess import (
    Row,
    Timing,
    mstar_request,
    print_table,
    ragged_prompts,
    resolve_defaults,
)

from mstar import events
from mstar_testvla.checkpoint import write_tiny_checkpoint
from mstar_testvla.config import PRESETS

HTTP_GOAL = 0.9  # HTTP@16 / in-process@16
GOAL_LEVEL = 16
SERVE = "import sys; from mstar.cli.serve import serve_main; sys.exit(serve_main())"
INPROCESS = Path(__file__).with_name("bench_inprocess.py")
HTTP, INPROC = "mstar HTTP (SSE)", "mstar in-process"
SEQUENTIAL = "HF generate (sequential)"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_overrides(max_streams: int, prompt_tokens: int, new_tokens: int) -> list[str]:
    """`--set` options for the cache `bench_inprocess.load_mstar` gives the in-process side
    (every stream fits: no preemption in either figure)."""
    max_seq_len = prompt_tokens + 16 + new_tokens + 16
    pages_per_seq = -(-max_seq_len // 16) + 1
    return ["--set", f"max_seq_len={max_seq_len}", "--set", "kv_cache.page_size=16",
            "--set", f"kv_cache.num_pages={max_streams * pages_per_seq + 16}",
            "--set", f"max_concurrent_requests={max(256, max_streams)}"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu() -> float:
    """CPU seconds every core of the machine has spent on processes or stolen so far
    (/proc/stat): less what our processes used, it is the load of others during a
    measurement. Interrupt time is left out: it is our loopback traffic's, unattributed."""
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + steal) / CLOCK_TICKS


def child_roles(pid: int) -> dict[str, int]:
    """'<role>' or '<role>:<rank or index>' -> pid for each of the server's children
    (conductor, workers, data workers), from the spec on their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if parent != pid or "mstar.serving.proc" not in argv:
            continue
        spec = json.loads(argv[argv.index("mstar.serving.proc") + 1])
        rank = spec.get("rank", -1)
        found[spec["role"] + (f":{rank}" if rank >= 0 else "")] = int(entry.name)
    return dict(sorted(found.items()))


@dataclass
class Server:
    """A running `mstar-serve` and the pids of its processes."""

    url: str
    pids: dict[str, int]  # "api server", "conductor", "data_worker:0", "worker:0", ...
    sockets: Path  # its --socket-path-prefix (the deployment's directory is d<id> in it)

    def cpu(self) -> dict[str, float]:
        """CPU seconds per process so far, the client (this process) included."""
        used = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        times = os.times()
        used["client"] = times.user + times.system
        return used


@contextmanager
def launch(options: Sequence[str], tmp: Path, port: int = 0) -> Iterator[Server]:
    """`mstar-serve <options>` on 127.0.0.1, healthy; SIGTERM at the end (the server drains
    and removes its sockets and shared memory). Shared by the serving benchmarks."""
    port = port or free_port()
    log_path = tmp / f"server-{port}.log"
    sockets = tmp / f"sockets-{port}"
    cmd = [sys.executable, "-c", SERVE, *options, "--host", "127.0.0.1", "--port", str(port),
           "--socket-path-prefix", str(sockets)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path, timeout=300)
        yield Server(url, {"api server": proc.pid, **child_roles(proc.pid)}, sockets)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(args: argparse.Namespace, ckpt: Path, tmp: Path) -> Iterator[Server]:
    """`mstar-serve --config testvla_single` (or `--config`) on the checkpoint."""
    return launch(["--config", args.config, "--preset", args.preset, "--model-path",
                   str(ckpt), "--log-level", args.server_log_level,
                   *cache_overrides(max(args.levels), args.prompt_tokens, args.new_tokens)],
                  tmp, args.port)


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mstar-serve exited ({proc.returncode}):\n"
                                   f"{log_path.read_text()}")
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"mstar-serve not healthy in {timeout:.0f} s:\n{log_path.read_text()}")


# ------------------------------------------------------------------------------------------
# HTTP clients


_EVENT = msgspec.json.Decoder(events.Event)


async def generate_events(client: httpx.AsyncClient,
                          body: dict[str, Any]) -> AsyncIterator[events.Event]:
    """The `mstar.events` of one streamed `/generate` (an `error` event raises)."""
    tag = ""
    async with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())!r}")
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                tag = line[7:]
            elif line.startswith("data: ") and tag:
                event = _EVENT.decode(line[6:])
                if isinstance(event, events.Error):
                    raise RuntimeError(f"mstar request failed: {event.message}")
                yield event
            elif not line:
                tag = ""


async def stream_request(client: httpx.AsyncClient, body: dict[str, Any]) -> Timing:
    """One SSE request: the time of its first `text_delta` frame and the tokens received."""
    submitted = time.perf_counter()
    first, tokens, reason = 0.0, 0, ""
    async for event in generate_events(client, body):
        if isinstance(event, events.TextDelta):
            if not tokens:
                first = time.perf_counter()
            tokens += len(event.token_ids)
        elif isinstance(event, events.Finished):
            reason = event.reason
    return Timing(submitted, first, time.perf_counter(), tokens, reason)


def client_plans(concurrency: int, per_client: int, prompt_tokens: int, stagger_s: float,
                 seed: int) -> list[tuple[float, list[str]]]:
    """(start delay, prompts) per client: what `bench_inprocess.run_clients` draws from the
    same seed, so both sides get the same workload."""
    rng = random.Random(seed)
    return [(rng.uniform(0, stagger_s), ragged_prompts(rng, per_client, prompt_tokens))
            for _ in range(concurrency)]


async def http_clients(client: httpx.AsyncClient, concurrency: int, per_client: int,
                       prompt_tokens: int, new_tokens: int, stagger_s: float,
                       seed: int) -> Row:
    """`concurrency` clients (tasks on one connection pool), each starting after its delay
    and sending its requests back to back."""
    async def one(index: int, delay: float, prompts: list[str]) -> list[Timing]:
        await asyncio.sleep(delay)
        return [await stream_request(client, mstar_request(text, new_tokens,
                                                           seed=index * 1000 + j))
                for j, text in enumerate(prompts)]

    plans = client_plans(concurrency, per_client, prompt_tokens, stagger_s, seed)
    per = await asyncio.gather(*(one(i, d, p) for i, (d, p) in enumerate(plans)))
    return summarize(HTTP, concurrency, [t for ts in per for t in ts], new_tokens)


def summarize(system: str, concurrency: int, timings: list[Timing], new_tokens: int) -> Row:
    """A row as `bench_inprocess.run_clients` computes it: tokens over the wall time from
    the first submission to the last end; mean TTFT and time per further token."""
    wall = max(t.done for t in timings) - min(t.submitted for t in timings)
    tpots = [(t.done - t.first_token) / (t.tokens - 1) for t in timings if t.tokens > 1]
    return Row(system, concurrency, len(timings), sum(t.tokens for t in timings), wall,
               1000 * statistics.mean(t.first_token - t.submitted for t in timings),
               1000 * statistics.mean(tpots), sum(t.tokens < new_tokens for t in timings))


async def server_ttft(client: httpx.AsyncClient) -> tuple[float, float]:
    """(sum, count) of the server's time-to-first-output histogram: from a request's
    arrival at the route to its first event reaching the event loop."""
    found = {}
    for line in (await client.get("/metrics")).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("mstar_time_to_first_output_seconds_sum",
                    "mstar_time_to_first_output_seconds_count"):
            found[name.rsplit("_", 1)[1]] = float(value)
    return found["sum"], found["count"]


@dataclass
class CpuUse:
    """CPU seconds each of our processes spent during one level's `row`, and the CPU
    seconds of everything else on the machine (other work, steal) over the same wall time."""

    row: Row
    wall: float
    seconds: dict[str, float]
    others: float


async def http_round(server: Server, args: argparse.Namespace, round_seed: int,
                     warm: bool) -> tuple[list[Row], list[CpuUse]]:
    """One round over HTTP at every level (seed `round_seed + c`, as the in-process side),
    after a warm-up (prefill and decode at 1 and 4 streams) when `warm`."""
    stagger = args.stagger_ms / 1000
    limits = httpx.Limits(max_connections=max(args.levels), max_keepalive_connections=None)
    rows, cpu = [], []
    async with httpx.AsyncClient(base_url=server.url, limits=limits,
                                 timeout=httpx.Timeout(600.0)) as client:
        if warm:
            await http_clients(client, 1, 1, args.prompt_tokens, args.new_tokens // 4, 0.0,
                               seed=12345)
            await http_clients(client, 4, 1, args.prompt_tokens, args.new_tokens // 4, 0.01,
                               seed=54321)
        for c in args.levels:
            ttft_before = await server_ttft(client)
            before, machine, start = server.cpu(), machine_cpu(), time.perf_counter()
            row = await http_clients(client, c, args.requests_per_client, args.prompt_tokens,
                                     args.new_tokens, stagger, seed=round_seed + c)
            after, wall = server.cpu(), time.perf_counter() - start
            ttft_after = await server_ttft(client)
            used = {k: after[k] - before[k] for k in after}
            others = machine_cpu() - machine - sum(used.values())
            rows.append(row)
            cpu.append(CpuUse(row, wall, used, others))
            inside = (ttft_after[0] - ttft_before[0]) / (ttft_after[1] - ttft_before[1])
            share = max(0.0, 100 * others / (cores() * wall))
            print(f"  {row.system:<28} @ {c:>3}: {row.tok_s:7.1f} tok/s, TTFT "
                  f"{row.ttft_ms:.0f} ms (server-side {1000 * inside:.0f}) (load "
                  f"{os.getloadavg()[0]:.2f}; others used {share:.0f} % of the machine)",
                  flush=True)
    return rows, cpu


# ------------------------------------------------------------------------------------------
# The in-process and HF sides (bench_inprocess.py in a fresh process)


def inprocess_rows(args: argparse.Namespace, ckpt: Path, only: str, seed: int,
                   repeat: int, server: Server | None = None) -> list[Row]:
    """`bench_inprocess.py --only <only>` on the same checkpoint and workload; its rows.
    Prints how much of the machine others (not it, us or the idle `server`) used."""
    cmd = [sys.executable, str(INPROCESS), "--only", only, "--ckpt", str(ckpt),
           "--preset", args.preset, "--concurrency", ",".join(map(str, args.levels)),
           "--requests-per-client", str(args.requests_per_client),
           "--hf-requests", str(args.hf_requests), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--stagger-ms", str(args.stagger_ms),
           "--threads", str(args.threads), "--repeat", str(repeat), "--seed", str(seed),
           *(["--quick"] if args.quick else [])]
    idle_before = sum(server.cpu().values()) if server else 0.0
    machine, children, start = machine_cpu(), _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - start
    idle = (sum(server.cpu().values()) if server else 0.0) - idle_before
    others = machine_cpu() - machine - (_children_cpu() - children) - idle
    share = max(0.0, 100 * others / (cores() * wall))
    print(f"  ({only}: others used {share:.0f} % of the machine over its {wall:.0f} s, load "
          "and start-up included)", flush=True)
    rows = []
    for line in proc.stdout.splitlines():
        kind, _, payload = line.partition(" ")
        if kind == "ROW":
            row = Row(**json.loads(payload))
            rows.append(dataclasses.replace(row, system=INPROC) if row.system == "mstar"
                        else row)
        elif line.startswith("  "):
            print(line, flush=True)
    return rows


def _children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def cores() -> int:
    return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------
# Report


def best_rows(rows: list[Row]) -> list[Row]:
    """Each (system, streams) row's best round, in first-seen order."""
    best: dict[tuple[str, int], Row] = {}
    for row in rows:
        key = (row.system, row.concurrency)
        if key not in best or row.tok_s > best[key].tok_s:
            best[key] = row
    return list(best.values())


def print_ratios(rows: list[Row], levels: list[int], rounds: list[list[Row]]) -> None:
    """Best row over best row, then each round's own ratio (its in-process run and the
    HTTP run right after it): their spread is the noise of this machine."""
    by = {(r.system, r.concurrency): r for r in rows}
    print("\nratios (output tokens/s of the best rows; TTFT difference; each round's ratio):")
    for c in levels:
        http, inproc = by.get((HTTP, c)), by.get((INPROC, c))
        if http is None or inproc is None:
            continue
        ratio = http.tok_s / inproc.tok_s
        goal = (f"   goal >= {HTTP_GOAL:.2f}: {'met' if ratio >= HTTP_GOAL else 'NOT met'}"
                if c == GOAL_LEVEL else "")
        per_round = []
        for round_rows in rounds:
            mine = {r.system: r for r in round_rows if r.concurrency == c}
            if HTTP in mine and INPROC in mine:
                per_round.append(f"{mine[HTTP].tok_s / mine[INPROC].tok_s:.2f}")
        print(f"  {f'HTTP@{c} / in-process@{c}':<32} {ratio:6.2f}   TTFT "
              f"{http.ttft_ms - inproc.ttft_ms:+7.1f} ms   rounds {' '.join(per_round)}{goal}")
    http1, seq = by.get((HTTP, 1)), by.get((SEQUENTIAL, 1))
    if http1 is not None and seq is not None:
        print(f"  {'HTTP@1 / HF sequential':<32} {http1.tok_s / seq.tok_s:6.2f}   TTFT "
              f"{http1.ttft_ms - seq.ttft_ms:+7.1f} ms")


def print_cpu(uses: list[CpuUse]) -> None:
    """For the round each level's HTTP row comes from (its best): CPU ms per output token
    of each process (every token costs the same work, so the shares say where HTTP's CPU
    goes) and the share of the machine (cores x wall) that we and others used."""
    best: dict[int, CpuUse] = {}
    for use in uses:
        c = use.row.concurrency
        if c not in best or use.row.tok_s > best[c].row.tok_s:
            best[c] = use
    names = list(uses[0].seconds)
    width = {n: max(9, len(n)) for n in names}
    print("\nCPU ms per output token over HTTP, by process (the best round's; /proc), and "
          "the share of the machine used by us and by others:")
    print(f"  {'streams':>7} " + " ".join(f"{n:>{width[n]}}" for n in names)
          + f" {'us %':>6} {'others %':>8}")
    for c, use in best.items():
        cells = " ".join(f"{1000 * use.seconds[n] / use.row.tokens:{width[n]}.3f}"
                         for n in names)
        machine = cores() * use.wall
        print(f"  {c:>7} {cells} {100 * sum(use.seconds.values()) / machine:6.1f} "
              f"{max(0.0, 100 * use.others / machine):8.1f}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, fewer requests")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--config", default="testvla_single",
                   help="deployment config for mstar-serve (packaged name or YAML path)")
    p.add_argument("--concurrency", default="1,4,16,64",
                   help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests-per-client", type=int, default=None,
                   help="back-to-back requests per client (default 3, quick 1)")
    p.add_argument("--hf-requests", type=int, default=None,
                   help="sequential HF requests (default 4, quick 2)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--stagger-ms", type=float, default=200.0,
                   help="each client starts after a random delay below this")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the in-process and HF runs (the server's worker "
                        "takes all cores for its one rank)")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds; each row keeps its best (default 2, quick 1)")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="checkpoint directory (written there if it has no model.safetensors)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--server-log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="mstar-serve --log-level (INFO, its default, logs every request)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return resolve_defaults(args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"{cores()} cores; load average {os.getloadavg()[0]:.2f}; preset {args.preset!r}, "
          f"config {args.config!r}; prompts ~{args.prompt_tokens} tokens, {args.new_tokens} "
          f"new tokens, greedy, fp32; {args.repeat} round(s)", flush=True)
    rows: list[Row] = []
    rounds: list[list[Row]] = []
    cpu: list[CpuUse] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or Path(tmp) / "ckpt"
        if not (ckpt / "model.safetensors").exists():
            write_tiny_checkpoint(ckpt, preset=args.preset, seed=args.seed)
        print("HF generate (its own process):", flush=True)
        rows += inprocess_rows(args, ckpt, "hf", args.seed, args.repeat)
        with serve(args, ckpt, Path(tmp)) as server:
            print(f"mstar-serve up at {server.url}: processes {server.pids}", flush=True)
            for round_ in range(args.repeat):
                seed = args.seed + 1000 * round_
                print(f"round {round_ + 1} of {args.repeat}: in-process (fresh process), "
                      "then HTTP", flush=True)
                inproc = inprocess_rows(args, ckpt, "mstar", seed, 1, server)
                http, used = asyncio.run(http_round(server, args, seed, warm=round_ == 0))
                rounds.append(inproc + http)
                rows += inproc + http
                cpu += used
    best = best_rows(rows)
    print(f"\nbest of {args.repeat} round(s) per row; TTFT: mean time to the first token "
          "(HF: a 1-token `generate`); TPOT: mean time per further token")
    print_table(best)
    print_ratios(best, args.levels, rounds)
    print_cpu(cpu)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min)")


if __name__ == "__main__":
    main()
