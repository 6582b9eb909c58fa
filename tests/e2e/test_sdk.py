"""The Python SDK (`mstar.MStarClient`, `mstar.AsyncMStarClient`) against a real
`mstar-serve`: native `/generate` (JSON and SSE, decoded into `mstar.events`), models and
health, typed errors carrying the server's message and request id, API keys, timeouts, and
retries of refused connections, 503 "starting" and 429. The SSE decoder and the retry
policy, which both clients share, are checked on their own at the end."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serving_harness import Server, free_port, running_keyed

import mstar
from mstar import events
from mstar.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncMStarClient,
    AuthenticationError,
    BadRequestError,
    GenerateResponse,
    InternalServerError,
    MStarClient,
)
from mstar.client._protocol import MAX_RETRY_DELAY_S, RetryPolicy, parse_retry_after
from mstar.client._sse import SSEDecoder, SSEFrame

KEY = "sdk-test-key"
#: A greedy, seeded text request.
TEXT = {"prompt": "hello", "max_tokens": 8, "temperature": 0, "seed": 3}
#: A request that runs at least 20 s (the streamed consumer sleeps 0.1 s in each of its ~200
#: windows), past the module server's 10 s request timeout; every other request ends far
#: inside it (sleeps only lengthen LONG, so machine load cannot flip either).
LONG = {"prompt": "long", "max_tokens": 200, "ignore_eos": True, "stream_consumer": True,
        "consumer_delay_s": 0.1}
ACT = {"prompt": "pick up", "mode": "act", "num_steps": 2, "seed": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """Keyed, a 10 s request timeout, at most two requests at once."""
    with running_keyed(tmp_path_factory.mktemp("sdk"), KEY, "--config", "testvla_single",
                       "--preset", "tiny", "--load-format", "dummy", "--timeout", "10",
                       "--set", "max_concurrent_requests=2") as server:
        yield server


@pytest.fixture
def client(server: Server):
    with MStarClient(server.url, api_key=KEY) as c:
        yield c


def raw(server: Server) -> httpx.Client:
    """A plain httpx client with the key, to compare the SDK with the wire."""
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=30)


def token_ids(evs: list[events.Event]) -> list[int]:
    return [t for e in evs if isinstance(e, events.TextDelta) for t in e.token_ids]


def retry_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mstar.client"]


# -- native /generate ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_generate_decodes_the_events_of_the_json_answer(client, server):
    r = client.generate(TEXT)
    assert isinstance(r, GenerateResponse)
    assert isinstance(r.events[-1], events.Finished) and r.finish_reason == "length"
    assert r.usage == events.Usage(prompt_tokens=r.usage.prompt_tokens, completion_tokens=8)
    deltas = [e for e in r.events if isinstance(e, events.TextDelta)]
    assert r.text == ["".join(d.text for d in deltas)] and len(deltas) == 8
    assert r.id == r.request_id == r.raw["id"]
    with raw(server) as c:
        wire = c.post("/generate", json=TEXT).json()
    assert token_ids(r.events) == [t for e in wire["events"] if e["event"] == "text_delta"
                                   for t in e["token_ids"]]
    # keyword fields equal the dict, and win over it
    assert client.generate(**TEXT).text == r.text
    assert client.generate(TEXT, max_tokens=3).usage.completion_tokens == 3


@pytest.mark.timeout(60)
def test_streamed_generate_equals_the_json_answer(client):
    with client.generate(TEXT, stream=True) as stream:
        streamed = list(stream)
    assert stream.request_id
    assert isinstance(streamed[-1], events.Finished) and streamed[-1].reason == "length"
    whole = client.generate(TEXT)
    assert "".join(getattr(e, "text", "") for e in streamed) == whole.text[0]
    assert token_ids(streamed) == token_ids(whole.events)


@pytest.mark.timeout(60)
def test_tensor_outputs_arrive_as_bytes_streamed_or_not(client):
    (actions,) = [e for e in client.generate(ACT).events if isinstance(e, events.NamedTensor)]
    assert actions.name == "actions" and actions.tensor.dtype == "float32"
    count = actions.tensor.shape[0] * actions.tensor.shape[1]
    assert len(actions.tensor.data) == 4 * count > 0
    streamed = [e for e in client.generate(ACT, stream=True)
                if isinstance(e, events.NamedTensor)]
    assert streamed == [actions]


@pytest.mark.timeout(60)
def test_models_and_health(client):
    (model,) = client.models()
    assert model.id == "testvla" and "chat" in model.capabilities
    assert isinstance(model.max_model_len, int) and model.raw["object"] == "model"
    assert client.health() == {"status": "ok"}


@pytest.mark.timeout(60)
def test_leaving_a_stream_early_ends_the_request_on_the_server(client, server):
    aborted = server.metric('mstar_requests_total{status="abort"}', 0.0)
    stream = client.generate(LONG, stream=True)
    assert isinstance(next(stream), events.TextDelta)
    stream.close()
    server.wait_idle()
    assert server.metric('mstar_requests_total{status="abort"}') == aborted + 1


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_bad_input_is_a_bad_request_error_with_the_servers_message(client, server):
    bad = {"prompt": "hi", "max_tokens": 1000}
    with pytest.raises(BadRequestError) as info:
        client.generate(bad)
    with raw(server) as c:
        wire = c.post("/generate", json=bad).json()["error"]
    error = info.value
    assert error.status == 400 and error.message == wire["message"]
    assert error.param == "max_tokens" and error.type == "invalid_request_error"
    assert error.request_id and error.request_id in str(error)
    with pytest.raises(BadRequestError):  # refused before the stream starts
        client.generate(bad, stream=True)


@pytest.mark.timeout(60)
def test_an_error_event_inside_a_stream_raises_its_class(client, server):
    stream = client.generate(LONG, stream=True)
    received = []
    with pytest.raises(InternalServerError) as info:
        for event in stream:
            received.append(event)
    assert any(isinstance(e, events.TextDelta) for e in received)
    assert not any(isinstance(e, events.Finished | events.Error) for e in received)
    assert info.value.status == 504 and "timed out" in info.value.message
    assert info.value.request_id == stream.request_id
    server.wait_idle()


@pytest.mark.timeout(60)
def test_a_wrong_or_missing_key_is_an_authentication_error(server, monkeypatch):
    monkeypatch.delenv("MSTAR_API_KEY", raising=False)
    for key in ("wrong", None):
        with MStarClient(server.url, api_key=key) as c:
            with pytest.raises(AuthenticationError) as info:
                c.models()
            assert info.value.status == 401 and "API key" in info.value.message
            assert c.health()["status"] == "ok"  # the one unguarded route
    monkeypatch.setenv("MSTAR_API_KEY", KEY)
    with MStarClient(server.url) as c:
        assert c.models()[0].id == "testvla"


@pytest.mark.timeout(60)
def test_a_timeout_is_an_api_timeout_error_and_not_retried(server, caplog):
    with caplog.at_level(logging.INFO, logger="mstar.client"), \
            MStarClient(server.url, api_key=KEY, timeout=0.3, max_retries=2) as c:
        with pytest.raises(APITimeoutError):
            c.generate(LONG)
    assert retry_log(caplog) == []
    server.wait_idle()


@pytest.mark.timeout(30)
def test_no_retries_fail_at_once_and_retries_back_off(caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.INFO, logger="mstar.client"), \
            MStarClient(url, max_retries=0) as c:
        with pytest.raises(APIConnectionError) as info:
            c.generate(TEXT)
    assert retry_log(caplog) == []
    assert not isinstance(info.value, APITimeoutError) and url in str(info.value)
    with caplog.at_level(logging.INFO, logger="mstar.client"), \
            MStarClient(url, max_retries=2, backoff=0.1) as c:
        started = time.monotonic()
        with pytest.raises(APIConnectionError):
            c.models()
        assert time.monotonic() - started >= 0.3  # 0.1 s, then 0.2 s
    logged = retry_log(caplog)
    assert len(logged) == 2 and "retry 2 of 2 in 0.20 s" in logged[1]


@pytest.mark.timeout(90)
def test_a_client_waits_for_a_server_that_starts_later(tmp_path, caplog):
    """Refused connections (nothing listens yet) and 503 "starting" (listening, workers
    not ready) are both retried until the server answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    servers: list[Server] = []
    starter = threading.Timer(0.3, lambda: servers.append(
        Server(tmp_path, "--config", "testvla_single", "--preset", "tiny", "--load-format",
               "dummy", port=port)))
    answers: dict[str, GenerateResponse] = {}
    health: list[dict] = []

    def while_starting() -> None:
        """Asks as soon as the server listens (not ready yet: a 503 first)."""
        with MStarClient(url, max_retries=30, backoff=0.05) as c:
            while not health:
                try:
                    health.append(c.health())  # never retried: the state as it is
                except APIConnectionError:
                    time.sleep(0.02)
            answers["starting"] = c.generate(TEXT)

    prober = threading.Thread(target=while_starting)
    try:
        with caplog.at_level(logging.INFO, logger="mstar.client"), \
                MStarClient(url, max_retries=30, backoff=0.05) as c:
            starter.start()
            prober.start()
            answers["refused"] = c.generate(TEXT)
            prober.join(timeout=60)
        assert answers["refused"].text == answers["starting"].text
        assert health == [{"status": "starting"}]
        logged = retry_log(caplog)
        assert any("connection failed (ConnectError)" in m for m in logged), logged
        assert any("503 Service Unavailable" in m for m in logged), logged
    finally:
        starter.join()
        for s in servers:
            assert s.stop() == 0, s.output()
            s.assert_clean()


