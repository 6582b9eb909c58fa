"""The OpenAI-compatible API with OpenAI's own Python package (`pip install openai`):
list the models, ask, and stream with token usage.

    mstar serve testvla --preset tiny --load-format dummy     # in another shell
    python examples/openai_chat.py

`MSTAR_URL` picks the server (default http://localhost:8000) and `MSTAR_API_KEY` the key
("none" when the server has none). The tiny test model has random weights: its text is
gibberish.
"""

import os

from openai import OpenAI

url = os.environ.get("MSTAR_URL", "http://localhost:8000")
client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("MSTAR_API_KEY", "none"))

model = client.models.list().data[0].id
print("model:", model)

completion = client.chat.completions.create(
    model=model, max_tokens=16,
    messages=[{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "What is the capital of France?"}])
choice = completion.choices[0]
print(f"reply: {choice.message.content!r} (finish: {choice.finish_reason}, "
      f"{completion.usage.completion_tokens} tokens)")

stream = client.chat.completions.create(
    model=model, max_tokens=16, stream=True, stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "Tell me a story"}])
print("streamed: ", end="")
for chunk in stream:
    if chunk.choices:
        print(repr(chunk.choices[0].delta.content or ""), end=" ", flush=True)
    elif chunk.usage:
        print(f"\nusage: {chunk.usage.prompt_tokens} prompt + "
              f"{chunk.usage.completion_tokens} completion tokens")
