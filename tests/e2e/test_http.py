"""The HTTP API over an in-process deployment: `/generate` (JSON and SSE), `/health`,
`/v1/models`, `/metrics`, errors in OpenAI's shape, request ids, API keys, streams whose
client leaves, saturation, timeouts and a dead worker. Each app is served by uvicorn on a
free 127.0.0.1 port and talked to with httpx."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Iterator

import httpx
import pydantic
import pytest
import torch
from conftest import image, serving, wait_for
from fastapi import Request
from prometheus_client.parser import text_string_to_metric_families

import mstar
from mstar import events
from mstar.api_server.app import create_app
from mstar.config.settings import ServerSettings
from mstar.serving.backends import LocalBackend

pytestmark = pytest.mark.timeout(60)

BODY_LIMIT = 64 * 1024
TEXT = {"prompt": "hello", "max_tokens": 8, "temperature": 0}
ACT = {"prompt": "<image>pick up", "image": image(1), "mode": "act", "num_steps": 4,
       "guidance_scale": 2.0, "seed": 5}


def settings(**overrides) -> ServerSettings:
    return ServerSettings(**{"api_key": None, "timeout": 30.0, "max_body_bytes": BODY_LIMIT,
                             **overrides})


@pytest.fixture(scope="module")
def dep():
    d = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=256)
    yield d
    d.close()


@pytest.fixture(scope="module")
def backend(dep) -> LocalBackend:
    return LocalBackend(dep)


@pytest.fixture(scope="module")
def client(backend) -> Iterator[httpx.Client]:
    with serving(create_app(backend, settings())) as c:
        yield c


def idle(dep) -> None:
    """Every request released: no pages held, nothing live in the frontend."""
    wait_for(lambda: dep.pages_in_use() == 0 and dep.frontend.live_requests() == 0)


def sse_frames(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE frame, checking the framing on the way."""
    assert text.endswith("\n\n"), text[-50:]
    frames = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        name = lines.pop(0).removeprefix("event: ") if lines[0].startswith("event: ") else None
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        frames.append((name, lines[0].removeprefix("data: ")))
    return frames


def stream_events(text: str) -> list[dict]:
    """The events of a finished SSE stream (event names match the JSON tags)."""
    frames = sse_frames(text)
    assert frames[-1] == (None, "[DONE]")
    out = [json.loads(data) for _, data in frames[:-1]]
    assert [name for name, _ in frames[:-1]] == [e["event"] for e in out]
    return out


def token_ids(evs: list[dict]) -> list[int]:
    return [t for e in evs if e["event"] == "text_delta" for t in e["token_ids"]]


def tensor(data: dict) -> torch.Tensor:
    raw = bytearray(base64.b64decode(data["data"]))
    return torch.frombuffer(raw, dtype=getattr(torch, data["dtype"])).reshape(data["shape"])


