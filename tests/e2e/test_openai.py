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
import time

import httpx
import openai
import pytest
from PIL import Image
from serving_harness import Server, openai_client, running_keyed

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test-openai"
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-server")
    with running_keyed(tmp, KEY, "--config", "testvla_single", "--preset", "tiny",
                       "--load-format", "dummy", "--upload-dir", str(tmp / "uploads")) as srv:
        srv.uploads = tmp / "uploads"
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server, KEY)


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


# -- what OpenAI refuses or ignores ---------------------------------------------------------------
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("extra", "param", "code", "words"), [
    ({"max_token": 8}, "max_token", "unknown_field", "Unrecognized request argument"),
    ({"messages": [{"role": "user", "content": "hi", "mood": "sunny"}]}, "messages[0].mood",
     "unknown_field", "mood"),
    ({"max_tokens": "8"}, "max_tokens", "invalid_type", "integer"),
    ({"stream": "false"}, "stream", "invalid_type", "boolean"),
    ({"temperature": "0.5"}, "temperature", "invalid_type", "number"),
    ({"n": 1.0}, "n", "invalid_type", "integer"),
    ({"reasoning_effort": "high"}, "reasoning_effort", None, "not supported"),
    ({"modalities": ["audio"]}, "modalities", None, '["text", "audio"]'),
    ({"logit_bias": {"abc": 5}}, "logit_bias", None, "token ids"),
    ({"logit_bias": {"65": 101}}, "logit_bias", None, "[-100, 100]"),
    ({"logit_bias": {"100000": 1}}, "logit_bias", None, "vocabulary size"),
    ({"chat_template_kwargs": {"messages": 5}}, "chat_template_kwargs.messages", None,
     "may not set `messages`"),
])
def test_unknown_fields_wrong_types_and_unsupported_options_are_400(client, extra, param,
                                                                     code, words):
    """As OpenAI's API: strict types (no "8" for 8), unknown fields named; options that
    would change the output and are not supported are refused, never silently dropped."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="testvla", messages=HI, max_tokens=4,
                                       extra_body=extra)
    error = info.value.body
    assert error["param"] == param and words in error["message"], error
    assert code is None or error["code"] == code, error
    assert "Traceback" not in error["message"] and "keyword argument" not in error["message"]


def test_fields_that_cannot_change_the_output_are_accepted_and_ignored(client):
    plain = client.chat.completions.create(model="testvla", messages=HI, **GREEDY)
    decorated = client.chat.completions.create(
        model="testvla", messages=HI, **GREEDY, user="u-1", store=False,
        metadata={"team": "a"}, service_tier="auto", parallel_tool_calls=False,
        extra_body={"prompt_cache_key": "k", "safety_identifier": "s", "tool_choice": "none",
                    "modalities": ["text"]})
    assert decorated.choices[0].message.content == plain.choices[0].message.content


def test_an_assistant_reply_sent_back_as_it_came_is_accepted(client):
    """The official client's message object, dumped whole (refusal, annotations, tool_calls,
    audio: all null), is a valid message of the next turn; a real tool call is refused."""
    first = client.chat.completions.create(model="testvla", messages=HI, **GREEDY)
    replayed = first.choices[0].message.model_dump()
    assert {"refusal", "tool_calls", "audio"} <= replayed.keys()
    turn = [*HI, replayed, {"role": "user", "content": "again"}]
    assert client.chat.completions.create(model="testvla", messages=turn, **GREEDY).choices
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="testvla", messages=[*HI, {**replayed, "tool_calls": [call]}], **GREEDY)
    assert err.value.body["param"] == "messages[1].tool_calls"


def test_logit_bias_forces_or_bans_a_token(client):
    """+100 on one token makes it every sampled token (testvla's tokens are bytes: 65 is
    "A"), even at temperature 1; -100 on the greedy answer's first token bans it."""
    forced = client.chat.completions.create(model="testvla", messages=HI, max_tokens=8,
                                            temperature=1.0, seed=1, logit_bias={"65": 100})
    assert forced.choices[0].message.content == "A" * 8
    completion = client.completions.create(model="testvla", prompt="once", max_tokens=6,
                                           temperature=1.0, seed=1, logit_bias={"66": 100})
    assert completion.choices[0].text == "B" * 6
    greedy = client.completions.create(model="testvla", prompt="once", max_tokens=6,
                                       temperature=0, logprobs=0)
    first = greedy.choices[0].logprobs.tokens[0]
    (banned,) = first.encode()
    again = client.completions.create(model="testvla", prompt="once", max_tokens=6,
                                      temperature=0, logprobs=0,
                                      logit_bias={str(banned): -100})
    assert again.choices[0].logprobs.tokens[0] != first
    assert first not in again.choices[0].logprobs.tokens


