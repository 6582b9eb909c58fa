"""The deployment as real processes behind HTTP: every packaged placement gives the same
outputs as the in-process co-located run, and the server's life cycle (start-up, drain,
dead workers, floods, ports in use, SIGTERM with stuck requests, kill -9) leaves nothing
behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import audio, collect, frame, image, tensors, tokens
from placement_check import check_placement
from serving_harness import Server, children, shm_segments

import mstar
from mstar.serving.launcher import EXIT_CHILD_DIED

TEXT = {"prompt": "the picture <image> shows", "image": image(21), "max_tokens": 8,
        "temperature": 0, "stream_consumer": True, "logprobs": 2}
SAMPLED = {"prompt": "tell me", "max_tokens": 8, "temperature": 1.0, "seed": 99,
           "ignore_eos": True}
#: CFG at flow times 1 and 2/3, not 1/3: the branch (on its own rank in cfg_parallel) is
#: skipped after it ran, and its earlier velocity must not reach `combine`.
ACT = {"prompt": "<image>stack the cups", "image": image(22), "mode": "act", "num_steps": 3,
       "guidance_scale": 2.0, "cfg_interval": [0.5, 1.0], "seed": 5}
ROLL = {"prompt": "go", "mode": "rollout", "num_frames": 2, "frame": frame(23)}
#: CEM candidates forked from a kept context, joined once per round (`Join`).
PLAN = {"prompt": "reach", "mode": "plan", "frame": frame(24), "goal": frame(25),
        "plan_samples": 3, "plan_topk": 1, "plan_iters": 2, "plan_horizon": 1, "seed": 6}
REQUESTS = {"text": TEXT, "sampled": SAMPLED, "act": ACT, "rollout": ROLL, "plan": PLAN}


def decoded(body: dict) -> list:
    return [mstar.events.decode(mstar.events.encode(msgspec_event(e)))
            for e in body["events"]]


def msgspec_event(event: dict):
    import msgspec

    return msgspec.json.decode(json.dumps(event).encode(), type=mstar.events.Event)


def summary(evs: list) -> dict:
    text_lp = [lp.logprob for e in evs if isinstance(e, mstar.events.TextDelta)
               for lp in (e.logprobs or [])]
    return {"tokens": tokens(evs), "audio": audio(evs), "actions": tensors(evs, "actions"),
            "frames": tensors(evs, "frame"), "plan": tensors(evs, "plan"),
            "logprobs": torch.tensor(text_lp)}


def assert_same(got: dict, want: dict) -> None:
    assert got["tokens"] == want["tokens"]
    for key in ("audio", "logprobs"):
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)
    for key in ("actions", "frames", "plan"):
        assert len(got[key]) == len(want[key])
        for a, b in zip(got[key], want[key]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


#: The walks that compute a testvla request's prompt (the others continue from its K/V).
PREFILL_WALKS = {"prefill", "prefill_act", "prefill_rollout", "prefill_plan"}


@pytest.fixture(scope="module")
def expected(tiny_ckpt):
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=512) as d:
        return {name: summary(collect(d, req)) for name, req in REQUESTS.items()}


@pytest.fixture(scope="module")
def single_rank_bytes(tiny_ckpt) -> dict[str, tuple[int, int]]:
    """(all, tensor-parallel split) parameter bytes of each node built whole on one rank."""
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=512) as d:
        return dict(d.workers[0].parameter_bytes)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("config, protocol", [
    ("testvla_single", "SHM"), ("testvla_node_split", "SHM"), ("testvla_node_split", "TCP"),
    ("testvla_pd_disaggregated", "SHM"), ("testvla_stream_rank", "SHM"),
    ("testvla_cfg_parallel", "TCP"), ("testvla_tp2", "SHM"),
])
def test_every_layout_gives_the_same_outputs(tmp_path, tiny_ckpt, expected, single_rank_bytes,
                                             config, protocol):
    """The in-process outputs, with each rank running and holding exactly what the
    layout's YAML places on it (from /metrics)."""
    server = Server(tmp_path, "--config", config, "--model-path", str(tiny_ckpt),
                    "--tensor-comm-protocol", protocol)
    try:
        server.wait_healthy()
        for name, req in REQUESTS.items():
            response = server.generate(req)
            assert response.status_code == 200, response.text
            assert_same(summary(decoded(response.json())), expected[name])
        check_placement(server, config, prefill_walks=PREFILL_WALKS,
                        single_rank_bytes=single_rank_bytes)
        server.wait_idle()
    finally:
        assert server.stop() == 0, server.output()
    server.assert_clean()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """Two concurrent requests at most, a 3 s timeout, the consumer on its own rank."""
    tmp = tmp_path_factory.mktemp("small-server")
    server = Server(tmp, "--config", "testvla_stream_rank", "--preset", "tiny",
                    "--load-format", "dummy", "--timeout", "3", "--enable-nvtx",
                    "--set", "max_concurrent_requests=2")
    server.wait_healthy()
    yield server
    assert server.stop() == 0, server.output()
    server.assert_clean()


