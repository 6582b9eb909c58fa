"""BAGEL served as real processes (tiny preset): every packaged layout gives the same answer
and the same images, with each guidance branch on the rank its YAML names; the routes
(`/generate`, OpenAI chat with an image, images generations and edits, the SDK, the
seed-003 examples verbatim) answer with PNGs of the size asked; bad input is a 4xx naming
the field, and a client that leaves mid-generation stops the denoise loop and frees every
rank's pages.

The layouts load one tiny checkpoint written in the hub layout
(`mstar_bagel.checkpoint.write_tiny_checkpoint`); `mstar serve bagel --preset tiny
--load-format dummy` is the offline first run. All servers start together, once per module.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from PIL import Image
from placement_check import by_rank, check_placement
from serving_harness import MSTAR, SERVE, Server

from mstar import MStarClient

pytestmark = pytest.mark.timeout(300)

MAX_BYTES = 60_000  # --media-max-bytes of every server
#: Every server's shared options: the tiny preset's context (a checkpoint path alone keeps
#: the YAML's 32768), and a cache of 8192 tokens (one sized from free memory would take
#: gigabytes per rank on the CPU: five servers would not fit).
COMMON = ("--media-max-bytes", str(MAX_BYTES), "--set", "max_seq_len=2048", "--set",
          "kv_cache.num_pages=512")
#: name -> (the command, its arguments before the shared ones, the model name it serves).
LAYOUTS = {
    "bagel_single_gpu": (MSTAR, ("serve", "bagel"), "bagel"),
    "bagel_cfg_parallel": (MSTAR, ("serve", "bagel_cfg_parallel"), "bagel_cfg_parallel"),
    "bagel_pd_disaggregated": (SERVE, ("--config", "bagel_pd_disaggregated"), "bagel"),
    "bagel_img_disaggregated": (SERVE, ("--config", "bagel_img_disaggregated"), "bagel"),
    "bagel_tp2": (SERVE, ("--config", "bagel_tp2"), "bagel"),
}
#: The walks that compute a request's prompt; the image-free guidance context (LLM_cfg_img)
#: prefills its own inside image_gen.
PREFILL_WALKS = {"prefill_text", "prefill_vit", "prefill_vae"}
OWN_CONTEXT = frozenset({"LLM_cfg_img"})
#: Pixels of two layouts may differ by one level (of 255) in at most 1% of the values. In
#: process every layout is bit-equal; served, a single rank computes with all the CPUs'
#: torch threads and each of three ranks with a third of them, and the float sums that
#: change round one value of the 48x32 image to the next level (measured: 1 of 4608 values,
#: by 1; the same happens in process with 1 thread against 2).
PIXEL_TOLERANCE = (1, 0.01)


def photo(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A PNG of random pixels (a flat colour would hide an image read wrongly)."""
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        out, "PNG")
    return out.getvalue()


