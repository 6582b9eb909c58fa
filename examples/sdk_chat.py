"""Chat through the Python SDK (the server's OpenAI-compatible `/v1/chat/completions`):
a question, a streamed answer, history with a system prompt, an image, typed errors, and
the asyncio client.

    mstar serve testvla --preset tiny --load-format dummy     # in another shell
    python examples/sdk_chat.py [IMAGE]                       # IMAGE: a path or an URL

`MSTAR_URL` picks the server (default http://localhost:8000) and `MSTAR_API_KEY` the key,
if it has one. The tiny test model has random weights: its text is gibberish.
"""

import asyncio
import os
import sys

from mstar import AsyncMStarClient, MStarClient
from mstar.client import NotFoundError

url = os.environ.get("MSTAR_URL", "http://localhost:8000")

with MStarClient(url) as client:
    reply = client.chat("What is the capital of France?", max_tokens=16)
    print(f"reply: {reply.text!r} (finish: {reply.finish_reason}, usage: {reply.usage})")

    print("streamed: ", end="")
    for event in client.chat("Tell me a story", stream=True, max_tokens=16):
        print(repr(event.text), end=" ", flush=True)
    print()

    history = [{"role": "user", "content": "Hi!"},
               {"role": "assistant", "content": "Hello. How can I help?"},
               {"role": "user", "content": "Name a colour."}]
    print("with history:", repr(client.chat(history, system="Answer in one word.",
                                            max_tokens=8).text))

    if len(sys.argv) > 1:  # a file path, an http(s) URL, bytes or a PIL image all work
        seen = client.chat("What is in this picture?", images=sys.argv[1], max_tokens=8)
        print(f"image: {seen.text!r} ({seen.usage.prompt_tokens} prompt tokens)")

    try:
        client.chat("Hi", model="no-such-model")
    except NotFoundError as exc:
        print(f"error: {exc.status} {exc.message}")


async def main() -> None:
    async with AsyncMStarClient(url) as client:
        answers = await asyncio.gather(*(client.chat(q, max_tokens=8)
                                         for q in ("One?", "Two?", "Three?")))
        print("async:", [a.text for a in answers])
        async for event in await client.chat("Stream it", stream=True, max_tokens=8):
            print(repr(event.text), end=" ", flush=True)
        print()


asyncio.run(main())