@pytest.mark.timeout(120)
def test_flood_gets_answers_or_429_never_a_hang(small_server):
    statuses: list[int] = []

    def one(i: int) -> None:
        r = httpx.post(small_server.url + "/generate", timeout=60,
                       json={"prompt": f"flood {i}", "max_tokens": 24, "ignore_eos": True})
        statuses.append(r.status_code)
        if r.status_code in (429, 503):
            assert "retry-after" in r.headers

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert len(statuses) == 20 and set(statuses) <= {200, 429, 503}
    assert 200 in statuses and 429 in statuses
    small_server.wait_idle()


@pytest.mark.timeout(60)
def test_timeout_and_disconnect_free_everything(small_server):
    r = small_server.generate({"prompt": "slow consumer", "max_tokens": 200,
                               "ignore_eos": True, "stream_consumer": True,
                               "consumer_delay_s": 0.05})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["message"]
    with httpx.stream("POST", small_server.url + "/generate", timeout=30,
                      json={"prompt": "walk away", "max_tokens": 400, "ignore_eos": True,
                            "stream": True, "stream_consumer": True}) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: text_delta"):
                break  # the client goes away mid-stream
    small_server.wait_idle()
    assert small_server.generate({"prompt": "still fine", "max_tokens": 2}).status_code == 200


#: A request that streams for seconds (the consumer sleeps 50 ms per window).
SLOW = {"prompt": "long", "max_tokens": 200, "ignore_eos": True, "stream": True,
        "stream_consumer": True, "consumer_delay_s": 0.05}
#: One that runs for minutes (the consumer sleeps 1 s per window).
STUCK = {**SLOW, "consumer_delay_s": 1.0}


def wait_running(server: Server, n: int) -> None:
    """Until `n` requests run (from /metrics)."""
    deadline = time.monotonic() + 30
    while server.metric("mstar_running_requests") < n:
        assert time.monotonic() < deadline, f"{n} requests never ran at once"


def stops_for_a_restart(server: Server) -> None:
    """After a child died: until the server has exited, `/health` and new requests get
    503 with Retry-After (or no connection, once it stopped listening); it then exits with
    `EXIT_CHILD_DIED` so that a supervisor starts it again, leaving nothing behind."""
    deadline = time.monotonic() + 60
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            health = server.client.get("/health")
            generate = server.generate({"prompt": "x", "max_tokens": 2})
        except httpx.TransportError:
            time.sleep(0.05)  # no longer listening: exiting
            continue
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert generate.status_code == 503 and generate.json()["error"]["code"] == 503
        assert "retry-after" in health.headers and "retry-after" in generate.headers
    assert server.stop() == EXIT_CHILD_DIED, server.output()
    assert "stopping the server (exit status 3)" in server.output()
    server.assert_clean()


@pytest.mark.timeout(120)
def test_a_killed_worker_fails_its_requests_and_stops_the_server(tmp_path):
    server = Server(tmp_path, "--config", "testvla_stream_rank", "--preset", "tiny",
                    "--load-format", "dummy")
    try:
        server.wait_healthy()
        pids = server.worker_pids()
        assert set(pids) == {"conductor", "worker:0", "worker:1"}
        plain: list[httpx.Response] = []  # a non-streamed request, running at the kill
        waiting = threading.Thread(target=lambda: plain.append(httpx.post(
            server.url + "/generate", json={**STUCK, "stream": False}, timeout=60)))
        waiting.start()
        events: list[str] = []
        with httpx.stream("POST", server.url + "/generate", timeout=30,
                          json={"prompt": "long", "max_tokens": 400, "ignore_eos": True,
                                "stream": True}) as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    events.append(line)
                    if len(events) == 2:
                        wait_running(server, 2)
                        os.kill(pids["worker:0"], signal.SIGKILL)
        waiting.join(timeout=60)
        assert events[-1] == "event: error", events[-3:]
        assert plain[0].status_code == 503 and plain[0].headers["retry-after"]
        assert "worker:0" in plain[0].json()["error"]["message"]
    finally:
        stops_for_a_restart(server)