def data_url(png_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode()


PHOTO = photo(1)
#: An answer about an image, a text-to-image (text guidance inside cfg_interval only) and an
#: edit (both guidance contexts at every step: the edit defaults, cfg_img_scale 2).
REQUESTS = {
    "answer": {"prompt": "what is in the picture?", "image": data_url(PHOTO), "mode": "text",
               "max_tokens": 6, "temperature": 0, "logprobs": 2},
    "generate": {"prompt": "a red cube on a blue table", "mode": "image", "width": 48,
                 "height": 32, "num_timesteps": 6, "seed": 7},
    "edit": {"prompt": "make it green", "mode": "image", "image": data_url(PHOTO),
             "num_timesteps": 5, "seed": 8},
}


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB"
    image.load()
    return image


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(png(data), dtype=np.int16)


def outcome(server: Server, body: dict) -> dict:
    """A `/generate` answer as its text, token ids and their log-probs, and its images
    (PNG bytes)."""
    response = server.generate(body)
    assert response.status_code == 200, response.text
    evs = response.json()["events"]
    deltas = [e for e in evs if e["event"] == "text_delta"]
    return {"text": "".join(e["text"] for e in deltas),
            "tokens": [t for e in deltas for t in e["token_ids"]],
            "logprobs": [lp["logprob"] for e in deltas for lp in e.get("logprobs") or []],
            "images": [base64.b64decode(e["data"]) for e in evs if e["event"] == "image"]}


def assert_close_images(got: list[bytes], want: list[bytes]) -> None:
    """Same count and sizes; pixels within PIXEL_TOLERANCE."""
    levels, share = PIXEL_TOLERANCE
    assert len(got) == len(want)
    for mine, theirs in zip(got, want):
        diff = np.abs(pixels(mine) - pixels(theirs))
        assert diff.shape == pixels(theirs).shape
        assert diff.max() <= levels and (diff > 0).mean() <= share, (diff.max(),
                                                                    (diff > 0).sum())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from mstar_bagel.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("bagel") / "tiny")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, ckpt):
    """Every layout on the checkpoint, and `mstar serve bagel` on dummy weights ("dummy"),
    started at once."""
    tmp = tmp_path_factory.mktemp("bagel-servers")
    common = (*COMMON, "--upload-dir", str(tmp / "uploads"))
    started = {name: Server(tmp, *args, "--model-path", str(ckpt), *common, cli=cli)
               for name, (cli, args, _) in LAYOUTS.items()}
    started["dummy"] = Server(tmp, "serve", "bagel", "--preset", "tiny", "--load-format",
                              "dummy", *common, cli=MSTAR)
    try:
        for server in started.values():
            server.wait_healthy(timeout=240)
        yield started
    finally:
        with ThreadPoolExecutor(len(started)) as pool:  # each stop waits for its exit
            codes = dict(zip(started, pool.map(Server.stop, started.values())))
        assert set(codes.values()) == {0}, {n: s.output()[-3000:] for n, s in started.items()
                                            if codes[n]}
        for server in started.values():
            server.assert_clean()


@pytest.fixture(scope="module")
def reference(servers) -> dict[str, dict]:
    """Each request's outcome on one rank (`mstar serve bagel`)."""
    return {name: outcome(servers["bagel_single_gpu"], body)
            for name, body in REQUESTS.items()}


# -- every layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_same_answer_and_images(servers, reference, layout):
    """Same tokens, same pixels (within PIXEL_TOLERANCE), and per rank (from /metrics): each
    (walk, node) ran exactly where the YAML places it (cfg_parallel: `LLM_cfg_text` only on
    rank 1, `LLM_cfg_img` only on rank 2; img_disaggregated: image_gen's LLM steps on rank
    2; tp2: every LLM step, guidance contexts included, on both ranks), prompts computed only
    by the prefill ranks and the image-free context, K/V imported by the ranks that continue
    a request, weights held where placed (of the LLM's split ones, half on each TP rank)."""
    server = servers[layout]
    assert len(reference["answer"]["tokens"]) == 6 == len(reference["answer"]["logprobs"])
    assert [png(i).size for i in reference["generate"]["images"]] == [(48, 32)]
    assert [png(i).size for i in reference["edit"]["images"]] == [(40, 32)]  # VAE resize rule
    for name, body in REQUESTS.items():
        got = reference[name] if layout == "bagel_single_gpu" else outcome(server, body)
        assert got["tokens"] == reference[name]["tokens"], name
        np.testing.assert_allclose(got["logprobs"], reference[name]["logprobs"], atol=1e-4)
        assert_close_images(got["images"], reference[name]["images"])
    single = servers["bagel_single_gpu"]
    single.wait_reported()
    held = by_rank(single, "mstar_node_parameters_bytes", "node")
    split = by_rank(single, "mstar_node_sharded_parameters_bytes", "node")
    check_placement(server, layout, prefill_walks=PREFILL_WALKS, own_context=OWN_CONTEXT,
                    single_rank_bytes={node: (int(v), int(split[(0, node)]))
                                       for (_, node), v in held.items()})
    server.wait_idle()


# -- routes ---------------------------------------------------------------------------------
def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def b64_images(answer) -> list[bytes]:
    return [base64.b64decode(item.b64_json) for item in answer.data]


