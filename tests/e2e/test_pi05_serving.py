"""Pi0.5 served (`mstar serve pi05 --preset tiny --load-format dummy`, with `--api-key`
and `--policy-ws-port`): `/generate` with camera images as data URLs, uploads and arrays;
the SDK's `client.act`; openpi's own client (`openpi_client`, PyPI 0.1.2, in a side venv:
it pins numpy < 2) speaking DROID and LIBERO observations on the policy port;
robots batched together (HTTP and websocket clients share prefill and denoising steps,
per-rank counters), a client that never reads or that leaves mid-call blocking no one and
leaking nothing; the encoder cache hit only by identical pixels; bad input, each a clear
error while the others keep being served; and `pi05_split` (the SigLIP encoder on rank 1)
running where its YAML says."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest
from conftest import wait_for
from placement_check import by_rank
from serving_harness import MSTAR, Server, free_port, running_keyed, sdk_client
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(300)

KEY = "sk-pi05-robots"
#: tiny's checkpoint shape (dummy weights): three cameras, 32-wide state and actions
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
HORIZON, STATE_DIM, ACTION_DIM = 50, 32, 32
#: flow steps that run for many seconds: a request still running when its client leaves
LONG_STEPS = 1000
#: Where `.ci/run` built the openpi client's venv (its python); unset: built here, cached.
OPENPI_PYTHON = "MSTAR_OPENPI_CLIENT_PYTHON"
OPENPI_VENV = Path.home() / ".cache" / "mstar" / "openpi-client-0.1.2"


def pixels(seed: int, side: int = 56) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (side, side, 3), dtype=np.uint8)


def png_url(image: np.ndarray) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def tensor(array: np.ndarray) -> dict:
    """The JSON tensor form of `/generate`."""
    array = np.ascontiguousarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode()}


def actions_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    out = response.json()["outputs"]["actions"]
    return np.frombuffer(base64.b64decode(out["data"]), dtype=out["dtype"]).reshape(
        out["shape"])


def body(view: int = 0, **fields) -> dict:
    """A `/generate` body: the three cameras as arrays (pixels seeded `view`, ...), an
    instruction, an 8-wide state; the noise seeded `view` unless `fields` say otherwise."""
    return {"images": {cam: tensor(pixels(view + i)) for i, cam in enumerate(CAMERAS)},
            "prompt": "pick up the red cup", "state": np.linspace(-1, 1, 8).tolist(),
            "seed": view, **fields}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mstar serve pi05 --preset tiny --load-format dummy` with a key and a policy port."""
    port = free_port()
    srv = Server(tmp_path_factory.mktemp("pi05"), "serve", "pi05", "--preset", "tiny",
                 "--load-format", "dummy", "--api-key", KEY, "--policy-ws-port", str(port),
                 cli=MSTAR)
    srv.policy_port = port
    srv.client.headers["Authorization"] = f"Bearer {KEY}"
    try:
        srv.wait_healthy()
        yield srv
    finally:
        assert srv.stop() == 0, srv.output()
    srv.assert_clean()


def openpi_python() -> str:
    """The side venv's python with openpi-client 0.1.2 (numpy < 2): `.ci/run` builds it and
    names it in $MSTAR_OPENPI_CLIENT_PYTHON; otherwise it is built once under ~/.cache."""
    if os.environ.get(OPENPI_PYTHON):
        return os.environ[OPENPI_PYTHON]
    python = OPENPI_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OPENPI_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "openpi-client==0.1.2",
                        "typing_extensions"], check=True)
    return str(python)


#: Runs in the side venv: connects with openpi's `WebsocketClientPolicy` per connection of
#: the plan (argv[1], JSON), infers each observation (an .npz file) and prints what came
#: back as JSON: the metadata, each answer (actions as a list) or the client's error.
OPENPI_CLIENT = r"""
import json, sys
import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy

plan = json.loads(sys.argv[1])
report = []
for conn in plan["connections"]:
    try:
        policy = WebsocketClientPolicy("127.0.0.1", plan["port"], api_key=conn["key"])
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        report.append({"refused": type(exc).__name__, "status": status})
        continue
    answers = []
    for path in conn["observations"]:
        loaded = np.load(path)
        obs = {k: str(v) if v.dtype.kind == "U" else v.item() if k in ("seed", "num_steps")
               else v for k, v in loaded.items()}
        try:
            out = policy.infer(obs)
            answers.append({"actions": out["actions"].tolist(),
                            "dtype": str(out["actions"].dtype),
                            "server_timing": sorted(out["server_timing"])})
        except RuntimeError as exc:
            answers.append({"error": str(exc)})
    report.append({"metadata": policy.get_server_metadata(), "answers": answers})
print(json.dumps(report))
"""