def data_worker_pids(server: Server) -> dict[str, int]:
    """'frontend:<k>' -> pid of each data-worker process, from the children's command
    lines."""
    found = {}
    for pid in children(server.proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if '"role":"data_worker"' in cmd:
            index = cmd.split('"rank":', 1)[1].split(",", 1)[0]
            found[f"frontend:{index}"] = pid
    return found


def submitted_by(server: Server, request_id: str) -> list[str]:
    """The data workers whose log says they submitted `request_id`."""
    return re.findall(rf"(frontend:\d+): {re.escape(request_id)} submitted", server.output())


@pytest.mark.timeout(180)
def test_two_data_workers_share_the_requests(tmp_path, tiny_ckpt, expected):
    """Prompt processing and postprocessing run in two data-worker processes: outputs equal
    the in-process run, a second request while the first streams goes to the idle data
    worker, and bad input found there is still a 400 naming the field."""
    server = Server(tmp_path, "--config", "testvla_node_split", "--model-path", str(tiny_ckpt),
                    "--data-workers", "2")
    try:
        server.wait_healthy()
        assert sorted(data_worker_pids(server)) == ["frontend:0", "frontend:1"]
        responses: dict[str, httpx.Response] = {}

        def one(name: str) -> None:
            responses[name] = server.generate(REQUESTS[name])

        threads = [threading.Thread(target=one, args=(name,)) for name in REQUESTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for name, response in responses.items():
            assert response.status_code == 200, response.text
            assert_same(summary(decoded(response.json())), expected[name])
        assert len(responses) == len(REQUESTS)

        with httpx.stream("POST", server.url + "/generate", timeout=30,
                          headers={"x-request-id": "held-1"}, json=SLOW) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
            while not next(lines).startswith("event: text_delta"):
                pass  # held-1 is now live on one data worker; the next goes to the other
            r = server.client.post("/generate", json={"prompt": "hi", "max_tokens": 2},
                                   headers={"x-request-id": "second-1"})
            assert r.status_code == 200, r.text
        assert submitted_by(server, "held-1") == ["frontend:0"]
        assert submitted_by(server, "second-1") == ["frontend:1"]

        for body, field in [({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
                            ({"max_tokens": 4}, "prompt"),
                            ({"prompt": "hi", "temperature": -1}, "temperature")]:
            r = server.generate(body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == 400
            assert field in f"{error['param']} {error['message']}", error
        server.wait_idle()
    finally:
        assert server.stop() == 0, server.output()
    server.assert_clean()


@pytest.mark.timeout(120)
def test_a_killed_data_worker_fails_its_requests_and_stops_the_server(tmp_path):
    server = Server(tmp_path, "--config", "testvla_stream_rank", "--preset", "tiny",
                    "--load-format", "dummy", "--data-workers", "2")
    try:
        server.wait_healthy()
        pids = data_worker_pids(server)
        frames: list[str] = []
        with httpx.stream("POST", server.url + "/generate", timeout=30, json=SLOW) as stream:
            for line in stream.iter_lines():
                if line:
                    frames.append(line)
                if len(frames) == 4:  # two events in: the first request is frontend:0's
                    os.kill(pids["frontend:0"], signal.SIGKILL)
        assert frames[-2] == "event: error", frames[-4:]
        error = json.loads(frames[-1].removeprefix("data: "))
        assert error["code"] == 503 and "frontend:0" in error["message"]
    finally:
        stops_for_a_restart(server)


@pytest.mark.timeout(120)
def test_sigterm_ends_stuck_requests_with_a_clean_503(tmp_path):
    """Requests still running when the shutdown grace (1 s) ends get a 503: an SSE error
    event when streamed, a JSON error with Retry-After otherwise; the log has no
    traceback and uvicorn never had to cancel a task."""
    server = Server(tmp_path, "--config", "testvla_stream_rank", "--preset", "tiny",
                    "--load-format", "dummy", env={"MSTAR_SHUTDOWN_GRACE": "1"})
    plain: list[httpx.Response] = []
    try:
        server.wait_healthy()
        waiting = threading.Thread(target=lambda: plain.append(httpx.post(
            server.url + "/generate", json={**STUCK, "stream": False}, timeout=60)))
        waiting.start()
        with httpx.stream("POST", server.url + "/generate", timeout=60, json=STUCK) as stream:
            frames = stream.iter_lines()
            while not next(frames).startswith("event: text_delta"):
                pass
            wait_running(server, 2)
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in frames if line]
        waiting.join(timeout=60)
        assert rest[-2] == "event: error", rest[-4:]
        error = json.loads(rest[-1].removeprefix("data: "))
        assert error["code"] == 503 and "shutting down" in error["message"]
        assert plain[0].status_code == 503 and plain[0].headers["retry-after"]
        assert "shutting down" in plain[0].json()["error"]["message"]
        assert server.proc.wait(timeout=60) == 0, server.output()
    finally:
        server.stop()
    log = server.output()
    assert "ended with 503" in log
    assert "Traceback" not in log and "graceful shutdown exceeded" not in log, log
    server.assert_clean()


@pytest.mark.timeout(120)
def test_sigterm_during_start_up_stops_cleanly(tmp_path):
    """A SIGTERM as soon as the deployment exists (its children starting, uvicorn not yet
    running) stops the server cleanly: exit 0, nothing left."""
    server = Server(tmp_path, "--config", "testvla_stream_rank", "--preset", "tiny",
                    "--load-format", "dummy")
    deadline = time.monotonic() + 60
    while not list(server.sockets.glob("d*/owner.json")):
        assert server.proc.poll() is None, server.output()
        assert time.monotonic() < deadline, "no deployment in 60 s"
        time.sleep(0.01)
    assert server.stop() == 0, server.output()
    assert "Traceback" not in server.output()
    server.assert_clean()


#: Its image (75 KiB) travels through an SHM segment, which stays in its sender's pool.
BIG_IMAGE = {"prompt": "the picture <image> shows", "image": image(21, 80, 80), "max_tokens": 2}


@pytest.mark.timeout(240)
def test_a_killed_servers_leftovers_are_swept_at_the_next_start(tmp_path):
    """kill -9 of an API server and its children leaves its socket directory and SHM
    segments; the next start on the same socket prefix removes them, and never what a
    live deployment there uses."""
    sockets = tmp_path / "sockets"
    args = ("--config", "testvla_single", "--preset", "tiny", "--load-format", "dummy",
            "--tensor-comm-protocol", "SHM")
    killed = Server(tmp_path, *args, sockets=sockets)
    live = Server(tmp_path, *args, sockets=sockets)
    third: Server | None = None
    try:
        for server in (killed, live):
            server.wait_healthy()
            assert server.generate(BIG_IMAGE).status_code == 200
        doomed = [killed.proc.pid, *children(killed.proc.pid)]
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)
        killed.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(running(pid) for pid in doomed):
            assert time.monotonic() < deadline, "the killed children did not exit"
            time.sleep(0.05)
        left = shm_segments(killed.deployment_id + "_")
        assert left and killed.socket_dir.exists()
        live_segments = shm_segments(live.deployment_id + "_")
        assert live_segments

        third = Server(tmp_path, *args, sockets=sockets)
        third.wait_healthy()
        assert not killed.socket_dir.exists()
        assert shm_segments(killed.deployment_id + "_") == []
        assert f"removed what deployment {killed.deployment_id} left behind" in third.output()
        assert live.deployment_id not in third.output()
        assert live.socket_dir.exists()
        assert set(live_segments) <= set(shm_segments(live.deployment_id + "_"))
        assert live.generate(BIG_IMAGE).status_code == 200
    finally:
        for server in (live, third):
            if server is not None:
                assert server.stop() == 0, server.output()
                server.assert_clean()


def running(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_a_second_server_on_a_port_in_use_fails_clearly(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Server(tmp_path, "--config", "testvla_single", "--preset", "tiny",
                        "--load-format", "dummy", port=port)
        assert server.proc.wait(timeout=30) == 1
    assert "cannot listen" in server.output()
    assert children(server.proc.pid) == []


@pytest.mark.timeout(300)
def test_three_ranks_launch_and_stop_three_times(tmp_path):
    config = tmp_path / "three.yaml"
    config.write_text("model: testvla\nmax_seq_len: 256\nnode_groups:\n"
                      "  - {node_names: [vision_encoder], ranks: [1]}\n"
                      "  - {node_names: [LLM, action_init, combine, cem_sample, cem_refit],"
                      " ranks: [0]}\n"
                      "  - {node_names: [consumer], ranks: [2]}\n")
    saw_503 = False
    for i in range(3):
        server = Server(tmp_path, "--config", str(config), "--preset", "tiny",
                        "--load-format", "dummy")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # a request during start-up: 503
                try:
                    r = server.generate({"prompt": "hi", "max_tokens": 2})
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                if r.status_code == 503:
                    saw_503 = True
                    assert "retry-after" in r.headers
                    time.sleep(0.05)
                    continue
                assert r.status_code == 200, r.text
                break
            else:
                raise AssertionError(f"launch {i} not serving in 60 s:\n{server.output()}")
        finally:
            assert server.stop() == 0, server.output()
        server.assert_clean()
    assert saw_503
