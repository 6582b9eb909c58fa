"""The non-streamed `/generate` answer for a large tensor output: JSON (base64, the tensor in
`events` and again in `outputs`) against the safetensors body (`Accept:
application/vnd.safetensors`), side by side.

Why: V-JEPA 2's latents of one clip are ~32 MiB of float32; this shows what each answer
costs the server (building it: `api_server.app._result`) and the SDK (decoding it:
`client._protocol.parse_generate`), and its size on the wire. No model runs: the events are
those a model emitting one tensor would send.

    python benchmarks/bench_outputs.py                     # 8192 x 1024 float32 (32 MiB)
    python benchmarks/bench_outputs.py --shape 256,1024 --repeat 5
"""

from __future__ import annotations

import argparse
import time

import httpx
import numpy as np
import torch

from mstar import events
from mstar.api_server.app import _result
from mstar.client._protocol import parse_generate


def best_of(repeat: int, fn):
    """The fastest of `repeat` runs (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192,1024", help="the tensor's shape (float32)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    collected = [events.NamedTensor(name="latents", tensor=events.TensorData.from_tensor(tensor)),
                 events.Finished(reason="stop")]
    print(f"one float32 output {list(shape)}: {tensor.numel() * 4 / 2**20:.1f} MiB")
    print(f"{'answer':<12} {'size MiB':>9} {'build ms':>9} {'SDK decode ms':>14}")
    sizes = {}
    for label, binary in (("json", False), ("safetensors", True)):
        build, response = best_of(args.repeat, lambda b=binary: _result("req", collected, b))
        answer = httpx.Response(200, content=response.body,
                                headers={"content-type": response.media_type})
        decode, parsed = best_of(args.repeat, lambda a=answer: parse_generate(a))
        np.testing.assert_array_equal(parsed.outputs["latents"], tensor.numpy())
        sizes[label] = len(response.body)
        print(f"{label:<12} {len(response.body) / 2**20:>9.1f} {build * 1e3:>9.0f} "
              f"{decode * 1e3:>14.0f}")
    print(f"safetensors / json size: {sizes['safetensors'] / sizes['json']:.2f}")


if __name__ == "__main__":
    main()