def droid(view: int, **extra) -> dict:
    return {"observation/exterior_image_1_left": pixels(view, 224),
            "observation/wrist_image_left": pixels(view + 1, 224),
            "observation/joint_position": np.linspace(-0.5, 0.5, 7),
            "observation/gripper_position": np.array([0.25]),
            "prompt": "put the marker in the cup", **extra}


def libero(view: int, **extra) -> dict:
    # openpi's LIBERO example is uint8 HWC; a float CHW [0, 1] image is read as its
    # `_parse_image` reads it
    return {"observation/image": pixels(view, 224),
            "observation/wrist_image": pixels(view + 1, 224).transpose(2, 0, 1) / 255.0,
            "observation/state": np.linspace(0, 1, 8), "prompt": "open the drawer", **extra}


def run_openpi(server: Server, tmp: Path, connections: list[tuple[str, list[dict]]]) -> list:
    """openpi's client against the policy port: per connection (API key, observations)."""
    plan = {"port": server.policy_port, "connections": []}
    for c, (key, observations) in enumerate(connections):
        paths = []
        for i, obs in enumerate(observations):
            paths.append(str(tmp / f"obs-{c}-{i}.npz"))
            np.savez(paths[-1], **{k: np.asarray(v) for k, v in obs.items()})
        plan["connections"].append({"key": key, "observations": paths})
    done = subprocess.run([openpi_python(), "-c", OPENPI_CLIENT, json.dumps(plan)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def generated(server: Server, **fields) -> np.ndarray:
    return actions_of(server.generate(fields))


# -- /generate and the SDK --------------------------------------------------------------------
def test_generate_takes_images_as_data_urls_uploads_and_arrays(server):
    images = {cam: pixels(i) for i, cam in enumerate(CAMERAS)}
    arrays = body(0)
    got = server.generate(arrays)
    want = actions_of(got)
    assert want.shape == (HORIZON, ACTION_DIM) and want.dtype == np.float32
    assert np.isfinite(want).all()
    assert got.json()["timing"]["total_ms"] > 0
    # the same pixels as PNG data URLs (lossless): the same chunk
    urls = {**arrays, "images": {cam: png_url(img) for cam, img in images.items()}}
    np.testing.assert_array_equal(actions_of(server.generate(urls)), want)
    # as multipart file parts named `images.<camera>`
    form = {"request": json.dumps({k: v for k, v in arrays.items() if k != "images"})}
    files = {}
    for cam, img in images.items():
        files[f"images.{cam}"] = (f"{cam}.png", base64.b64decode(
            png_url(img).split(",", 1)[1]), "image/png")
    uploaded = server.client.post("/generate", data=form, files=files)
    np.testing.assert_array_equal(actions_of(uploaded), want)
    # another seed, other noise; the robot's own action width
    assert not np.array_equal(actions_of(server.generate(body(0, seed=1))), want)
    np.testing.assert_array_equal(actions_of(server.generate(body(0, action_dim=7))),
                                  want[:, :7])


def test_sdk_act_returns_the_chunk_as_numpy(server):
    images = {cam: pixels(i) for i, cam in enumerate(CAMERAS)}
    with sdk_client(server, KEY) as client:
        actions = client.act(images=images, prompt="pick up the red cup",
                             state=np.linspace(-1, 1, 8).tolist(), seed=0)
    assert isinstance(actions, np.ndarray) and actions.shape == (HORIZON, ACTION_DIM)
    np.testing.assert_array_equal(actions, actions_of(server.generate(body(0))))


# -- openpi's client --------------------------------------------------------------------------
def test_openpi_client_speaks_droid_and_libero(server, tmp_path):
    bad_state = libero(3, seed=3)
    bad_state["observation/state"] = np.zeros(STATE_DIM + 1)
    (conn, wrong_key, no_key) = run_openpi(server, tmp_path, [
        (KEY, [droid(1, seed=5), libero(3, seed=3), bad_state, droid(1, seed=5)]),
        ("sk-wrong", [droid(1)]), ("", [droid(1)])])
    assert wrong_key == no_key == {"refused": "InvalidStatus", "status": 401}
    # openpi's health check, on the policy port
    health = httpx.get(f"http://127.0.0.1:{server.policy_port}/healthz", timeout=30)
    assert health.status_code == 200 and health.text == "OK\n"

    meta = conn["metadata"]
    assert meta["model"] == "pi05" and meta["action_horizon"] == HORIZON
    assert meta["cameras"] == list(CAMERAS) and meta["action_dim"] == ACTION_DIM
    assert meta["observation_formats"]["droid"]["action_dim"] == 8
    first, lib, error, again = conn["answers"]
    assert first["dtype"] == "float32" and first["server_timing"] == ["infer_ms"]
    assert np.asarray(first["actions"]).shape == (HORIZON, 8)  # openpi's DroidOutputs
    assert np.asarray(lib["actions"]).shape == (HORIZON, 7)  # its LiberoOutputs
    # a bad observation is the client's RuntimeError; the connection goes on
    assert "400" in error["error"] and f"1..{STATE_DIM}" in error["error"]
    assert again["actions"] == first["actions"]

    # the observations as the mapping says, through /generate: the same chunks
    d, li = droid(1), libero(3)
    want = generated(server, images={
        "base_0_rgb": tensor(d["observation/exterior_image_1_left"]),
        "left_wrist_0_rgb": tensor(d["observation/wrist_image_left"])},
        state=[*d["observation/joint_position"], 0.25], prompt=d["prompt"], seed=5,
        action_dim=8)
    np.testing.assert_allclose(np.asarray(first["actions"], np.float32), want, rtol=0, atol=0)
    wrist = (255 * li["observation/wrist_image"]).astype(np.uint8).transpose(1, 2, 0)
    want = generated(server, images={"base_0_rgb": tensor(li["observation/image"]),
                                     "left_wrist_0_rgb": tensor(wrist)},
                     state=li["observation/state"].tolist(), prompt=li["prompt"], seed=3,
                     action_dim=7)
    np.testing.assert_allclose(np.asarray(lib["actions"], np.float32), want, rtol=0, atol=0)


def ws(server: Server, **options):
    url = server.url.replace("http://", "ws://") + "/v1/pi05/policy"
    return connect(url, additional_headers={"Authorization": f"Api-Key {KEY}"},
                   open_timeout=30, max_size=None, **options)


def native(seed: int, **fields) -> bytes:
    """A native observation (data URL images: no numpy framing needed) as a frame."""
    return msgspec.msgpack.encode({
        "images": {"base_0_rgb": png_url(pixels(seed))}, "prompt": "wave",
        "state": [0.0, 0.5], "seed": seed, **fields})


def test_the_policy_socket_is_on_the_main_port_too(server):
    with ws(server) as conn:
        meta = msgspec.msgpack.decode(conn.recv(timeout=30))
        assert meta["model"] == "pi05"
        conn.send(native(2))
        answer = msgspec.msgpack.decode(conn.recv(timeout=60))
    packed = answer["actions"]
    actions = np.frombuffer(packed[b"data"], dtype=packed[b"dtype"]).reshape(
        packed[b"shape"])
    want = generated(server, images={"base_0_rgb": png_url(pixels(2))}, prompt="wave",
                     state=[0.0, 0.5], seed=2)
    np.testing.assert_array_equal(actions, want)


# -- many robots ------------------------------------------------------------------------------
def test_http_and_openpi_robots_share_batched_steps(server, tmp_path):
    server.wait_reported()
    before = {name: server.metric(f'{name}{{node="LLM",rank="0"}}') for name in
              ("mstar_batched_prompts_total", "mstar_batched_scratch_chunks_total")}
    ok = server.metric('mstar_requests_total{status="ok"}')

    def http_robot(i: int) -> list[np.ndarray]:
        with httpx.Client(base_url=server.url, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as client:
            return [actions_of(client.post("/generate", json=body(i, seed=i + k)))
                    for k in range(3)]

    def openpi_robot(i: int) -> list:
        (conn,) = run_openpi(server, tmp_path / str(i), [
            (KEY, [droid(i, seed=i + k) for k in range(3)])])
        return conn["answers"]

    for i in range(4):
        (tmp_path / str(i)).mkdir()
    with ThreadPoolExecutor(8) as pool:
        https = [pool.submit(http_robot, i) for i in range(4)]
        openpis = [pool.submit(openpi_robot, i) for i in range(4)]
        for f in https:
            assert all(a.shape == (HORIZON, ACTION_DIM) for a in f.result())
        for f in openpis:
            assert all(np.asarray(a["actions"]).shape == (HORIZON, 8) for a in f.result())
    assert server.metric('mstar_requests_total{status="ok"}') == ok + 24
    server.wait_reported()
    for name, was in before.items():
        assert server.metric(f'{name}{{node="LLM",rank="0"}}') > was, name
    server.wait_idle()


def test_a_robot_that_never_reads_its_answers_blocks_no_one(server):
    ok = server.metric('mstar_requests_total{status="ok"}')
    # stops reading from its socket once one frame waits unread
    with ws(server, max_queue=1) as silent:
        silent.recv(timeout=30)  # the metadata; its answers are not read
        for k in range(3):
            silent.send(native(10 + k))
        # other robots are served meanwhile, one after another
        for seed in (1, 2):
            assert generated(server, **body(seed)).shape == (HORIZON, ACTION_DIM)
        wait_for(lambda: server.metric('mstar_requests_total{status="ok"}') == ok + 5,
                 timeout=120)
        answers = [msgspec.msgpack.decode(silent.recv(timeout=30)) for _ in range(3)]
    assert all(b"__ndarray__" in a["actions"] for a in answers)
    server.wait_idle()


def test_a_robot_that_leaves_mid_call_cancels_its_request_and_leaks_nothing(server):
    server.wait_idle()
    aborted = server.metric('mstar_requests_total{status="abort"}')
    with ws(server) as leaving:
        leaving.recv(timeout=30)
        leaving.send(native(20, num_steps=LONG_STEPS))
        wait_for(lambda: server.metric("mstar_running_requests") == 1, timeout=60)
    # cancelled long before its flow steps could finish, every KV page back
    wait_for(lambda: server.metric('mstar_requests_total{status="abort"}') == aborted + 1,
             timeout=60)
    server.wait_idle(timeout=60)
    assert generated(server, **body(2)).shape == (HORIZON, ACTION_DIM)


# -- the encoder cache ------------------------------------------------------------------------
def encoder_hits(server: Server) -> float:
    server.wait_reported()
    return server.metric('mstar_encoder_cache_hits_total{node="vit_encoder",rank="0"}')


def test_the_encoder_cache_hits_only_identical_pixels(server):
    first = body(40, seed=1)
    server.generate(first).raise_for_status()
    hits = encoder_hits(server)
    server.generate(body(40, seed=2)).raise_for_status()  # same pixels, other noise
    assert encoder_hits(server) == hits + 1
    changed = pixels(40)
    changed[7, 9, 1] ^= 1  # one channel of one pixel
    server.generate({**first, "images": {**first["images"], CAMERAS[0]: tensor(changed)}}
                    ).raise_for_status()
    assert encoder_hits(server) == hits + 1


# -- bad input --------------------------------------------------------------------------------
NAN_STATE = tensor(np.array([0.0, np.nan, 1.0], np.float32))
BAD_HTTP = [
    ({"images": {**body(0)["images"], "extra_rgb": tensor(pixels(9))}}, "images", "camera"),
    ({"images": [tensor(pixels(i)) for i in range(4)]}, "images", "3"),
    ({"images": {CAMERAS[0]: "data:image/png;base64,bm90IGFuIGltYWdl"}}, "images", "image"),
    ({"state": [0.0] * (STATE_DIM + 1)}, "state", f"1..{STATE_DIM}"),
    ({"state": NAN_STATE}, "state", "finite"),
    ({"prompt": None}, "prompt", "prompt"),
]


@pytest.mark.parametrize("change, param, says", BAD_HTTP,
                         ids=["unknown-camera", "four-cameras", "not-an-image",
                              "state-length", "nan-state", "no-prompt"])
def test_bad_input_over_http_is_a_400_naming_it(server, change, param, says):
    request = {k: v for k, v in {**body(0), **change}.items() if v is not None}
    response = server.generate(request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"] or "").startswith(param) and says in error["message"], error
    assert generated(server, **body(3)).shape == (HORIZON, ACTION_DIM)


def test_bad_observations_over_the_socket_are_error_frames(server):
    good = native(4)
    bad = [
        (native(4, images={"base_0_rgb": png_url(pixels(1)), "nope_rgb": png_url(pixels(2))}),
         "camera"),
        (native(4, images=[png_url(pixels(i)) for i in range(4)]), "3"),
        (msgspec.msgpack.encode({"observation/image": [1, 2, 3],
                                 "observation/wrist_image": "x", "observation/state": [0.0],
                                 "prompt": "p"}), "not an image"),
        (native(4, state=[0.0] * (STATE_DIM + 1)), f"1..{STATE_DIM}"),
        (native(4, state=[0.0, float("inf")]), "finite"),
        (msgspec.msgpack.encode({"images": {"base_0_rgb": png_url(pixels(1))}}), "prompt"),
        (msgspec.msgpack.encode({"joint": [1.0]}), "unknown observation format"),
        (b"\xc1", "not valid msgpack"),
    ]
    with ws(server) as conn:
        conn.recv(timeout=30)
        for frame, says in bad:
            conn.send(frame)
            error = conn.recv(timeout=60)
            assert isinstance(error, str) and error.startswith("400") and says in error, error
        conn.send(good)
        assert isinstance(conn.recv(timeout=60), bytes)


# -- another layout ---------------------------------------------------------------------------
def test_pi05_split_runs_the_encoder_on_rank_1(tmp_path):
    with running_keyed(tmp_path, KEY, "--config", "pi05_split", "--preset", "tiny",
                       "--load-format", "dummy") as split:
        assert generated(split, **body(0)).shape == (HORIZON, ACTION_DIM)
        split.wait_reported()
        ran = {(rank, node) for (rank, node, walk), count in by_rank(
            split, "mstar_node_invocations_total", "node", "walk").items() if count > 0}
        assert ran == {(1, "vit_encoder"), (0, "LLM"), (0, "action_init"), (0, "combine")}
        split.wait_idle()
