"""V-JEPA 2 served (`mstar serve vjepa2 --preset tiny --load-format dummy` and `vjepa2_ac`,
one server per module): latents over HTTP from an uploaded mp4 (written with PyAV), an http
URL, a data URL and a frames tensor, which agree where the pixels are the same, and the
masked predictor's predictions; the SDK's
`encode_video`, `rollout` (streamed step by step over SSE, sync and async) and `plan`; bad
input, each a 400 naming it while the server keeps serving; a client that leaves mid-plan
stops its rollouts (cancelled) and one that leaves mid-rollout leaves no page behind;
`vjepa2_ac_split` running the encoder on rank 1 and the predictor on rank 0."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import wait_for
from placement_check import by_rank
from serving_harness import MSTAR, Server

from mstar.client import AsyncMStarClient, MStarClient, UnsupportedCapabilityError
from mstar.media import MediaLimits, load_video

pytestmark = pytest.mark.timeout(300)

#: the clip's frame rate: at most the request field's sampling rate, so every frame is kept
FPS = 1
SIDE = 48
ACTION_DIM = 7


def clip(seed: int, frames: int = 4, side: int = SIDE) -> np.ndarray:
    """Smooth moving gradients (what a video codec keeps well), uint8 [T, H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    phase = rng.uniform(0, 2 * np.pi, 3)
    out = [np.stack([127 + 120 * np.sin(2 * np.pi * (x + y * c + t / 8) + phase[c])
                     for c in range(3)], axis=-1) for t in range(frames)]
    return np.asarray(out).round().astype(np.uint8)


def mp4(frames: np.ndarray, fps: int = FPS) -> bytes:
    """An H.264 MP4 of the frames, written with PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """The frames the server decodes from a file (core's own decoder, every frame)."""
    return load_video(data, MediaLimits(), fps=FPS).frames


def tensor(array: np.ndarray) -> dict:
    """The JSON tensor form of `/generate`."""
    array = np.ascontiguousarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode()}


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def output(response: httpx.Response, name: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][name]
    return np.frombuffer(base64.b64decode(out["data"]), dtype=out["dtype"]).reshape(
        out["shape"])


def assert_bad(response: httpx.Response, param: str, says: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"] or "").startswith(param) and says in error["message"], error


CLIP = clip(0)
MP4 = mp4(CLIP)


class _Files(BaseHTTPRequestHandler):
    """Serves the test clip at /clip.mp4 (an http URL the server fetches)."""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        if self.path != "/clip.mp4":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("content-type", "video/mp4")
        self.send_header("content-length", str(len(MP4)))
        self.end_headers()
        self.wfile.write(MP4)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def files_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


#: offline: the tiny preset's sizes, seeded random weights
DUMMY = ("--preset", "tiny", "--load-format", "dummy")


@contextlib.contextmanager
def serve(directory: Path, model: str, *args: str) -> Iterator[Server]:
    """`mstar serve <model> ...`, healthy for the block, then stopped: it must exit with
    status 0 and leave nothing behind."""
    server = Server(directory, "serve", model, *args, cli=MSTAR)
    try:
        server.wait_healthy()
        yield server
    finally:
        assert server.stop() == 0, server.output()
    server.assert_clean()


@pytest.fixture(scope="module")
def vjepa2(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("vjepa2"), "vjepa2", *DUMMY,
               "--allow-private-media-urls") as srv:
        yield srv


@pytest.fixture(scope="module")
def ac(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("vjepa2_ac"), "vjepa2_ac", *DUMMY) as srv:
        yield srv


# -- latents ----------------------------------------------------------------------------------
def test_latents_from_an_upload_a_url_a_data_url_and_frames_agree(vjepa2, files_url):
    encode = {"mode": "encode"}
    from_data_url = output(vjepa2.generate({**encode, "video": data_url(MP4)}), "latents")
    tokens, dim = from_data_url.shape
    assert tokens > 0 and dim > 0 and from_data_url.dtype == np.float32
    assert np.isfinite(from_data_url).all()
    uploaded = vjepa2.client.post("/generate", data={"request": json.dumps(encode)},
                                  files={"video": ("clip.mp4", MP4, "video/mp4")})
    fetched = vjepa2.generate({**encode, "video": files_url + "/clip.mp4"})
    # the decoded pixels as a tensor: the same latents; other pixels, others
    frames = vjepa2.generate({**encode, "frames": tensor(decoded(MP4))})
    for response in (uploaded, fetched, frames):
        np.testing.assert_array_equal(output(response, "latents"), from_data_url)
    other = output(vjepa2.generate({**encode, "frames": tensor(clip(1))}), "latents")
    assert other.shape == from_data_url.shape and not np.allclose(other, from_data_url)
    # the masked predictor: the second tubelet's tokens from the first's
    predicted = output(vjepa2.generate({"mode": "predict", "video": data_url(MP4),
                                        "target_frames": [1]}), "predictions")
    assert predicted.shape == (tokens // 2, dim) and np.isfinite(predicted).all()


def test_sdk_encode_video_takes_a_path_bytes_a_url_and_an_array(vjepa2, files_url, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(MP4)
    want = output(vjepa2.generate({"mode": "encode", "video": data_url(MP4)}), "latents")
    with MStarClient(vjepa2.url, max_retries=0) as client:
        for video in (path, str(path), MP4, files_url + "/clip.mp4", decoded(MP4)):
            np.testing.assert_array_equal(client.encode_video(video), want)
        np.testing.assert_array_equal(client.encode_video(MP4, binary=True), want)
        # vjepa2 has no action-conditioned predictor: refused before anything is sent
        with pytest.raises(UnsupportedCapabilityError, match="'rollout'"):
            client.rollout(video=MP4, actions=np.zeros((2, ACTION_DIM)))
        with pytest.raises(UnsupportedCapabilityError, match="'planning'"):
            client.plan(video=MP4, goal=MP4)


# -- rollouts ---------------------------------------------------------------------------------
def actions(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.05, 0.05, (rows, ACTION_DIM)).astype(
        np.float32)


def states(frames: int) -> np.ndarray:
    return np.tile(np.linspace(0.1, 0.7, ACTION_DIM, dtype=np.float32), (frames, 1))


#: a rollout's context: two frames, so one action joins them before one action per step
CONTEXT = 2


def rollout_body(steps: int, **fields) -> dict:
    return {"mode": "rollout", "frames": tensor(CLIP[:CONTEXT]),
            "actions": tensor(actions(CONTEXT - 1 + steps)), "states": tensor(states(CONTEXT)),
            "rollout_steps": steps, **fields}


def plan_body(**fields) -> dict:
    return {"mode": "plan", "frames": tensor(CLIP[:1]), "goal": tensor(CLIP[3:4]),
            "states": tensor(states(1)), "samples": 8, "iterations": 2, "horizon": 2,
            "topk": 2, "seed": 3, **fields}


def step_arrays(events: list[dict]) -> list[np.ndarray]:
    """The `rollout` tensor of each step, in order, from the answer's events."""
    out = []
    for event in events:
        assert event["event"] != "error", event
        if event["event"] == "tensor" and event["name"] == "rollout":
            t = event["tensor"]
            out.append(np.frombuffer(base64.b64decode(t["data"]), t["dtype"]).reshape(
                t["shape"]))
    return out


def rollout_of(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return step_arrays(response.json()["events"])


def sse_events(response: httpx.Response) -> Iterator[dict]:
    """Each event of an SSE answer, as it arrives."""
    for line in response.iter_lines():
        if line.startswith("data: {"):
            yield json.loads(line[len("data: "):])


def test_a_rollout_streams_each_step_as_it_is_computed(ac):
    answer = ac.generate(rollout_body(3))
    whole = rollout_of(answer)
    assert len(whole) == 3 and all(s.shape == whole[0].shape for s in whole)
    assert whole[0].ndim >= 2 and np.isfinite(np.stack(whole)).all()
    # the answer's outputs join the steps' rows: one `rollout` [steps, tokens, dim]
    joined = output(answer, "rollout")
    assert joined.shape == (3, *whole[0].shape[-2:])
    np.testing.assert_array_equal(joined, np.concatenate(whole))
    assert output(answer, "poses").shape == (3, ACTION_DIM)
    with ac.client.stream("POST", "/generate", json={**rollout_body(3), "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith(
            "text/event-stream")
        streamed = []
        for event in sse_events(r):
            streamed.extend(step_arrays([event]))
            if event["event"] == "finished":
                assert event["reason"] == "stop" and len(streamed) == 3
    np.testing.assert_array_equal(np.stack(streamed), np.stack(whole))
    # step k reads the actions up to its own: another last action changes the last step only
    changed = rollout_body(3, actions=tensor(np.concatenate([actions(CONTEXT + 1),
                                                             actions(1, seed=9)])))
    other = rollout_of(ac.generate(changed))
    np.testing.assert_array_equal(np.stack(other[:2]), np.stack(whole[:2]))
    assert not np.allclose(other[2], whole[2])


def test_sdk_rollout_and_plan_sync_and_async(ac):
    want = np.stack(rollout_of(ac.generate(rollout_body(3))))
    kwargs = {"video": CLIP[:CONTEXT], "actions": actions(CONTEXT + 2),
              "states": states(CONTEXT), "steps": 3}
    planned_raw = output(ac.generate(plan_body()), "actions")
    plan = {"video": CLIP[:1], "goal": CLIP[3:4], "states": states(1), "samples": 8,
            "iterations": 2, "horizon": 2, "topk": 2, "seed": 3}
    with MStarClient(ac.url, max_retries=0) as client:
        got = client.rollout(**kwargs)
        assert got.ndim == 3 and got.shape[0] == 3
        np.testing.assert_array_equal(got, want.reshape(got.shape))
        with client.rollout(**kwargs, stream=True) as steps:
            np.testing.assert_array_equal(np.stack(list(steps)), got)
        planned = client.plan(**plan)
        assert planned.shape == (2, ACTION_DIM) and np.isfinite(planned).all()
        np.testing.assert_array_equal(planned, planned_raw)
        assert not np.array_equal(client.plan(**{**plan, "seed": 4}), planned)

    async def main() -> None:
        async with AsyncMStarClient(ac.url, max_retries=0) as client:
            np.testing.assert_array_equal(await client.rollout(**kwargs), got)
            streamed = [s async for s in await client.rollout(**kwargs, stream=True)]
            np.testing.assert_array_equal(np.stack(streamed), got)
            np.testing.assert_array_equal(await client.plan(**plan), planned)

    asyncio.run(main())


def test_a_plan_with_the_authors_defaults_but_one_iteration(ac):
    body = {k: v for k, v in plan_body(iterations=1).items()
            if k not in ("samples", "horizon", "topk")}
    response = ac.generate(body)
    planned = output(response, "actions")
    assert planned.shape == (2, ACTION_DIM) and np.isfinite(planned).all()
    # the authors' planner clips each xyz step to maxnorm (0.05)
    assert np.abs(planned[:, :3]).max() <= 0.05 + 1e-6


def test_a_client_leaving_mid_plan_stops_its_rollouts_and_frees_their_pages(ac):
    ac.wait_idle()
    aborted = ac.metric('mstar_requests_total{status="abort"}')
    # 100 rounds of 64 candidates: many seconds; a one-frame context keeps no cache of its
    # own, so pages in use are the candidates' rollouts
    long_plan = plan_body(samples=64, iterations=100, topk=10)
    with ac.client.stream("POST", "/generate", json={**long_plan, "stream": True}) as r:
        assert r.status_code == 200
        wait_for(lambda: ac.metric("mstar_kv_pages_in_use") > 0, timeout=60)
    # cancelled long before its rounds could finish, every page back
    wait_for(lambda: ac.metric('mstar_requests_total{status="abort"}') == aborted + 1,
             timeout=60)
    ac.wait_idle(timeout=60)
    assert len(rollout_of(ac.generate(rollout_body(1)))) == 1


def test_a_client_leaving_mid_rollout_leaves_no_pages(ac):
    """A tiny rollout is too short to be sure the client leaves before its end: whether it
    was cancelled or had finished, it ends and its pages come back."""
    ac.wait_idle()
    ended = sum(ac.metric(f'mstar_requests_total{{status="{s}"}}', 0) for s in ("ok", "abort"))
    with ac.client.stream("POST", "/generate", json={**rollout_body(6), "stream": True}) as r:
        first = next(e for e in sse_events(r) if e["event"] == "tensor")
        assert first["name"] in ("rollout", "poses")
    wait_for(lambda: sum(ac.metric(f'mstar_requests_total{{status="{s}"}}', 0)
                         for s in ("ok", "abort")) == ended + 1, timeout=60)
    ac.wait_idle(timeout=60)


# -- bad input --------------------------------------------------------------------------------
CORRUPT = data_url(MP4[:40] + bytes(200))
BAD_CLIPS = [
    ({"frames": tensor(CLIP[:1])}, "frames", "frames"),
    ({"frames": tensor(CLIP[:, :4, :4])}, "frames", "patch"),
    ({"frames": tensor(CLIP[..., :2])}, "frames", "[T, H, W, 3]"),
    ({"video": CORRUPT}, "video", "video"),
]


@pytest.mark.parametrize("body, param, says", BAD_CLIPS, ids=[
    "too-few-frames", "frames-smaller-than-a-patch", "two-channels", "corrupt-file"])
def test_a_bad_clip_is_a_400_naming_it(vjepa2, body, param, says):
    assert_bad(vjepa2.generate({"mode": "encode", **body}), param, says)
    assert output(vjepa2.generate({"mode": "encode", "frames": tensor(CLIP)}),
                  "latents").size > 0


BAD_REQUESTS = [
    (rollout_body(3, actions=tensor(np.zeros((CONTEXT + 2, 6), np.float32))), "actions",
     "[N, 7]"),
    (rollout_body(3, actions=tensor(actions(CONTEXT))), "actions", "needs"),
    (rollout_body(3, states=tensor(states(CONTEXT + 1))), "states", "rows"),
    ({k: v for k, v in plan_body().items() if k != "goal"}, "goal", "goal"),
    (plan_body(samples=10 ** 7), "samples", "at most"),
    (plan_body(horizon=10 ** 4), "horizon", "at most"),
]


@pytest.mark.parametrize("body, param, says", BAD_REQUESTS, ids=[
    "action-dim", "action-count", "state-count", "no-goal", "absurd-samples",
    "absurd-horizon"])
def test_bad_rollout_and_plan_input_is_a_400_naming_it(ac, body, param, says):
    assert_bad(ac.generate(body), param, says)
    assert len(rollout_of(ac.generate(rollout_body(1)))) == 1


# -- checkpoints on disk ----------------------------------------------------------------------
@pytest.mark.parametrize("model, kind, config", [("vjepa2", "hf", "vjepa2_tiny"),
                                                 ("vjepa2_ac", "ac", "vjepa2_ac_tiny")])
def test_a_checkpoint_directory_serves_its_own_weights(tmp_path, model, kind, config):
    """`--model-path` to a checkpoint in the real layout (the hub's safetensors and
    config.json; the authors' pickled `.pt`, which has no config: the preset's sizes): the
    latents `mstar.load` gives from the same files, not those of random weights."""
    import mstar
    from mstar import events
    from mstar_vjepa2.checkpoint import write_checkpoint

    directory = write_checkpoint(tmp_path / "ckpt", "tiny", kind=kind)
    preset = ("--preset", "tiny") if kind == "ac" else ()
    body = {"mode": "encode", "frames": tensor(CLIP)}
    with serve(tmp_path, model, "--config", config, "--model-path", str(directory),
               *preset) as server:
        served = output(server.generate(body), "latents")
        if kind == "ac":
            assert len(rollout_of(server.generate(rollout_body(2)))) == 2

    def in_process(**load) -> np.ndarray:
        deployment = mstar.load(model, config, **load)
        try:
            (latents,) = [e.tensor.to_tensor().numpy() for e in deployment.generate(
                {"mode": "encode", "frames": CLIP}) if isinstance(e, events.NamedTensor)]
        finally:
            deployment.close()
        return latents

    np.testing.assert_array_equal(served, in_process(
        model_path=str(directory), preset="tiny" if kind == "ac" else None))
    assert not np.allclose(served, in_process(preset="tiny", load_format="dummy"))


# -- another layout ---------------------------------------------------------------------------
def test_vjepa2_ac_split_encodes_on_rank_1_and_predicts_on_rank_0(tmp_path):
    with serve(tmp_path, "vjepa2_ac", *DUMMY, "--config", "vjepa2_ac_split") as split:
        assert len(rollout_of(split.generate(rollout_body(2)))) == 2
        split.wait_reported()
        ran = {(rank, node) for (rank, node, walk), count in by_rank(
            split, "mstar_node_invocations_total", "node", "walk").items() if count > 0}
        assert ran == {(1, "video_encoder"), (0, "ac_predictor")}
        split.wait_idle()