def test_chat_with_an_image_part_answers_as_generate(servers, reference):
    """The chat route reads the image part as `/generate` reads `image` (greedy: the same
    tokens)."""
    client = openai_client(servers["bagel_single_gpu"])
    answer = client.chat.completions.create(
        model="bagel", max_tokens=6, temperature=0, logprobs=True,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(PHOTO)}},
            {"type": "text", "text": REQUESTS["answer"]["prompt"]}]}])
    choice = answer.choices[0]
    assert answer.usage.completion_tokens == 6 and choice.finish_reason == "length"
    assert choice.message.content == reference["answer"]["text"]
    assert len(choice.logprobs.content) == 6
    # The same image and text as the reference's `/generate`: the text now comes from its
    # cached pages (a later prompt chunk), and a shorter computed suffix may round differently.
    assert [lp.logprob for lp in choice.logprobs.content] == pytest.approx(
        reference["answer"]["logprobs"], rel=0, abs=1e-5)


def test_images_routes_and_the_sdk_give_pngs_of_the_size(servers):
    """images.generate / images.edit (openai client) and the SDK's generate_image /
    edit_image: PNGs of the size asked, n distinct ones, the same bytes every way for one
    seed and as `/generate` makes them."""
    server = servers["bagel_single_gpu"]
    client = openai_client(server)
    knobs = {"seed": 3, "num_timesteps": 4, "cfg_interval": [0.2, 1.0]}
    two = b64_images(client.images.generate(model="bagel", prompt="a cat", n=2, size="48x32",
                                            extra_body=knobs))
    assert [png(d).size for d in two] == [(48, 32)] * 2 and two[0] != two[1]
    native = outcome(server, {"prompt": "a cat", "mode": "image", "n": 2, "width": 48,
                              "height": 32, **knobs})
    assert native["images"] == two
    edit = dict(prompt="make it blue", extra_body={"seed": 4, "num_timesteps": 4})
    edited = b64_images(client.images.edit(model="bagel", size="32x48", **edit,
                                           image=("in.png", PHOTO, "image/png")))
    assert [png(d).size for d in edited] == [(32, 48)]
    assert outcome(server, {"prompt": "make it blue", "mode": "image", "width": 32,
                            "height": 48, "image": data_url(PHOTO), "seed": 4,
                            "num_timesteps": 4})["images"] == edited
    other = b64_images(client.images.edit(model="bagel", size="32x48", **edit,
                                          image=("in.png", photo(2), "image/png")))
    assert other != edited  # the edit reads its image
    with MStarClient(server.url, max_retries=0) as sdk:
        assert sdk.generate_image("a cat", size="48x32", n=2, **knobs) == two
        assert sdk.edit_image(PHOTO, "make it blue", size="32x48", seed=4,
                              num_timesteps=4) == edited[0]


@pytest.mark.parametrize("name", ["dummy", "bagel_cfg_parallel"])
def test_both_served_names_chat_and_draw(servers, name):
    """`mstar serve bagel --preset tiny --load-format dummy` and `mstar serve
    bagel_cfg_parallel` answer chat and return an image, under the name served."""
    server = servers[name]
    model = "bagel" if name == "dummy" else name
    client = openai_client(server)
    chat = client.chat.completions.create(model=model, max_tokens=4, messages=[
        {"role": "user", "content": "hi"}])
    assert chat.usage.completion_tokens >= 1 and chat.model == model
    (image,) = b64_images(client.images.generate(model=model, prompt="a cat",
                                                 extra_body={"num_timesteps": 3}))
    assert png(image).size == (32, 32)


def test_the_seed_003_examples_run_verbatim(servers):
    """The product page's calls, unchanged but for the URL (tiny preset, dummy weights)."""
    url = servers["dummy"].url
    client = MStarClient(url)
    assert isinstance(client.chat("What is the capital of France?").text, str)
    image = client.generate_image("a cat in a hat")  # → PNG bytes (BAGEL)
    assert png(image).size == (32, 32)
    client.close()
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none")
    chat = client.chat.completions.create(model="bagel", messages=[{"role": "user",
                                                                    "content": "hi"}])
    assert chat.choices[0].message.content is not None
    answer = client.images.generate(model="bagel", prompt="a cat")  # image generation
    assert png(base64.b64decode(answer.data[0].b64_json)).size == (32, 32)


