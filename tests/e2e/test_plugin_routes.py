"""Routes a plugin adds (`mstar_register_routes`), through a real `mstar-serve` of testvla:
its policy routes (`POST /v1/testvla/act`, the WebSocket `/v1/testvla/policy`) run on
core's plumbing: the API key (HTTP and WebSocket; `Bearer` or `Api-Key`), request ids,
metrics, 400s naming the field, cancellation when the client leaves; and they exist only
when the model declares their capability. With `--policy-ws-port`, testvla's JSON-framed
policy socket (a codec of its own) is served on that port too, as a robot protocol is
(openpi's clients connect to `ws://host:port`), with `/healthz`; a port in use fails the
start naming it."""

from __future__ import annotations

import socket

import httpx
import msgspec
import pytest
import torch
from conftest import image, wait_for
from fastapi.testclient import TestClient
from serving_harness import Server, free_port, running
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

import mstar
from mstar.api_server.app import create_app
from mstar.api_server.backend import ModelInfo
from mstar.api_server.plugin_routes import MAX_FRAMES_AHEAD
from mstar.config.settings import ServerSettings
from mstar.events import TensorData
from mstar.serving.backends import LocalBackend

pytestmark = pytest.mark.timeout(120)

KEY = "sk-plugin-routes"
AUTH = {"Authorization": f"Bearer {KEY}"}
OBS = {"prompt": "stack the cups", "image": image(7), "num_steps": 3,
       "guidance_scale": 2.0, "seed": 11}
#: An observation that runs for seconds (1000 denoising steps with CFG): still running
#: when its client leaves, however loaded the machine.
SLOW = {**OBS, "num_steps": 1000}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running(tmp_path_factory.mktemp("plugin-routes"), "--config", "testvla_single",
                 "--preset", "tiny", "--load-format", "dummy", "--api-key", KEY) as srv:
        srv.client.headers.update(AUTH)
        yield srv