def assert_error(response: httpx.Response, status: int, *, mentions: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status or isinstance(error["code"], str), error
    assert mentions in f"{error['param']} {error['message']}", error
    return error


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def requests_total(metrics: dict, status: str) -> float:
    return metrics[("mstar_requests_total", (("status", status),))]


# -- /generate --------------------------------------------------------------------------------
def test_generate_json_matches_the_in_process_api(client, dep):
    r = client.post("/generate", json=TEXT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == r.headers["x-request-id"]
    assert body["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 8
    assert body["events"][-1]["event"] == "finished"
    deltas = [e for e in body["events"] if e["event"] == "text_delta"]
    assert body["text"] == ["".join(e["text"] for e in deltas)]
    local = [t for e in dep.generate(TEXT) if isinstance(e, events.TextDelta)
             for t in e.token_ids]
    assert token_ids(body["events"]) == local
    idle(dep)


def test_generate_streams_sse_frames_then_done(client, dep):
    r = client.post("/generate", json={**TEXT, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    streamed = stream_events(r.text)
    assert streamed[-1]["event"] == "finished" and streamed[-1]["reason"] == "length"
    assert token_ids(streamed) == token_ids(client.post("/generate", json=TEXT).json()["events"])
    idle(dep)


def test_act_streams_the_actions_tensor(client, dep):
    r = client.post("/generate", json={**ACT, "stream": True})
    assert r.status_code == 200, r.text
    (actions,) = [e for e in stream_events(r.text) if e["event"] == "tensor"]
    assert actions["name"] == "actions"
    (local,) = [e.tensor.to_tensor() for e in dep.generate(ACT)
                if isinstance(e, events.NamedTensor)]
    torch.testing.assert_close(tensor(actions["tensor"]), local, atol=1e-5, rtol=1e-5)
    idle(dep)


def test_streamed_consumer_gives_audio_chunks(client, dep):
    r = client.post("/generate", json={**TEXT, "stream_consumer": True})
    assert r.status_code == 200, r.text
    chunks = [e for e in r.json()["events"] if e["event"] == "audio_chunk"]
    assert chunks and all(c["sample_rate"] > 0 for c in chunks)
    samples = torch.cat([tensor(c["samples"]) for c in chunks])
    assert samples.dtype == torch.float32 and samples.numel() > 0
    assert samples.abs().max() <= 1.0
    idle(dep)


# -- describing the deployment ------------------------------------------------------------------
def test_health_and_models(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (entry,) = models["data"]
    assert entry["id"] == "testvla" and entry["object"] == "model"
    assert entry["owned_by"] == "mstar" and isinstance(entry["created"], int)
    assert "actions" in entry["capabilities"] and entry["max_model_len"] == 256


def test_metrics_count_requests_tokens_and_latencies(client, dep):
    before = scrape(client)
    for name in ("mstar_queue_depth", "mstar_running_requests", "mstar_kv_pages_in_use",
                 "mstar_output_tokens_total", "mstar_time_to_first_output_seconds_count",
                 "mstar_inter_token_latency_seconds_count"):
        assert (name, ()) in before, name
    assert client.post("/generate", json=TEXT).status_code == 200
    assert client.post("/generate", json={"max_tokens": 2}).status_code == 400
    after = scrape(client)
    assert requests_total(after, "ok") == requests_total(before, "ok") + 1
    assert requests_total(after, "error") == requests_total(before, "error") + 1
    assert after[("mstar_output_tokens_total", ())] == before[("mstar_output_tokens_total", ())] + 8
    for hist, added in (("mstar_time_to_first_output_seconds_count", 1),
                        ("mstar_inter_token_latency_seconds_count", 7)):
        assert after[(hist, ())] == before[(hist, ())] + added, hist
    step = ("mstar_step_seconds", (("node", "LLM"), ("rank", "0")))
    wait_for(lambda: step in scrape(client), timeout=5)
    assert scrape(client)[step] > 0
    idle(dep)


# -- request ids --------------------------------------------------------------------------------
def test_request_id_is_echoed_used_by_the_runtime_or_generated(client, dep):
    r = client.post("/generate", json=TEXT, headers={"x-request-id": "client-id-42"})
    assert r.headers["x-request-id"] == "client-id-42" and r.json()["id"] == "client-id-42"
    assert any(e["request_id"] == "client-id-42" for s in dep.step_log("LLM") for e in s.entries)
    for bad in ("has spaces", "x" * 200):
        generated = client.get("/health", headers={"x-request-id": bad}).headers["x-request-id"]
        assert generated.startswith("req-")
    a, b = client.get("/nope"), client.get("/nope")
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    idle(dep)


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("content, mentions", [
    (b'{"prompt": "hi",', "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "hi", "temperature": -1}).encode(), "temperature"),
    (json.dumps({"max_tokens": 4}).encode(), "prompt"),
    (json.dumps({"prompt": "hi", "max_tokens": 1000}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x" * 300}).encode(), "prompt"),
    (json.dumps({"prompt": "hi", "stream": "yes"}).encode(), "stream"),
])
def test_bad_input_is_a_400_in_openai_shape(client, content, mentions):
    r = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert assert_error(r, 400, mentions=mentions)["type"] == "invalid_request_error"
    assert r.headers["x-request-id"]


def test_oversize_body_is_413_declared_or_streamed(client):
    big = json.dumps({"prompt": "x" * BODY_LIMIT}).encode()
    assert_error(client.post("/generate", content=big), 413, mentions="limit")

    def chunked():  # no Content-Length: the size is counted as the body arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    assert_error(client.post("/generate", content=chunked()), 413, mentions="limit")


def test_unknown_route_and_wrong_method_are_json(client):
    assert assert_error(client.get("/nope"), 404)["type"] == "not_found_error"
    assert_error(client.get("/generate"), 405)


class Typed(pydantic.BaseModel):
    n: int


def test_unhandled_errors_and_validation_errors_keep_the_error_shape(backend):
    """Routes added to the app (later OpenAI routes with pydantic bodies) get the same
    error handling: a crash is a 500 carrying the request id and no trace, a FastAPI
    validation error a 400 naming the field."""
    app = create_app(backend, settings())

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    @app.post("/typed")
    async def typed(body: Typed) -> dict:
        return {"n": body.n}

    @app.post("/boom-after-finish")
    async def boom_after_finish(request: Request) -> None:
        recorder = request.state.recorder = app.state.metrics.request()
        recorder.finish("ok")  # the events said it finished, then building the answer failed
        raise RuntimeError("secret internals")

    with serving(app) as c:
        r = c.get("/boom", headers={"x-request-id": "boom-1"})
        error = assert_error(r, 500, mentions="boom-1")
        assert error["type"] == "server_error" and r.headers["x-request-id"] == "boom-1"
        assert "secret" not in r.text and "Traceback" not in r.text
        before = scrape(c)
        assert_error(c.post("/boom-after-finish"), 500)
        after = scrape(c)
        assert requests_total(after, "error") == requests_total(before, "error") + 1
        assert requests_total(after, "ok") == requests_total(before, "ok")
        assert assert_error(c.post("/typed", json={"n": "many"}), 400)["param"] == "n"
        assert c.post("/typed", json={"n": 3}).json() == {"n": 3}


def test_api_key_guards_every_route_but_health(backend, dep):
    with serving(create_app(backend, settings(api_key="sekrit"))) as keyed:
        for path in ("/v1/models", "/metrics"):
            r = keyed.get(path)
            assert assert_error(r, 401)["type"] == "authentication_error"
            assert_error(keyed.get(path, headers={"Authorization": "Bearer nope"}), 401)
            assert keyed.get(path, headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert_error(keyed.post("/generate", json=TEXT), 401)
        ok = keyed.post("/generate", json=TEXT, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200 and ok.json()["finish_reason"] == "length"
        assert keyed.get("/health").status_code == 200
    idle(dep)


# -- cancellation, timeouts, saturation, failure -------------------------------------------------
def test_client_leaving_a_stream_cancels_its_request(client, dep):
    before = scrape(client)
    rid, max_tokens = "leaves-early", 200
    # the slow consumer makes the request take seconds, so it cannot end on its own first
    body = {"prompt": "go", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_consumer": True, "consumer_delay_s": 0.02}
    with client.stream("POST", "/generate", json=body, headers={"x-request-id": rid}) as r:
        assert r.status_code == 200
        received = 0
        for line in r.iter_lines():
            received += line.startswith("data: ")
            if received == 2:
                break
    idle(dep)
    steps = len(dep.step_log("LLM"))
    ran = sum(e["request_id"] == rid for s in dep.step_log("LLM") for e in s.entries)
    assert 0 < ran < max_tokens // 2
    wait_for(lambda: requests_total(scrape(client), "abort") == requests_total(before, "abort")
             + 1, timeout=5)
    assert client.post("/generate", json=TEXT).status_code == 200  # the engine steps on
    later = list(dep.step_log("LLM"))[steps:]
    assert later and all(e["request_id"] != rid for s in later for e in s.entries), \
        "the engine kept stepping the cancelled request"


def test_client_leaving_a_json_request_cancels_it(client, dep):
    rid, max_tokens = "gives-up", 200
    body = json.dumps({"prompt": "go", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream_consumer": True, "consumer_delay_s": 0.02}).encode()

    def ran() -> int:
        return sum(e["request_id"] == rid for s in dep.step_log("LLM") for e in s.entries)

    url = client.base_url
    with socket.create_connection((url.host, url.port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\nx-request-id: %s\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (rid.encode(), len(body), body))
        wait_for(lambda: ran() > 0)  # it runs; then the client leaves without an answer
    idle(dep)
    assert 0 < ran() < max_tokens // 2


def test_silent_request_times_out_with_504(backend, dep):
    """The consumer's stall (4 s, a sleep: never shorter) is far past the timeout, the
    first token (milliseconds) far inside it, so machine load cannot flip the outcome."""
    slow = {"prompt": "go", "max_tokens": 8, "stream_consumer": True, "consumer_delay_s": 4.0}
    with serving(create_app(backend, settings(timeout=1.5))) as hasty:
        assert_error(hasty.post("/generate", json=slow), 504, mentions="no output")
        idle(dep)
        r = hasty.post("/generate", json={**slow, "stream": True})
        assert r.status_code == 200  # the first token came in time; the stream then stalls
        frames = sse_frames(r.text)
        assert frames[0][0] == "text_delta" and frames[-1][0] == "error"
        assert json.loads(frames[-1][1])["code"] == 504
        assert requests_total(scrape(hasty), "timeout") == 2
    idle(dep)


def test_saturation_answers_429_with_retry_after_and_never_hangs():
    d = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=256,
                   max_concurrent_requests=2)
    try:
        with serving(create_app(LocalBackend(d), settings())) as small:
            url = str(small.base_url)

            chat = {"model": "testvla", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 16, "ignore_eos": True}

            async def flood() -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=url, timeout=30) as ac:
                    return await asyncio.gather(*(
                        ac.post("/generate", json={**TEXT, "max_tokens": 16, "seed": i})
                        if i % 2 else ac.post("/v1/chat/completions", json={**chat, "seed": i})
                        for i in range(20)))

            responses = asyncio.run(flood())
            codes = [r.status_code for r in responses]
            assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
            for r in responses:
                if r.status_code == 429:
                    assert_error(r, 429)
                    assert int(r.headers["retry-after"]) >= 1
                else:
                    assert r.json()["usage"]["completion_tokens"] == 16
            metrics = scrape(small)
            assert requests_total(metrics, "rejected") == codes.count(429)
            assert requests_total(metrics, "ok") == codes.count(200)
            idle(d)
    finally:
        d.close()


def test_requests_within_the_limit_are_never_refused():
    """Pairs of simultaneous requests under a limit of 2: a request counts once while it is
    being submitted, also when the backend has already registered it (it was counted twice,
    a false 429)."""
    d = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=256,
                   max_concurrent_requests=2)
    try:
        with serving(create_app(LocalBackend(d), settings())) as small:
            url = str(small.base_url)

            async def pair() -> list[int]:
                async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
                    return [r.status_code for r in await asyncio.gather(*(
                        ac.post("/generate", json={**TEXT, "max_tokens": 2, "seed": i})
                        for i in range(2)))]

            for _ in range(20):
                assert asyncio.run(pair()) == [200, 200]
                idle(d)
    finally:
        d.close()


def test_a_dead_worker_turns_health_unhealthy():
    d = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=256)
    try:
        with serving(create_app(LocalBackend(d), settings())) as c:
            assert c.get("/health").status_code == 200
            d.frontend.ready.clear()  # as before the workers reported in
            r = c.get("/health")
            assert r.status_code == 503 and r.json() == {"status": "starting"}
            starting = assert_error(c.post("/generate", json=TEXT), 503, mentions="starting")
            assert starting["type"] == "server_error"
            assert c.post("/generate", json=TEXT).headers["retry-after"] == "1"
            d.frontend.ready.set()
            assert c.post("/generate", json=TEXT).status_code == 200
            d.workers[0].stop()
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "unhealthy"
            assert "worker:0" in r.json()["detail"] and r.headers["retry-after"] == "1"
            r = c.post("/generate", json=TEXT)
            assert_error(r, 503, mentions="worker:0")
            assert r.headers["retry-after"] == "1"
    finally:
        d.close()
