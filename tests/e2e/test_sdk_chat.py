"""`chat` through the SDK against a real `mstar-serve` and its OpenAI-compatible
`/v1/chat/completions`: the answer equals the native `/generate` of the prompt testvla's
chat template renders, streaming equals the whole answer, images (a file, bytes, a PIL
image) reach the model, `n` gives several choices, errors are typed, and the async client
does the same. How `chat` builds its messages is checked on its own at the end."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image
from serving_harness import Server, running

from mstar.client import (
    AsyncMStarClient,
    BadRequestError,
    ChatDelta,
    ChatResponse,
    MStarClient,
    NotFoundError,
)
from mstar.client._protocol import chat_messages

pytestmark = pytest.mark.timeout(60)

GREEDY = {"max_tokens": 8, "temperature": 0, "seed": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running(tmp_path_factory.mktemp("sdk-chat"), "--config", "testvla_single",
                 "--preset", "tiny", "--load-format", "dummy") as server:
        yield server


@pytest.fixture
def client(server: Server):
    with MStarClient(server.url) as c:
        yield c


def picture() -> Image.Image:
    image = Image.new("RGB", (12, 20), (200, 10, 30))
    image.putpixel((3, 4), (0, 255, 0))
    return image


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_chat_answers_as_the_native_route_does_for_the_rendered_prompt(client):
    r = client.chat("hello", **GREEDY)
    assert isinstance(r, ChatResponse) and r.raw["object"] == "chat.completion"
    assert r.model == "testvla"  # the default: the first model /v1/models lists
    assert r.text == r.choices[0].text and r.finish_reason == r.choices[0].finish_reason
    assert r.finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 8
    assert r.request_id and r.id.endswith(r.request_id)
    native = client.generate(prompt="user: hello\nassistant:", **GREEDY)
    assert r.text == native.text[0] and r.usage == native.usage


def test_system_and_messages_reach_the_template(client):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
               {"role": "user", "content": "again"}]
    r = client.chat(history, system="be brief", **GREEDY)
    native = client.generate(prompt="system: be brief\nuser: hi\nassistant: yo\n"
                                    "user: again\nassistant:", **GREEDY)
    assert r.text == native.text[0] and r.usage == native.usage


def test_streamed_chat_equals_the_whole_answer(client):
    whole = client.chat("tell me", **GREEDY)
    with client.chat("tell me", stream=True, stream_options={"include_usage": True},
                     **GREEDY) as stream:
        deltas = list(stream)
    assert stream.request_id and all(isinstance(d, ChatDelta) for d in deltas)
    assert "".join(d.text for d in deltas) == whole.text
    assert {d.index for d in deltas} == {0}
    assert [d.finish_reason for d in deltas if d.finish_reason] == [whole.finish_reason]
    assert deltas[-1].usage == whole.usage and deltas[-1].text == ""


def test_images_reach_the_model_from_a_file_bytes_or_pil(client, tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(png(picture()))
    plain = client.chat("what is this?", **GREEDY)
    answers = [client.chat("what is this?", images=image, **GREEDY)
               for image in (str(path), path.read_bytes(), picture(), [path])]
    assert len({(a.text, a.usage) for a in answers}) == 1
    assert answers[0].usage.prompt_tokens > plain.usage.prompt_tokens  # the image's patches
    data_url = "data:image/png;base64," + base64.b64encode(png(picture())).decode()
    assert client.chat("what is this?", images=data_url, **GREEDY).text == answers[0].text


def test_n_gives_one_choice_per_completion(client):
    r = client.chat("hi", n=2, max_tokens=4, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1] and r.text == r.choices[0].text
    streamed = list(client.chat("hi", n=2, max_tokens=4, temperature=1.0, seed=7,
                                stream=True))
    for choice in r.choices:
        assert "".join(d.text for d in streamed if d.index == choice.index) == choice.text


def test_chat_errors_are_typed(client):
    with pytest.raises(NotFoundError) as info:
        client.chat("hi", model="no-such-model")
    assert info.value.param == "model" and info.value.code == "model_not_found"
    assert "no-such-model" in info.value.message
    with pytest.raises(BadRequestError) as info:
        client.chat("hi", temperature=3, stream=True)
    assert info.value.param == "temperature" and info.value.request_id


def test_async_chat(server):
    async def main() -> None:
        async with AsyncMStarClient(server.url, model="testvla") as c:
            whole = await c.chat("hello", **GREEDY)
            stream = await c.chat("hello", stream=True, **GREEDY)
            deltas = [d async for d in stream]
            assert "".join(d.text for d in deltas) == whole.text
            with_image = await c.chat("what?", images=picture(), **GREEDY)
            assert with_image.usage.prompt_tokens > whole.usage.prompt_tokens
            with pytest.raises(NotFoundError):
                await c.chat("hi", model="no-such-model")

    asyncio.run(main())


# -- building the messages ------------------------------------------------------------------------
def test_chat_messages_put_images_before_the_text_of_the_last_user_message(tmp_path):
    jpeg = tmp_path / "x.jpg"
    picture().save(jpeg, format="JPEG")
    messages = chat_messages([{"role": "user", "content": "first"},
                              {"role": "assistant", "content": "ok"},
                              {"role": "user", "content": "look"}],
                             images=[jpeg, "https://example.com/a.png"], system="sys")
    assert messages[:3] == [{"role": "system", "content": "sys"},
                            {"role": "user", "content": "first"},
                            {"role": "assistant", "content": "ok"}]
    first, second, text = messages[3]["content"]
    assert first["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(first["image_url"]["url"].split(",", 1)[1]) == jpeg.read_bytes()
    assert second == {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    assert text == {"type": "text", "text": "look"}
    assert chat_messages("hi") == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="not PNG"):
        chat_messages("hi", images=b"plain bytes")
    with pytest.raises(ValueError, match="user message"):
        chat_messages([{"role": "system", "content": "s"}], images=png(picture()))