def ws_url(server: Server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/testvla/policy"


def requests_counted(server: Server, status: str) -> float:
    return server.metric(f'mstar_requests_total{{status="{status}"}}')


def actions(answer: dict) -> torch.Tensor:
    return msgspec.convert(answer["actions"], TensorData).to_tensor()


def generated_actions(server: Server, obs: dict) -> torch.Tensor:
    """The same observation through the model's own `/generate`."""
    response = server.generate({**obs, "mode": "act"})
    assert response.status_code == 200, response.text
    tensor, = [e["tensor"] for e in response.json()["events"]
               if e["event"] == "tensor" and e["name"] == "actions"]
    return msgspec.convert(tensor, TensorData).to_tensor()


def test_act_runs_the_model_with_a_request_id_and_is_counted(server):
    ok = requests_counted(server, "ok")
    response = server.client.post("/v1/testvla/act", json=OBS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == response.headers["x-request-id"]
    mine = server.client.post("/v1/testvla/act", json=OBS,
                              headers={"x-request-id": "robot-7"})
    assert mine.headers["x-request-id"] == mine.json()["id"] == "robot-7"
    got = actions(body)
    assert got.shape == (4, 4)
    torch.testing.assert_close(got, generated_actions(server, OBS))
    assert requests_counted(server, "ok") == ok + 3  # both act calls and the /generate


def test_act_and_the_policy_socket_need_the_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(server.url + "/v1/testvla/act", json=OBS, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(server), additional_headers=headers, open_timeout=30)
        assert refused.value.response.status_code == 401
        assert b"invalid or missing API key" in refused.value.response.body


@pytest.mark.parametrize("body, param", [
    ({**OBS, "num_steps": "many"}, "num_steps"),
    ({**OBS, "num_steps": 0}, "num_steps"),
    ({**OBS, "image": "a cat"}, "image"),
    ({**OBS, "gripper": 1.0}, "gripper"),
    ({"image": image(1)}, "prompt"),
])
def test_bad_observations_are_400_naming_the_field(server, body, param):
    errors = requests_counted(server, "error")
    response = server.client.post("/v1/testvla/act", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert requests_counted(server, "error") == errors + 1


def test_the_policy_socket_answers_observation_after_observation(server):
    ok, errors = requests_counted(server, "ok"), requests_counted(server, "error")
    with connect(ws_url(server), additional_headers=AUTH, open_timeout=30) as ws:
        connection = ws.response.headers["x-request-id"]
        hello = msgspec.msgpack.decode(ws.recv(timeout=30))
        assert hello == {"protocol": "testvla-policy/1", "model": "testvla"}
        seen = []
        for seed in (11, 12, 13):
            ws.send(msgspec.msgpack.encode({**OBS, "seed": seed}))
            answer = msgspec.msgpack.decode(ws.recv(timeout=60))
            assert answer["id"] == f"{connection}-{len(seen) + 1}"
            seen.append(actions(answer))
        # a bad frame is answered with the error; the connection goes on
        ws.send(msgspec.msgpack.encode({**OBS, "num_steps": "many"}))
        error = msgspec.msgpack.decode(ws.recv(timeout=30))
        assert error["id"] == f"{connection}-4" and error["error"]["param"] == "num_steps"
        ws.send(b"\xc1")
        assert "not valid msgpack" in msgspec.msgpack.decode(ws.recv(timeout=30))[
            "error"]["message"]
        ws.send(msgspec.json.encode(OBS).decode())  # a text frame
        assert "msgpack in binary frames" in msgspec.msgpack.decode(ws.recv(timeout=30))[
            "error"]["message"]
        ws.send(msgspec.msgpack.encode(OBS))
        again = msgspec.msgpack.decode(ws.recv(timeout=60))
    torch.testing.assert_close(actions(again), seen[0])  # the same seed, the same chunk
    torch.testing.assert_close(seen[0], generated_actions(server, OBS))
    assert not torch.equal(seen[0], seen[1])
    assert requests_counted(server, "ok") == ok + 5  # four frames and the /generate
    assert requests_counted(server, "error") == errors + 3


def _post_and_leave(server: Server) -> None:
    """Send a slow act request on a raw connection and close it once it runs."""
    body = msgspec.json.encode(SLOW)
    head = (f"POST /v1/testvla/act HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            f"{KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + body)
        wait_for(lambda: server.metric("mstar_running_requests") == 1, timeout=30)


def _send_and_leave(server: Server) -> None:
    """Send a slow observation on the policy socket and close it once it runs."""
    with connect(ws_url(server), additional_headers=AUTH, open_timeout=30) as ws:
        ws.recv(timeout=30)  # the hello
        ws.send(msgspec.msgpack.encode(SLOW))
        wait_for(lambda: server.metric("mstar_running_requests") == 1, timeout=30)


@pytest.mark.parametrize("leave", [_post_and_leave, _send_and_leave], ids=["http", "ws"])
def test_a_client_that_leaves_cancels_its_request(server, leave):
    aborted, ok = requests_counted(server, "abort"), requests_counted(server, "ok")
    leave(server)
    # cancelled long before its 1000 steps could finish, and everything freed
    wait_for(lambda: requests_counted(server, "abort") == aborted + 1, timeout=30)
    server.wait_idle()
    assert requests_counted(server, "ok") == ok


def test_a_client_far_ahead_of_its_answers_is_closed_and_its_request_cancelled(server):
    aborted = requests_counted(server, "abort")
    with connect(ws_url(server), additional_headers=AUTH, open_timeout=30) as ws:
        ws.recv(timeout=30)  # the hello
        for _ in range(MAX_FRAMES_AHEAD + 2):  # one runs, the others wait
            ws.send(msgspec.msgpack.encode(SLOW))
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1008 and "frames ahead" in closed.value.rcvd.reason
    wait_for(lambda: requests_counted(server, "abort") == aborted + 1, timeout=30)
    server.wait_idle()


class _WithoutPolicy(LocalBackend):
    """testvla as a model that does not declare "testvla_policy"."""

    def model_info(self) -> ModelInfo:
        info = super().model_info()
        return {**info, "capabilities": [c for c in info["capabilities"]
                                         if c != "testvla_policy"]}


def test_the_routes_exist_only_with_their_capability():
    deployment = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=64)
    try:
        with TestClient(create_app(_WithoutPolicy(deployment),
                                   ServerSettings(api_key=None))) as http:
            assert http.post("/v1/testvla/act", json=OBS).status_code == 404
            with pytest.raises(WebSocketDisconnect), \
                    http.websocket_connect("/v1/testvla/policy"):
                pass  # no route: the handshake is closed unanswered (403 from a server)
            assert "/v1/testvla/act" not in http.get("/openapi.json").json()["paths"]
        with TestClient(create_app(LocalBackend(deployment),
                                   ServerSettings(api_key=None))) as http:
            assert "/v1/testvla/act" in http.get("/openapi.json").json()["paths"]
    finally:
        deployment.close()


def test_a_policy_socket_is_named_by_the_clients_request_id(server):
    """As an HTTP request is, a connection is named by the client's sane `x-request-id`
    (its frames' ids follow it); an insane one is replaced by a new id."""
    headers = {**AUTH, "x-request-id": "robot-7"}
    with connect(ws_url(server), additional_headers=headers, open_timeout=30) as ws:
        assert ws.response.headers["x-request-id"] == "robot-7"
        ws.recv(timeout=30)  # hello
        ws.send(msgspec.msgpack.encode({**OBS, "seed": 1}))
        assert msgspec.msgpack.decode(ws.recv(timeout=60))["id"] == "robot-7-1"
    with connect(ws_url(server), additional_headers={**AUTH, "x-request-id": "bad id!"},
                 open_timeout=30) as ws:
        assert ws.response.headers["x-request-id"] not in ("bad id!", "")



# -- a websocket route in its own framing, on its own port ---------------------------------
@pytest.fixture(scope="module")
def policy_port_server(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    with running(tmp_path_factory.mktemp("policy-port"), "--config", "testvla_single",
                 "--preset", "tiny", "--load-format", "dummy", "--api-key", KEY,
                 "--policy-ws-port", str(port)) as srv:
        srv.client.headers.update(AUTH)
        yield srv, port


def json_frame(ws) -> dict:
    frame = ws.recv(timeout=60)
    assert isinstance(frame, str), frame  # JSON text frames, as the codec writes them
    return msgspec.json.decode(frame)


def test_the_own_port_serves_the_route_in_its_codec_and_goes_on_after_a_bad_frame(
        policy_port_server):
    server, port = policy_port_server
    want = generated_actions(server, OBS)
    ok, errors = requests_counted(server, "ok"), requests_counted(server, "error")
    api_key = {"Authorization": f"Api-Key {KEY}"}  # as openpi's client sends it
    for url in (f"ws://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/testvla/policy-json",
                server.url.replace("http://", "ws://") + "/v1/testvla/policy-json"):
        with connect(url, additional_headers=api_key, open_timeout=30) as ws:
            assert json_frame(ws) == {"protocol": "testvla-policy/1", "model": "testvla"}
            ws.send(msgspec.json.encode(OBS).decode())
            answer = json_frame(ws)
            assert set(answer) == {"actions"}  # no id: this codec's answers carry none
            torch.testing.assert_close(actions(answer), want)
            ws.send("{not json")
            assert json_frame(ws)["status"] == 400
            ws.send(msgspec.json.encode({**OBS, "num_steps": 0}).decode())
            error = json_frame(ws)
            assert error["status"] == 400 and "num_steps" in error["message"]
            ws.send(msgspec.json.encode(OBS).decode())  # the connection went on
            torch.testing.assert_close(actions(json_frame(ws)), want)
    assert requests_counted(server, "ok") == ok + 6
    assert requests_counted(server, "error") == errors + 6


def test_the_own_port_needs_the_api_key_and_answers_healthz(policy_port_server):
    server, port = policy_port_server
    for headers in ({}, {"Authorization": "Api-Key wrong"}, {"Authorization": "Bearer nope"}):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{port}", additional_headers=headers, open_timeout=30)
        assert refused.value.response.status_code == 401
    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
    assert health.status_code == 200 and health.text.strip() == "OK"
    assert httpx.get(f"http://127.0.0.1:{port}/generate", timeout=30).status_code == 404
    # the API key in either scheme, on every route of the main port
    for scheme in ("Bearer", "Api-Key"):
        assert httpx.get(server.url + "/v1/models", timeout=30, headers={
            "Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert httpx.get(server.url + "/v1/models", timeout=30, headers={
        "Authorization": f"Basic {KEY}"}).status_code == 401


def test_a_policy_port_in_use_fails_the_start_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Server(tmp_path, "--config", "testvla_single", "--preset", "tiny",
                        "--load-format", "dummy", "--policy-ws-port", str(port))
        assert server.proc.wait(timeout=60) == 1
    assert f"cannot listen on 127.0.0.1:{port} (--policy-ws-port)" in server.output()
