"""The OpenAI-compatible routes through a real `mstar-serve` (processes: API server, data
worker, conductor, worker), talked to with the official `openai` package: chat (streamed
and not, with an image, logprobs, `n`, stop strings), completions, models, and the error
cases each raising the matching `openai` exception class. Each answer is checked against
the native `/generate` of the same prompt (the chat template's rendering), so the OpenAI
layer adds shape, never different tokens."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image
from serving_harness import Server

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test-openai"
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-server")
    srv = Server(tmp, "--config", "testvla_single", "--preset", "tiny", "--load-format",
                 "dummy", "--api-key", KEY, "--upload-dir", str(tmp / "uploads"))
    srv.uploads = tmp / "uploads"
    srv.client.headers["Authorization"] = f"Bearer {KEY}"
    srv.wait_healthy()
    yield srv
    assert srv.stop() == 0, srv.output()
    srv.assert_clean()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def native_text(server: Server, prompt: str, **fields) -> str:
    response = server.generate({"prompt": prompt, **GREEDY, **fields})
    assert response.status_code == 200, response.text
    return response.json()["text"][0]


def png_data_url(color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_models_list_shows_capabilities_and_length(client):
    (model,) = client.models.list().data
    assert model.id == "testvla"
    extra = model.model_extra
    assert {"chat", "completions", "image_input"} <= set(extra["capabilities"])
    assert extra["max_model_len"] == 512


def test_chat_renders_the_template_and_matches_generate(server, client):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="testvla", messages=messages, **GREEDY)
    want = native_text(server, "system: be brief\nuser: hello there\nassistant:")
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == want
    assert choice.finish_reason in ("stop", "length")
    prompt_tokens = len(b"system: be brief\nuser: hello there\nassistant:") + 1
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"


def test_streamed_chat_equals_the_whole_answer_and_reports_usage(client):
    messages = [{"role": "user", "content": "stream me"}]
    whole = client.chat.completions.create(model="testvla", messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(
        model="testvla", messages=messages, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_with_an_image_sees_the_image(server, client):
    """The image part reaches the model: the same question about two images gives other
    log-probs, and equals /generate given the same pixels (resized to 16x16, in [0, 1])."""
    def ask(url: str) -> tuple[str, list[float]]:
        reply = client.chat.completions.create(model="testvla", messages=[
            {"role": "user", "content": [{"type": "text", "text": "what is "},
                                         {"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "?"}]}], **GREEDY,
            logprobs=True)
        assert reply.usage.prompt_tokens == 1 + len("user: what is ") + 16 + \
            len("?\nassistant:")
        choice = reply.choices[0]
        return choice.message.content, [item.logprob for item in choice.logprobs.content]

    red, blue = ask(png_data_url((250, 0, 0))), ask(png_data_url((0, 0, 250)))
    assert red[1] != blue[1]
    pixels = [[[c / 255.0] * 16 for _ in range(16)] for c in (250, 0, 0)]
    response = server.generate({"prompt": "user: what is <image>?\nassistant:",
                                "image": pixels, "logprobs": 0, **GREEDY})
    native = [lp["logprob"] for e in response.json()["events"]
              if e["event"] == "text_delta" for lp in e["logprobs"]]
    assert red[0] == response.json()["text"][0]
    assert native == pytest.approx(red[1], abs=1e-5)


def test_logprobs_and_n(client):
    reply = client.chat.completions.create(
        model="testvla", messages=[{"role": "user", "content": "two please"}], n=2, seed=7,
        temperature=1.0, max_tokens=6, logprobs=True, top_logprobs=3)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.completion_tokens == 12
    for choice in reply.choices:
        assert choice.finish_reason == "length"
        items = choice.logprobs.content
        assert len(items) == 6
        for item in items:
            assert item.logprob <= 0 and len(item.top_logprobs) == 3
            tops = [t.logprob for t in item.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            assert item.bytes == list(item.token.encode())
    again = client.chat.completions.create(
        model="testvla", messages=[{"role": "user", "content": "two please"}], n=2, seed=7,
        temperature=1.0, max_tokens=6)
    assert [c.message.content for c in again.choices] == \
        [c.message.content for c in reply.choices]


def test_stop_strings_cut_the_text_and_end_the_request(server, client):
    messages = [{"role": "user", "content": "count"}]
    full = client.chat.completions.create(model="testvla", messages=messages,
                                          temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    # a stop string from the middle of the greedy answer (printable, not at the start)
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2)
                if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2])
    for stream in (False, True):
        kwargs = dict(model="testvla", messages=messages, temperature=0, max_tokens=40,
                      stop=[stop, "never-there"])
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            got = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            reply = client.chat.completions.create(**kwargs)
            got, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
            assert reply.usage.completion_tokens < full.usage.completion_tokens
        assert got == text[:text.index(stop)] and reason == "stop"
    server.wait_idle()


def test_completions_match_generate(server, client):
    reply = client.completions.create(model="testvla", prompt="once upon", **GREEDY,
                                      logprobs=2)
    (choice,) = reply.choices
    assert choice.text == native_text(server, "once upon")
    assert len(choice.logprobs.tokens) == reply.usage.completion_tokens == 12
    assert choice.logprobs.text_offset[0] == 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="testvla", prompt="once upon", stream=True, **GREEDY))
    assert streamed == choice.text


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "robot"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "user", "content": [{"type": "hologram", "x": 1}]}]},
     "messages[0].content[0]", "hologram"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options":
      {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "tools", "tool calling is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio":
      {"data": "AAAA", "format": "wav"}}]}]}, "messages[0].content[0]",
     "does not take audio input; it accepts: text, image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
      {"url": "data:image/png;base64,aGVsbG8="}}]}]}, "messages[0].content[0]", "image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
      {"url": "http://127.0.0.1:9/cat.png"}}]}]}, "messages[0].content[0]", "private"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", ""),
])
def test_bad_chat_requests_are_400_naming_the_field(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="testvla", **body)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == param, error
    assert words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_unknown_model_and_bad_key_raise_their_classes(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user",
                                                                 "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "testvla", "messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"


def test_a_streaming_client_that_leaves_cancels_its_request(server):
    body = {"model": "testvla", "messages": [{"role": "user", "content": "long"}],
            "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    server.wait_idle()


def test_json_schema_response_format_gives_valid_json(client):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["color", "count"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
    reply = client.chat.completions.create(
        model="testvla", messages=[{"role": "user", "content": "describe it"}], n=2,
        seed=3, temperature=1.0, max_tokens=60, response_format=fmt)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="testvla", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "object", "properties": {"a": {
                    "type": "no-such-type"}}}}})
    assert info.value.body["param"] == "response_format"


def test_an_uploaded_image_is_used_then_removed(server, client):
    """multipart/form-data: the JSON body in `request`, the file as `upload://<name>`; the
    same answer as the image sent as a data URL, and the upload directory empty after."""
    url = png_data_url((10, 200, 30))
    png = base64.b64decode(url.split(",", 1)[1])

    def body(image: str) -> dict:
        return {"model": "testvla", **GREEDY, "logprobs": True, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "name it"}]}]}

    inline = client.chat.completions.create(**body(url))
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=30,
                          data={"request": json.dumps(body("upload://leaf.png"))},
                          files={"leaf": ("leaf.png", png, "image/png")})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == inline.choices[0].message.content
    assert [i["logprob"] for i in choice["logprobs"]["content"]] == pytest.approx(
        [i.logprob for i in inline.choices[0].logprobs.content], abs=1e-5)
    assert [p for p in server.uploads.rglob("*") if p.is_file() and p.name != ".mstar-uploads"] == []
    missing = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=30,
                         data={"request": json.dumps(body("upload://other.png"))},
                         files={"leaf": ("leaf.png", png, "image/png")})
    assert missing.status_code == 400
    assert "no file named 'other.png'" in missing.json()["error"]["message"]


def test_repeated_images_and_system_prompts_hit_the_caches(server, client):
    """The same image twice is encoded once (the encoder-output cache), and the same system
    prompt's pages are reused (prefix caching), with the same answer."""
    system = "You are a careful assistant who answers in one short sentence. " * 3

    def ask(question: str):
        return client.chat.completions.create(model="testvla", **GREEDY, logprobs=True,
                                              messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url((7, 7, 7))}},
                {"type": "text", "text": question}]}])

    def counter(name: str, node: str) -> float:
        return sum(value for labels, value in server.samples(name) if labels["node"] == node)

    server.wait_reported()  # earlier tests' work is counted
    encoded = counter("mstar_node_invocations_total", "vision_encoder")
    hits = counter("mstar_encoder_cache_hits_total", "vision_encoder")
    reused = counter("mstar_prefix_cache_hit_tokens_total", "LLM")
    first, second = ask("what?"), ask("what?")
    server.wait_reported()
    assert counter("mstar_node_invocations_total", "vision_encoder") == encoded + 1
    assert counter("mstar_encoder_cache_hits_total", "vision_encoder") == hits + 1
    reused = counter("mstar_prefix_cache_hit_tokens_total", "LLM") - reused
    before_image = 1 + len(f"system: {system}\nuser: ")
    assert before_image // 16 * 16 <= reused < second.usage.prompt_tokens  # last token runs
    assert second.choices[0].message.content == first.choices[0].message.content
    assert [i.logprob for i in second.choices[0].logprobs.content] == pytest.approx(
        [i.logprob for i in first.choices[0].logprobs.content], abs=1e-5)
