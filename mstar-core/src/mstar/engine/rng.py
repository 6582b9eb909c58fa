"""Counter-based, keyed randomness: every draw is a pure function of (seed, child, site, step).

Why: a request's tokens and noise must not depend on which other requests share its batch,
nor on the rank or device that runs it. So no draw ever consumes a shared generator's state:
each key `(seed, child, site, step)` is hashed (blake2b, stable across processes and
versions) into a 63-bit `key_seed`, and randomness is derived from that key alone.

Two derivations, both keyed the same way:
- `randn` (flow noise) draws from a `torch.Generator` seeded with the key, on CPU in float32,
  then moves the result, so CPU and GPU runs get bit-identical noise.
- `uniform_rows` (the sampler's draw) evaluates Philox4x32-10 (Salmon et
  al., 2011) with the key as Philox key and the element index as counter, in int64 tensor
  ops on the logits' own device: a whole batch of rows costs a few kernels, no per-row
  generator and no host round trip. The integer stream and its uniforms are identical on
  every device.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10
_CPU_CHUNK_ELEMENTS = 1 << 15
_DEVICE_CHUNK_ELEMENTS = 1 << 22


def key_seed(seed: int, child: int, site: str, step: int) -> int:
    """The 63-bit seed of key (seed, child, site, step); stable across processes and hosts.

    The site string goes last so the encoding is unambiguous (numbers hold no NUL)."""
    data = f"{seed}\0{child}\0{step}\0{site}".encode()
    digest = hashlib.blake2b(data, digest_size=8, person=b"mstar-rng-v1").digest()
    return int.from_bytes(digest, "little") >> 1


def noise_site(site: str, outer: tuple[int, ...] = (), join_round: int | None = None) -> str:
    """The site `ctx.randn` keys noise by: `site`, plus the iterations of the loops enclosing
    the innermost one ("@i.j") and the `Join` round ("#r") when there are any, so nested
    loops and join rounds draw fresh noise while a single loop's keys stay (site, iteration).
    A reference reproducing a walk's noise calls `randn(..., site=noise_site(...), step=...)`."""
    if outer:
        site = f"{site}@{'.'.join(map(str, outer))}"
    if join_round is not None:
        site = f"{site}#{join_round}"
    return site


def draw_seed() -> int:
    """A fresh 63-bit seed for a request that gave none (drawn once, at admission)."""
    return secrets.randbits(63)


def generator_for(seed: int, child: int, site: str, step: int,
                  device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator whose whole stream belongs to this key alone."""
    gen = torch.Generator(device=device)
    gen.manual_seed(key_seed(seed, child, site, step))
    return gen


def randn(shape: tuple[int, ...] | torch.Size, *, seed: int, child: int, site: str, step: int,
          dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """Standard normal noise for this key, drawn on CPU in float32 (placement-independent),
    then cast and moved. A different `shape` gives a different stream (no shared prefix)."""
    gen = generator_for(seed, child, site, step)
    out = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def _mulhilo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of x * m for 32-bit x and m >= 2**31, in int64 arithmetic.

    x * m may reach 2**64, so multiply by (m - 2**32) instead: same low word, the product
    stays within int64 (no overflow), and the high word is that product's floor-shift + x."""
    prod = x * (m - (1 << 32))
    return (prod >> 32) + x, prod & _MASK32


def philox4x32(counter: tuple[torch.Tensor, ...],
               key: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 tensors holding 32-bit words: 4 counter words and
    2 key words in, 4 random words out."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(_PHILOX_ROUNDS):
        if r:
            k0 = (k0 + _PHILOX_W[0]) & _MASK32
            k1 = (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _uniform_blocks(keys: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Uniforms of Philox blocks [start, stop) for keys [B, 1]: two per block, [B, 2 * n]."""
    blocks = torch.arange(start, stop, dtype=torch.int64, device=keys.device).unsqueeze(0)
    zero = torch.zeros_like(blocks)
    w0, w1, w2, w3 = philox4x32((blocks & _MASK32, blocks >> 32, zero, zero),
                                (keys & _MASK32, keys >> 32))
    ints = torch.stack((((w0 >> 6) << 26) | (w1 >> 6), ((w2 >> 6) << 26) | (w3 >> 6)), dim=-1)
    return (2 * ints.reshape(keys.shape[0], -1) + 1).to(torch.float64) * 2.0 ** -53


def uniform_rows(keys: torch.Tensor, n: int) -> torch.Tensor:
    """float64 uniforms in the open interval (0, 1), shape [B, n], on `keys`' device: row b
    is a pure function of `keys[b]` (a `key_seed`), whatever the other rows are.

    Each Philox block gives two 52-bit uniforms, (2*i + 1) / 2**53: exact in float64 and never
    0 or 1, so `-log(u)` is finite and positive. Blocks go in chunks: cache-sized on CPU (the
    ~30 int64 ops per word are memory-bound otherwise), bounded elsewhere so a large batch
    times vocabulary does not hold gigabytes of int64 temporaries."""
    keys = keys.to(torch.int64).reshape(-1, 1)
    if n == 0:
        return torch.empty(keys.shape[0], 0, dtype=torch.float64, device=keys.device)
    num_blocks = (n + 1) // 2
    budget = _CPU_CHUNK_ELEMENTS if keys.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    chunk = max(1, budget // keys.shape[0])
    parts = [_uniform_blocks(keys, start, min(start + chunk, num_blocks))
             for start in range(0, num_blocks, chunk)]
    return torch.cat(parts, dim=1)[:, :n] if len(parts) > 1 else parts[0][:, :n]


def _keyed(shape: tuple[int, ...] | torch.Size, seed: int, child: int, site: str, step: int,
           device: str | torch.device,
           draw: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    key = torch.tensor([key_seed(seed, child, site, step)], dtype=torch.int64, device=device)
    numel = 1
    for size in shape:
        numel *= size
    return draw(key, numel).reshape(tuple(shape))


def uniform(shape: tuple[int, ...] | torch.Size, *, seed: int, child: int, site: str, step: int,
            dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> torch.Tensor:
    """Uniforms for this key (the Philox stream of `uniform_rows`); in (0, 1) before the cast
    to `dtype`, which may round values next to 1 up to 1."""
    return _keyed(shape, seed, child, site, step, device, uniform_rows).to(dtype)
