"""The native `/generate` route through the Python SDK: the model's own request fields in,
`mstar.events` out (text whole or streamed), and `act` for testvla's robot actions (a numpy
array, from the JSON answer or a safetensors one).

    mstar serve testvla --preset tiny --load-format dummy     # in another shell
    python examples/sdk_generate.py

`MSTAR_URL` picks the server (default http://localhost:8000) and `MSTAR_API_KEY` the key,
if it has one. The tiny test model has random weights: its text is gibberish.
"""

import os

import numpy as np

from mstar import MStarClient

url = os.environ.get("MSTAR_URL", "http://localhost:8000")

with MStarClient(url) as client:
    print("health:", client.health()["status"])
    print("models:", [m.id for m in client.models()])

    # The fields are the model's request schema (testvla: prompt, max_tokens, mode, ...).
    result = client.generate(prompt="The capital of France is", max_tokens=16, temperature=0)
    print(f"text: {result.text[0]!r} (finish: {result.finish_reason}, "
          f"{result.usage.completion_tokens} tokens)")

    # Streamed: events as they are produced; only text deltas have `.text`.
    print("streamed: ", end="")
    for event in client.generate(prompt="Tell me a story", max_tokens=16, stream=True):
        print(repr(getattr(event, "text", "")), end=" ", flush=True)
    print()

    # A vision-language-action request: `act` returns the chunk as a numpy array.
    actions = client.act(prompt="pick up the cup", mode="act", num_steps=4, seed=0)
    print(f"actions: shape {list(actions.shape)}, "
          f"first row {[round(float(x), 3) for x in actions[0]]}")

    # The same outputs as one safetensors body (for tensors too large for base64 JSON).
    binary = client.act(prompt="pick up the cup", mode="act", num_steps=4, seed=0, binary=True)
    print("binary answer equals the JSON one:", np.array_equal(binary, actions))
