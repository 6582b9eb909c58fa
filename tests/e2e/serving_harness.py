"""Starting real `mstar-serve` processes for end-to-end tests, and checking what they leave
behind (child processes, sockets, shared-memory segments)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

SERVE = "import sys; from mstar.cli.serve import serve_main; sys.exit(serve_main())"
#: `mstar ...` (e.g. `serve <model>`: a model's default config and `mstar serve` plumbing).
MSTAR = "import sys; from mstar.cli.main import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def worker_pids(parent: int) -> dict[str, int]:
    """'conductor' / 'worker:<rank>' -> pid of `parent`'s children, from their command
    lines."""
    found = {}
    for pid in children(parent):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if '"role":"conductor"' in cmd:
            found["conductor"] = pid
        elif '"role":"worker"' in cmd:
            rank = cmd.split('"rank":', 1)[1].split(",", 1)[0]
            found[f"worker:{rank}"] = pid
    return found


def shm_segments(deployment_id: str = "") -> list[str]:
    """Shared-memory segments of one deployment (all of mstar's when no id is given)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"mstar_{deployment_id}*"))


class Server:
    """One `mstar-serve` process on a free loopback port."""

    def __init__(self, tmp: Path, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None, sockets: Path | None = None,
                 cli: str = SERVE):
        """`sockets`: the socket path prefix (default: one of its own under `tmp`); `cli`:
        the command `args` go to (`mstar-serve`, or `MSTAR`: `mstar serve <model> ...`)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sockets = sockets or tmp / f"sockets-{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, "-c", cli, *args, "--host", "127.0.0.1", "--port",
               str(self.port), "--socket-path-prefix", str(self.sockets)]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self._id: str | None = None

    def output(self) -> str:
        return self.log.read_text()

    @property
    def deployment_id(self) -> str:
        """The id the launcher gave this deployment (its socket directory is d<id>, the
        one whose owner record names this server)."""
        if self._id is None:
            for path in sorted(self.sockets.glob("d*/owner.json")):
                if json.loads(path.read_text())["pid"] == self.proc.pid:
                    self._id = path.parent.name[1:]
        assert self._id, "the server has not created its socket directory yet"
        return self._id

    @property
    def socket_dir(self) -> Path:
        return self.sockets / f"d{self.deployment_id}"

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n"
                                     f"{self.output()}")
            try:
                if self.client.get("/health").status_code == 200:
                    assert self.deployment_id  # known from now on, even once it exited
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not healthy in {timeout} s:\n{self.output()}")

    def generate(self, body: dict) -> httpx.Response:
        return self.client.post("/generate", json=body)

    def metric(self, name: str, default: float | None = None) -> float:
        """One sample of `/metrics` (`name` may carry labels); `default` if it is absent."""
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        if default is None:
            raise KeyError(name)
        return default

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of metric `name` on `/metrics`, with its labels."""
        text = self.client.get("/metrics").text
        return [(s.labels, s.value) for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == name]

    def wait_reported(self, timeout: float = 30) -> None:
        """Wait until every rank has reported counters read after this call, so `/metrics`
        counts all the work of the requests that ended before it."""
        since = time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reports = self.samples("mstar_worker_report_timestamp_seconds")
            if reports and all(at > since for _, at in reports):
                return
            time.sleep(0.05)
        raise AssertionError(f"the workers did not report in {timeout} s")

    def wait_idle(self, timeout: float = 10) -> None:
        """Every request ended and every KV page free again (from /metrics)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric("mstar_kv_pages_in_use") == 0 and \
                    self.metric("mstar_running_requests") == 0:
                return
            time.sleep(0.1)
        raise AssertionError("the server did not return to idle")

    def worker_pids(self) -> dict[str, int]:
        """'conductor' / 'worker:<rank>' -> pid, from the children's command lines."""
        return worker_pids(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.client.close()
        if self.proc.poll() is None:
            if self.sockets.exists() and any(self.sockets.glob("d*/owner.json")):
                assert self.deployment_id
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"server did not stop in {timeout} s:\n{self.output()}") from None

    def assert_clean(self) -> None:
        """Nothing left: no children, no sockets, no shared memory of this server."""
        assert self.proc.poll() is not None
        assert children(self.proc.pid) == []
        if self._id is not None:  # only this server's: others may run beside it
            assert not self.socket_dir.exists(), list(self.socket_dir.iterdir())
            assert shm_segments(self._id + "_") == []
        else:
            leftover = list(self.sockets.glob("*/*")) if self.sockets.exists() else []
            assert leftover == [], leftover


@contextlib.contextmanager
def running(directory: Path, *args: str) -> Iterator[Server]:
    """A server (`Server(directory, *args)`) healthy for the block, then stopped: it must
    exit with status 0 and leave nothing behind (`Server.assert_clean`)."""
    server = Server(directory, *args)
    server.wait_healthy()
    yield server
    assert server.stop() == 0, server.output()
    server.assert_clean()



@contextlib.contextmanager
def running_keyed(directory: Path, key: str, *args: str) -> Iterator[Server]:
    """`running` with `--api-key key`; the server's own `client` sends the key."""
    with running(directory, *args, "--api-key", key) as server:
        server.client.headers["Authorization"] = f"Bearer {key}"
        yield server


def openai_client(server: Server, key: str):
    """The official `openai` client on the server's `/v1`, without retries."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


@contextlib.contextmanager
def sdk_client(server: Server, key: str):
    """Our SDK's client on the server, without retries."""
    from mstar import MStarClient

    with MStarClient(server.url, api_key=key, max_retries=0) as client:
        yield client
