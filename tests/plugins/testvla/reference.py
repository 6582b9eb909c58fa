"""An independent plain-torch implementation of TestVLA, the oracle of the plugin's tests.

It reads the checkpoint's state dict by key and computes request by request with dense
attention over the whole sequence and explicit masks: no `mstar` layers, attention
backend, KV cache, engine or ForwardBatch, and nothing from `mstar_testvla` but the
checkpoint on disk. Generation recomputes the whole sequence at every step.

The model, as this file reads it:
- Tokens: ids < 256 are bytes; BOS 256, EOS 257, IMG 258, ACT 259, FRAME 260. IMG and ACT
  tokens of the prompt go through expert 1 (`*_moe_gen` weights), every other token through
  expert 0 (Llama), generated tokens too whatever their id. FRAME tokens take their input
  from `frame_in_proj` of their frame vector (zero when none is given). Each layer: per expert RMSNorm and q/k/v; joint attention over all tokens;
  per expert o_proj, residual, RMSNorm, SwiGLU MLP, residual.
- Attention mask: a token sees every earlier token; a run of IMG tokens, of ACT tokens,
  and each frame (`frame_tokens` FRAME tokens) also see their whole run (bidirectional).
- Positions (t, h, w), walking the sequence with a counter p: a text token gets (p, p, p)
  and p += 1; an image of gh×gw patches starting at p gets (p, p + r, p + c) and
  p += max(gh, gw); frame k (0-based) of a run of frames starting at p gets
  (p + k, p + r, p + c) and leaves p unchanged; ACT tokens continue as text.
  Rotary frequency pair j reads axis 0, 1 or 2 by `mrope_sections`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

BOS, EOS, IMG, ACT, FRAME = 256, 257, 258, 259, 260


class Reference:
    """TestVLA from a checkpoint directory (`model.safetensors` + `config.json`)."""

    def __init__(self, checkpoint: str | Path):
        root = Path(checkpoint)
        self.c = json.loads((root / "config.json").read_text())
        self.w = {k: v.double() for k, v in load_file(str(root / "model.safetensors")).items()}
        self.p = self.c["patch_size"]

    # -- primitives (float64 throughout: the oracle should not share our rounding) --------
    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.w[f"{name}.weight"].T
        bias = self.w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        var = (x * x).mean(-1, keepdim=True)
        return x / torch.sqrt(var + self.c["rms_norm_eps"]) * self.w[name]

    @staticmethod
    def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        """q [N, H, D], k/v [N, KVH, D], mask [N, N] (True: may attend) -> [N, H·D]."""
        n, heads, d = q.shape
        rep = heads // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)
        return out.reshape(n, heads * d)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate x [N, H, D] by 3-axis positions [3, N]: pair j (x[j], x[j + D/2]) turns by
        pos[axis(j)] · theta^(-2j/D)."""
        d = x.shape[-1]
        half = d // 2
        axis = []
        for a, n in enumerate(self.c["mrope_sections"]):
            axis += [a] * n
        inv = self.c["rope_theta"] ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
        angle = torch.stack([pos[axis[j]].double() * inv[j] for j in range(half)], dim=-1)
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    # -- vision --------------------------------------------------------------------------
    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One image [3, H, W] -> features [H/p · W/p, expert_hidden]."""
        p, dim = self.p, self.c["vision_hidden"]
        pv = pixel_values.double()
        gh, gw = pv.shape[1] // p, pv.shape[2] // p
        patches, pos = [], []
        quarter = dim // 4
        omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        for r in range(gh):
            for c in range(gw):
                patches.append(pv[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1))
                pos.append(torch.cat([torch.sin(r * omega), torch.cos(r * omega),
                                      torch.sin(c * omega), torch.cos(c * omega)]))
        x = self._lin(torch.stack(patches), "vision_model.patch_embed") + torch.stack(pos)
        b = "vision_model.block."
        heads = self.c["vision_heads"]
        n = x.shape[0]
        hx = self._rms(x, f"{b}norm1.weight")
        q, k, v = (self._lin(hx, f"{b}attn.{s}_proj").view(n, heads, -1) for s in "qkv")
        x = x + self._lin(self._attend(q, k, v, torch.ones(n, n, dtype=torch.bool)),
                          f"{b}attn.o_proj")
        hx = self._gelu_tanh(self._lin(self._rms(x, f"{b}norm2.weight"), f"{b}mlp.fc1"))
        x = x + self._lin(hx, f"{b}mlp.fc2")
        x = self._rms(x, "vision_model.post_norm.weight")
        return self._lin(x, "connector").float()

    # -- sequence layout -------------------------------------------------------------------
    def layout(self, ids: list[int], grid: tuple[int, int] | None,
               text_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(positions [3, N], mask [N, N], next text position) of a token sequence whose
        tokens from `text_from` on are generated text (placeholders only by position)."""
        ft = self.c["frame_tokens"]
        side = int(round(ft ** 0.5))
        pos, block = [], []
        n = len(ids)
        end = n if text_from is None else text_from
        p, i = 0, 0
        while i < n:
            tok = ids[i] if i < end else -1
            run = i
            while run < end and ids[run] == tok:
                run += 1
            run = max(run, i + 1)
            if tok == IMG:
                gh, gw = grid
                assert run - i == gh * gw, "IMG run must match the image grid"
                pos += [(p, p + k // gw, p + k % gw) for k in range(gh * gw)]
                block += [i] * (run - i)
                p += max(gh, gw)
            elif tok == FRAME:
                assert (run - i) % ft == 0, "FRAME runs are whole frames"
                for f in range((run - i) // ft):
                    pos += [(p + f, p + k // side, p + k % side) for k in range(ft)]
                    block += [i + f * ft] * ft
            elif tok == ACT:
                pos += [(p + k,) * 3 for k in range(run - i)]
                block += [i] * (run - i)
                p += run - i
            else:
                for k in range(i, run):
                    pos.append((p, p, p))
                    block.append(k)
                    p += 1
            i = run
        positions = torch.tensor(pos, dtype=torch.long).T.reshape(3, n)
        blk = torch.tensor(block)
        idx = torch.arange(n)
        mask = (idx[None, :] <= idx[:, None]) | (blk[None, :] == blk[:, None])
        return positions, mask, p

    # -- the LLM ---------------------------------------------------------------------------
    def run(self, ids: list[int], *, image: torch.Tensor | None = None,
            frames: torch.Tensor | None = None, x_t: torch.Tensor | None = None,
            t: float = 0.0, text_from: int | None = None) -> dict[str, torch.Tensor]:
        """Every token of `ids` at once. `frames` [n_FRAME, frame_dim] fill the prompt's
        FRAME tokens in order, `x_t` [n_ACT, action_dim] the ACT tokens (flow time `t`), the
        image's features the IMG tokens. Tokens from `text_from` on are generated text:
        expert 0 whatever their id (a generated FRAME token gets a zero frame vector).
        Returns per-row `hidden0` (expert 0, final norm; NaN on expert-1 rows), `hidden1`
        (expert 1, final norm; NaN elsewhere) and `mid`."""
        c, w = self.c, self.w
        grid = None if image is None else (image.shape[1] // self.p, image.shape[2] // self.p)
        positions, mask, _ = self.layout(ids, grid, text_from)
        tok = torch.tensor(ids)
        n = len(ids)
        prompt = torch.arange(n) < (n if text_from is None else text_from)
        e1 = ((tok == IMG) | (tok == ACT)) & prompt
        x0 = w["model.embed_tokens.weight"][tok]
        is_frame = tok == FRAME
        frame_rows = torch.zeros(n, c["frame_dim"], dtype=torch.float64)
        if frames is not None:
            frame_rows[is_frame & prompt] = frames.double()
        x0[is_frame] = self._lin(frame_rows[is_frame], "frame_in_proj")
        x1 = torch.zeros(n, c["expert_hidden"], dtype=torch.float64)
        if image is not None:
            x1[(tok == IMG) & prompt] = self.vision(image).double()
        if x_t is not None:
            half = c["expert_hidden"] // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64)
                              / half)
            temb = torch.cat([torch.sin(1000 * t * freqs), torch.cos(1000 * t * freqs)])
            tproj = self._lin(torch.nn.functional.silu(self._lin(temb, "time_mlp_in")),
                              "time_mlp_out")
            x1[(tok == ACT) & prompt] = self._lin(x_t.double(), "action_in_proj") + tproj
        rows = [~e1, e1]
        h = [x0[~e1], x1[e1]]
        heads, kv_heads, d = (c["num_attention_heads"], c["num_key_value_heads"],
                              c["head_dim"])
        mid = None
        for layer in range(c["num_hidden_layers"]):
            if layer == c["mid_layer"]:
                mid = h[0]
            pre = f"model.layers.{layer}."
            q = torch.zeros(n, heads * d, dtype=torch.float64)
            k = torch.zeros(n, kv_heads * d, dtype=torch.float64)
            v = torch.zeros(n, kv_heads * d, dtype=torch.float64)
            for e, sfx in enumerate(("", "_moe_gen")):
                hn = self._rms(h[e], f"{pre}input_layernorm{sfx}.weight")
                q[rows[e]] = hn @ w[f"{pre}self_attn.q_proj{sfx}.weight"].T
                k[rows[e]] = hn @ w[f"{pre}self_attn.k_proj{sfx}.weight"].T
                v[rows[e]] = hn @ w[f"{pre}self_attn.v_proj{sfx}.weight"].T
            q = self._rope(q.view(n, heads, d), positions)
            k = self._rope(k.view(n, kv_heads, d), positions)
            o = self._attend(q, k, v.view(n, kv_heads, d), mask)
            for e, sfx in enumerate(("", "_moe_gen")):
                x = h[e] + o[rows[e]] @ w[f"{pre}self_attn.o_proj{sfx}.weight"].T
                xn = self._rms(x, f"{pre}post_attention_layernorm{sfx}.weight")
                m = f"{pre}mlp{sfx}."
                gate = torch.nn.functional.silu(xn @ w[f"{m}gate_proj.weight"].T)
                h[e] = x + (gate * (xn @ w[f"{m}up_proj.weight"].T)) @ w[f"{m}down_proj.weight"].T
        if mid is None:
            mid = h[0]
        out = {}
        for name, e, width, src, norm in (
                ("hidden0", 0, c["hidden_size"], h[0], "model.norm.weight"),
                ("hidden1", 1, c["expert_hidden"], h[1], "model.norm_moe_gen.weight"),
                ("mid", 0, c["hidden_size"], mid, None)):
            full = torch.full((n, width), float("nan"), dtype=torch.float64)
            full[rows[e]] = src if norm is None else self._rms(src, norm)
            out[name] = full
        return out

    def logits(self, ids: list[int], image: torch.Tensor | None = None,
               text_from: int | None = None) -> torch.Tensor:
        """Logits [N, vocab] at every position (NaN rows at expert-1 tokens)."""
        hidden = self.run(ids, image=image, text_from=text_from)["hidden0"]
        return (hidden @ self.w["lm_head.weight"].T).float()

    def generate_text(self, prompt_ids: list[int], image: torch.Tensor | None,
                      max_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens (stopping after EOS or `max_tokens`) and the first step's logits."""
        ids, out, first = list(prompt_ids), [], None
        for _ in range(max_tokens):
            last = self.logits(ids, image, text_from=len(prompt_ids))[-1]
            first = last if first is None else first
            token = int(torch.argmax(last))
            out.append(token)
            ids.append(token)
            if token == EOS:
                break
        return out, first

    # -- actions ---------------------------------------------------------------------------
    def uncond_length(self, prompt_ids: list[int]) -> int:
        """The CFG-unconditional context: up to the image's last patch (BOS alone without
        an image)."""
        img = [i for i, tok in enumerate(prompt_ids) if tok == IMG]
        return img[-1] + 1 if img else 1

    def velocity(self, prompt_ids: list[int], image: torch.Tensor | None, x_t: torch.Tensor,
                 t: float, *, uncond: bool = False) -> torch.Tensor:
        """Expert 1's velocity [horizon, action_dim] for actions appended after the prompt;
        the unconditional branch sees only `uncond_length` prompt tokens, its actions
        appended right after them (their positions follow that shorter context)."""
        horizon = x_t.shape[0]
        keep = self.uncond_length(prompt_ids) if uncond else len(prompt_ids)
        ids = list(prompt_ids[:keep]) + [ACT] * horizon
        h = self.run(ids, image=image if IMG in ids else None, x_t=x_t,
                     t=t)["hidden1"][keep:]
        return self._lin(h, "action_out_proj").float()

    def act(self, prompt_ids: list[int], image: torch.Tensor | None, num_steps: int,
            guidance_scale: float, noise: torch.Tensor,
            cfg_interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Euler flow matching from t=1 (`noise`) to t=0 with CFG at the steps k whose flow
        time 1 - k/num_steps lies in (lo, hi] of `cfg_interval` (plain velocity elsewhere)."""
        x, t, dt = noise.double(), 1.0, -1.0 / num_steps
        lo, hi = cfg_interval
        for k in range(num_steps):
            v = self.velocity(prompt_ids, image, x, t).double()
            if guidance_scale != 1 and lo < 1 - k / num_steps <= hi:
                vu = self.velocity(prompt_ids, image, x, t, uncond=True).double()
                v = vu + guidance_scale * (v - vu)
            x, t = x + dt * v, t + dt
        return x.float()

    # -- frames ----------------------------------------------------------------------------
    def rollout(self, prompt_ids: list[int], frame: torch.Tensor, num_frames: int,
                image: torch.Tensor | None = None,
                actions: torch.Tensor | None = None) -> torch.Tensor:
        """`prompt_ids` end with the initial frame's FRAME tokens; predict `num_frames`
        frames, each appended as the next frame (plus `actions[k]` [frame_dim], when given,
        for the k-th appended one: a planner's candidate). Returns [num_frames,
        frame_tokens, dim]."""
        ft = self.c["frame_tokens"]
        ids, frames, preds = list(prompt_ids), frame.double(), []
        for k in range(num_frames):
            h = self.run(ids, image=image, frames=frames)["hidden0"][-ft:]
            pred = self._lin(h, "frame_out_proj")
            preds.append(pred)
            ids += [FRAME] * ft
            if actions is not None and k < len(actions):
                pred = pred + actions[k].double()
            frames = torch.cat([frames, pred])
        return torch.stack(preds).float()

    # -- consumer --------------------------------------------------------------------------
    def decode_window(self, codes: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Consumer on one window: [L] codes, [L, hidden] -> [L · samples_per_unit]."""
        e = self.w["consumer.code_embed.weight"][codes.long()] + self._lin(
            hidden.double(), "consumer.hidden_proj")
        wc, bc = self.w["consumer.conv.weight"], self.w["consumer.conv.bias"]
        pad = wc.shape[-1] // 2

        def conv(x: torch.Tensor) -> torch.Tensor:  # x [L, C], zero padding at the edges
            xp = torch.cat([x.new_zeros(pad, x.shape[1]), x, x.new_zeros(pad, x.shape[1])])
            return torch.stack([torch.einsum("oik,ki->o", wc, xp[i:i + wc.shape[-1]]) + bc
                                for i in range(x.shape[0])])

        y = conv(torch.nn.functional.silu(conv(e)))
        return torch.tanh(self._lin(y, "consumer.out")).reshape(-1).float()

    def consume(self, codes: torch.Tensor, hidden: torch.Tensor, policy) -> torch.Tensor:
        """The streamed output for a whole stream, window by window as `policy` (a
        `ChunkPolicy`) cuts it: emit boundaries 0, first_chunk (or hop), +hop, …; the window
        for units [e, e') spans [e − left, e' + lookahead) clipped to the stream."""
        n, spu = codes.shape[0], self.c["samples_per_unit"]
        out, start, k = [], 0, 0
        while start < n:
            step = policy.first_chunk if k == 0 and policy.first_chunk else policy.hop
            stop = min(start + step, n)
            lo, hi = max(0, start - policy.emit[0]), min(n, stop + policy.window - policy.emit[1])
            wave = self.decode_window(codes[lo:hi], hidden[lo:hi])
            out.append(wave[(start - lo) * spu:(stop - lo) * spu])
            start, k = stop, k + 1
        return torch.cat(out)