# -- the async client ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_async_client_basics_and_429_retries(server, caplog):
    async def main() -> None:
        # retries (1 s apart) until a slot frees, however slow the machine is
        async with AsyncMStarClient(server.url, api_key=KEY, max_retries=40) as c:
            assert await c.health() == {"status": "ok"}
            assert (await c.models())[0].id == "testvla"
            whole = await c.generate(TEXT)
            stream = await c.generate(TEXT, stream=True)
            streamed = [e async for e in stream]
            assert "".join(getattr(e, "text", "") for e in streamed) == whole.text[0]
            assert token_ids(streamed) == token_ids(whole.events)
            with pytest.raises(BadRequestError):
                await c.generate(prompt="hi", max_tokens=1000)
            with pytest.raises(BadRequestError):
                await c.generate(prompt="hi", max_tokens=1000, stream=True)
            # four at once where two fit: the others get 429 + Retry-After and try again
            flood = await asyncio.gather(*(c.generate(prompt=f"flood {i}", max_tokens=32,
                                                      ignore_eos=True) for i in range(4)))
            assert [r.usage.completion_tokens for r in flood] == [32] * 4

    with caplog.at_level(logging.INFO, logger="mstar.client"):
        asyncio.run(main())
    assert any("429 Too Many Requests" in m and "in 1.00 s" in m for m in retry_log(caplog))


# -- import weight ------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_the_client_imports_without_torch():
    code = ("import sys, mstar; mstar.MStarClient; mstar.AsyncMStarClient; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi')]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert mstar.MStarClient is MStarClient


# -- the shared protocol pieces -------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_sse_decoder_follows_the_framing_rules():
    lines = [": a comment", "event: text_delta", "data: {\"a\":", "data:1}", "", "",
             "id: 7", "data: [DONE]", ""]
    decoder = SSEDecoder()
    frames = [f for line in lines if (f := decoder.feed(line)) is not None]
    assert frames == [SSEFrame("text_delta", '{"a":\n1}'), SSEFrame(None, "[DONE]")]


@pytest.mark.timeout(10)
def test_retry_policy_backs_off_honours_retry_after_and_stops():
    policy = RetryPolicy(max_retries=3, backoff=0.5)
    assert [policy.delay(i) for i in range(4)] == [0.5, 1.0, 2.0, None]
    assert policy.delay(0, "3") == 3.0 and policy.delay(0, "1000") == MAX_RETRY_DELAY_S
    assert policy.delay(0, "soon") == 0.5  # unreadable: the backoff
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
    assert 3.5 < parse_retry_after(date) <= 5.0
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