def test_created_is_the_time_of_the_request(client):
    before = int(time.time())
    reply = client.chat.completions.create(model="testvla", messages=HI, max_tokens=2)
    chunks = list(client.completions.create(model="testvla", prompt="x", max_tokens=2,
                                            stream=True))
    after = int(time.time()) + 1
    assert before <= reply.created <= after
    assert all(before <= chunk.created <= after for chunk in chunks)


def test_json_nested_past_the_limit_is_a_400_stating_it(server):
    from mstar.api_server.request_flow import MAX_JSON_DEPTH

    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    deep = "[" * 3000 + "]" * 3000
    chat = '{"model": "testvla", "messages": [{"role": "user", "content": "hi"}]'
    levels = 1500  # a JSON schema 3000 levels deep
    schema = '{"type": "object", "properties": {"a": ' * levels + "{}" + "}}" * levels
    nested_schema = (chat + ', "response_format": {"type": "json_schema", "json_schema": '
                     '{"name": "deep", "schema": ' + schema + "}}}")
    for path, content in (("/v1/chat/completions", chat + ', "x": ' + deep + "}"),
                          ("/v1/chat/completions", nested_schema),
                          ("/v1/completions", '{"model": "testvla", "prompt": ' + deep + "}"),
                          ("/generate", '{"prompt": ' + deep + "}"),
                          ("/v1/audio/speech", '{"input": ' + deep + "}")):
        response = httpx.post(server.url + path, content=content, headers=headers, timeout=30)
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert f"deeper than {MAX_JSON_DEPTH} levels" in error["message"], error
    multipart = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                           headers={"Authorization": f"Bearer {KEY}"},
                           data={"request": chat + ', "x": ' + deep + "}"},
                           files={"f": ("f.png", b"x")})
    assert multipart.status_code == 400 and multipart.json()["error"]["param"] == "request"
    assert server.client.get("/health").status_code == 200


def test_openapi_describes_every_route_and_the_models_request(server):
    doc = server.client.get("/openapi.json").json()
    contents = {path: ops["post"]["requestBody"]["content"]
                for path, ops in doc["paths"].items() if "post" in ops}
    for form in ("/v1/images/edits", "/v1/audio/transcriptions"):  # OpenAI's forms
        assert set(contents.pop(form)) == {"multipart/form-data"}
    bodies = {path: content["application/json"]["schema"]
              for path, content in contents.items()}
    assert set(bodies) == {"/generate", "/v1/chat/completions", "/v1/completions",
                           "/v1/audio/speech", "/v1/images/generations",
                           "/v1/testvla/act"}  # the last: testvla's own
    assert {"prompt", "mode", "num_steps", "image"} <= set(bodies["/generate"]["properties"])
    assert "messages" in bodies["/v1/chat/completions"]["properties"]
    assert bodies["/v1/chat/completions"]["additionalProperties"] is False
    refs = json.dumps(doc).count('"$ref": "#/components/schemas/')
    assert refs and "$defs" not in json.dumps(doc)
    assert httpx.get(server.url + "/openapi.json", timeout=30).status_code == 401  # the key


def test_generate_refuses_fields_the_model_does_not_declare(server):
    for body, param, code in (({"prompt": "hi", "max_token": 4}, "max_token", "unknown_field"),
                              ({"prompt": "hi", "max_tokens": "4"}, "max_tokens",
                               "invalid_type"),
                              ({"prompt": "hi", "mode": "dance"}, "mode", None)):
        response = server.generate(body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and (code is None or error["code"] == code), error


def test_each_request_is_logged_once_with_its_id(server, client):
    reply = client.chat.completions.with_raw_response.create(
        model="testvla", messages=HI, max_tokens=2, extra_headers={"x-request-id": "logged-1"})
    assert reply.headers["x-request-id"] == "logged-1"
    server.wait_idle()
    lines = [line for line in server.output().splitlines()
             if "POST /v1/chat/completions" in line]
    assert any("logged-1 POST /v1/chat/completions -> 200" in line for line in lines)
    assert not any("HTTP/1.1" in line for line in lines)  # no second (access) line