# -- bad input ------------------------------------------------------------------------------
PROMPT = "a cat in a hat"


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"size": "64x64"}, "size", "sizes: 32x32, 48x32, 32x48"),
    ({"n": 5}, "n", "at most 4"),
    ({"prompt": "lorem ipsum " * 1500}, "prompt", "max_seq_len"),
    ({"cfg_text_scale": 50.0}, "cfg_text_scale", "less than or equal to 20"),
    ({"cfg_img_scale": 0.5}, "cfg_img_scale", "greater than or equal to 1"),
    ({"cfg_interval": [0.9, 0.1]}, "cfg_interval", "0 <= lo <= hi <= 1"),
    ({"num_timesteps": 1}, "num_timesteps", "greater than or equal to 2"),
    ({"num_timesteps": 1000}, "num_timesteps", "less than or equal to 250"),
    ({"timestep_shift": 0}, "timestep_shift", "greater than 0"),
])
def test_bad_generations_are_400_naming_the_field(servers, change, param, words):
    """Through the images route and `/generate` alike; the server stays healthy."""
    server = servers["bagel_single_gpu"]
    response = server.client.post("/v1/images/generations",
                                  json={"model": "bagel", "prompt": PROMPT, **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    native = dict(change)
    if "size" in native:
        native["width"], native["height"] = map(int, native.pop("size").split("x"))
    response = server.generate({"prompt": PROMPT, "mode": "image", **native})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (param if param != "size" else "64x64") in f"{error['param']} {error['message']}"
    assert server.client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(("files", "status", "words"), [
    ([], 400, "needs the image"),
    ([("image", ("x.png", b"this is no image", "image/png"))], 400, "image"),
    ([("image", ("big.png", photo(3, (160, 160)), "image/png"))], 413,
     f"limit of {MAX_BYTES} bytes"),
])
def test_bad_edits_are_refused_naming_the_image(servers, files, status, words):
    server = servers["bagel_single_gpu"]
    fields = [("model", (None, "bagel")), ("prompt", (None, PROMPT))]
    response = server.client.post("/v1/images/edits", files=fields + files)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == "image" and words in error["message"], error
    assert server.client.get("/health").json()["status"] == "ok"


def test_a_client_that_leaves_mid_generation_stops_it_on_every_rank(servers):
    """Four edits of 249 steps on three ranks; the client drops its connection while they
    run. The request is cancelled: fewer steps run than asked, the KV pages of every rank
    are free again (the total, read from reports made after the request ended, is 0), and
    the server answers the next request."""
    server = servers["bagel_cfg_parallel"]
    server.wait_reported()
    steps_before = _combines(server)
    rid = "req-bagel-leaves"
    body = json.dumps({"prompt": PROMPT, "mode": "image", "image": data_url(PHOTO), "n": 4,
                       "num_timesteps": 250, "seed": 0}).encode()
    head = ("POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"x-request-id: {rid}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 60
        while _combines(server) == steps_before:  # denoising on every rank: now leave
            assert time.monotonic() < deadline, "the request never denoised"
            time.sleep(0.05)
        assert server.metric("mstar_kv_pages_in_use") > 0
    server.wait_idle(timeout=60)
    server.wait_reported()
    assert server.metric("mstar_kv_pages_in_use") == 0
    assert by_rank(server, "mstar_rank_kv_pages_in_use") == {(0,): 0, (1,): 0, (2,): 0}
    assert server.metric("mstar_running_requests") == 0
    assert _combines(server) - steps_before < 4 * 249  # the loop stopped
    assert f"{rid} cancelled" in server.output()
    assert server.client.get("/health").json()["status"] == "ok"
    after = outcome(server, {"prompt": PROMPT, "mode": "image", "num_timesteps": 3})
    assert [png(i).size for i in after["images"]] == [(32, 32)]


def _combines(server: Server) -> float:
    """Denoising steps combined so far (rank 0's `combine_cfg` invocations)."""
    return sum(v for (rank, node, _), v in by_rank(server, "mstar_node_invocations_total",
                                                    "node", "walk").items()
               if node == "combine_cfg")
