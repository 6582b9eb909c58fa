"""The core sampler: logits [B, V] plus one `SampleRequest` per row -> token ids.

Order of processing, per row (each step skipped where the row's params make it a no-op):
1. `logit_bias` (OpenAI's: added to the raw logits; ids past the vocabulary ignored), then
   logits processors, by name from the registry, in `params.logits_processors` order;
   then `response_format`: tokens its grammar forbids at this point get -inf
   (`mstar.engine.structured`). After the processors, so none can bring a forbidden token
   back; before the penalties and filters, so those only reweigh allowed tokens and top-k /
   top-p / min-p keep their meaning among them (a penalty never lifts -inf);
2. repetition penalty (HF semantics) over prompt + history: positive logits of seen tokens
   are divided by the penalty, negative ones multiplied;
3. frequency and presence penalties (OpenAI semantics) over history:
   `logit -= frequency_penalty * count + presence_penalty * (count > 0)`;
4. temperature 0: greedy argmax (ties go to the lowest token id); otherwise
5. divide by temperature, then top-k, then top-p (the smallest set of most likely tokens
   whose cumulative probability reaches top_p, never empty), then min-p (drop tokens whose
   probability is below min_p times the largest);
6. draw by inverse CDF: one uniform u per row, keyed by the row's (seed, child, site,
   step) (`mstar.engine.rng`); the token is the first id whose cumulative probability
   reaches u times the total.

Why: it samples exactly from `probs` and consumes no shared generator state, so a row's
token is a pure function of its logits, params and key, never of the other rows in the
batch or of the rank that runs it; and it needs one keyed draw per row, not one per
vocabulary entry (an exponential race over a 157k vocabulary cost ~10 ms a row on CPU). Rows are processed together with per-row parameter
tensors; per-row Python work is limited to building small index lists (and calling
user-registered logits processors).

`logprobs` report the raw model distribution (log_softmax of the unprocessed logits), as
vLLM does by default, also for constrained rows: they say how likely the model found each
token, not how likely the grammar-masked draw was. Stop strings are not handled here: the frontend matches them in
the detokenised text (`mstar.chat.stop`), where a string split across tokens can be seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mstar.engine.rng import key_seed, uniform_rows
from mstar.engine.structured import GrammarStates, RowMasks
from mstar.model.forward import SeqKey
from mstar.model.sampling import SamplingParams, get_logits_processor


@dataclass
class SampleRequest:
    """One row to sample. `step` is the position of the token being sampled; `history` the
    ids generated so far at this site; `prompt_ids` count for the repetition penalty only.
    `key` names the sampled sequence across steps: a `response_format` keeps its grammar
    state under it (None for in-node sampling, which cannot be constrained)."""

    params: SamplingParams
    seed: int
    child: int
    site: str
    step: int
    history: Sequence[int]
    prompt_ids: Sequence[int] = ()
    key: SeqKey | None = None


@dataclass
class SampleResult:
    """`logprobs[b]`: raw log-prob of `token_ids[b]`; `top_logprobs[b]`: the row's
    `params.logprobs` most likely (id, log-prob) pairs, [] where it asked for none. Both are
    None when no row asked for logprobs. `failed` maps a row to why its `response_format`
    could not be applied: its token is meaningless and its request must fail."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_logprobs: list[list[tuple[int, float]]] | None
    failed: dict[int, str] = field(default_factory=dict)


def _row_tensor(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _token_index(rows: Sequence[SampleRequest], idx: Sequence[int], with_prompt: bool,
                 vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(position in `idx`, token id) pairs of the listed rows' history (and prompt). Ids
    outside the logits' vocabulary (placeholders) cannot be sampled, so they are dropped."""
    lengths: list[int] = []
    toks: list[int] = []
    for i in idx:
        before = len(toks)
        if with_prompt:
            toks.extend(rows[i].prompt_ids)
        toks.extend(rows[i].history)
        lengths.append(len(toks) - before)
    tok = torch.tensor(toks, dtype=torch.long)
    pos = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor(lengths))
    valid = (tok >= 0) & (tok < vocab)
    return pos[valid].to(device), tok[valid].to(device)


def _float32(t: torch.Tensor) -> torch.Tensor:
    """`t` as float32, without a call when it is (each call is a GIL hand-off, see
    `kv_engine`; sampling runs at every step)."""
    return t if t.dtype == torch.float32 else t.float()


def process_logits(logits: torch.Tensor, rows: Sequence[SampleRequest],
                   masks: RowMasks | None = None) -> torch.Tensor:
    """Steps 1-3 (processors, grammar masks, repetition, frequency/presence penalties) as
    float32 logits.

    `logits` is never modified; it is returned as is (cast) when no row needs any step."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], "
                         f"got {tuple(logits.shape)}")
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    procs = [i for i, r in enumerate(rows) if r.params.logits_processors]
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    freq = [i for i, r in enumerate(rows)
            if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
    if not (biased or procs or rep or freq or masks):
        return _float32(logits)
    x = logits.to(torch.float32, copy=True)
    for i in biased:
        bias = {t: b for t, b in rows[i].params.logit_bias.items() if t < x.shape[-1]}
        if bias:
            x[i, list(bias)] += torch.tensor(list(bias.values()), device=x.device)
    for i in procs:
        for name in rows[i].params.logits_processors:
            x[i] = get_logits_processor(name)(rows[i].history, x[i])
    if masks:
        x[masks.rows] = x[masks.rows].masked_fill(~masks.allowed, float("-inf"))

    if rep:
        pos, toks = _token_index(rows, rep, True, x.shape[-1], x.device)
        sub = x[rep]
        seen = torch.zeros_like(sub, dtype=torch.bool)
        seen[pos, toks] = True
        penalty = _row_tensor([rows[i].params.repetition_penalty for i in rep], sub)
        x[rep] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)

    if freq:
        pos, toks = _token_index(rows, freq, False, x.shape[-1], x.device)
        sub = x[freq]
        counts = torch.zeros_like(sub)
        counts.index_put_((pos, toks), torch.ones_like(toks, dtype=sub.dtype), accumulate=True)
        fp = _row_tensor([rows[i].params.frequency_penalty for i in freq], sub)
        pp = _row_tensor([rows[i].params.presence_penalty for i in freq], sub)
        x[freq] = sub - fp * counts - pp * (counts > 0).to(sub.dtype)
    return x


#: top-k / top-p look for their cut among this many most likely tokens first (a partial
#: `topk`), and sort the whole vocabulary only for rows whose cut lies beyond them: a full
#: stable sort of a 157k vocabulary costs ~20 ms a row on CPU, the candidates ~3 ms.
TOP_CANDIDATES = 4096


def _filter(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Step 5: temperature, top-k, top-p, min-p; returns the probabilities to draw from."""
    vocab = x.shape[-1]
    x = x / _row_tensor([p.temperature for p in params], x)
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    # top_p 1 must keep everything even where the float cumulative sum overshoots 1.
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        x = x.masked_fill(~_nucleus(x, top_k, top_p), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = _row_tensor([p.min_p for p in params], probs)
        floor = min_p * probs.amax(dim=-1, keepdim=True)
        probs = torch.softmax(x.masked_fill(probs < floor, float("-inf")), dim=-1)
    return probs


def _nucleus(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """The tokens top-k and top-p keep ([B, V] bool): the most likely ones, ranked by logit
    (ties: the lower id first, so top_k=1 is greedy), up to `top_k` of them and until the
    probability before a token reaches `top_p`. The cut is looked for among the
    `TOP_CANDIDATES` most likely tokens; rows where it may lie further are sorted whole."""
    vocab = x.shape[-1]
    keep = torch.zeros_like(x, dtype=torch.bool)
    cand = min(vocab, max(TOP_CANDIDATES, *(k for k in top_k if k < vocab), 1))
    values, order = torch.topk(x, cand, dim=-1)
    # the candidates in rank order, ties by id (a tie group reaching past the candidates
    # is cut arbitrarily by topk: it matters only when the cut falls inside that group)
    by_id = torch.sort(order, dim=-1).values
    ranked = torch.sort(x.gather(-1, by_id), dim=-1, descending=True, stable=True)
    order = by_id.gather(-1, ranked.indices)
    kept, settled = _cut(ranked.values, x, top_k, top_p, cand < vocab)
    keep.scatter_(-1, order, kept)
    rest = [i for i, done in enumerate(settled.tolist()) if not done]
    if rest:
        sorted_x, whole = torch.sort(x[rest], dim=-1, descending=True, stable=True)
        kept_rest, _ = _cut(sorted_x, x[rest], [top_k[i] for i in rest],
                            [top_p[i] for i in rest], False)
        keep[rest] = torch.zeros_like(kept_rest).scatter(-1, whole, kept_rest)
    return keep


def _cut(sorted_x: torch.Tensor, x: torch.Tensor, top_k: list[int], top_p: list[float],
         partial: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the ranked `sorted_x` (a prefix of each row's ranking when `partial`) top-k
    and top-p keep, and per row whether the cut was found within them."""
    n = sorted_x.shape[-1]
    ranks = torch.arange(n, device=x.device).unsqueeze(0)
    k = torch.tensor(top_k, device=x.device).unsqueeze(1)
    drop = ranks >= k
    # probabilities after top-k, over the whole vocabulary: log-sum-exp of the kept logits
    topk_x = sorted_x.masked_fill(drop, float("-inf"))
    if partial:
        beyond = (k > n).squeeze(1)  # top-k keeps tokens past the candidates
        total = torch.where(beyond.unsqueeze(1), torch.logsumexp(x, dim=-1, keepdim=True),
                            torch.logsumexp(topk_x, dim=-1, keepdim=True))
        sorted_probs = torch.exp(topk_x - total)
    else:
        sorted_probs = torch.softmax(topk_x, dim=-1)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= before >= _row_tensor(top_p, sorted_probs)
    settled = torch.ones(sorted_x.shape[0], dtype=torch.bool, device=x.device)
    if partial:
        # settled where the cut falls among the candidates (one of them is dropped)
        settled = drop.any(dim=-1)
    return ~drop, settled


def sample(logits: torch.Tensor, rows: Sequence[SampleRequest],
           grammar: GrammarStates | None = None) -> SampleResult:
    """Sample one token per row of `logits` [B, V] (see the module docstring for the order).

    Params are assumed validated at admission (`SamplingParams.validate`). `grammar` holds
    the state of rows with a `response_format` (ValueError when such a row comes without)."""
    raw = _float32(logits)
    masks = None
    if any(r.params.response_format is not None for r in rows):
        if grammar is None:
            raise ValueError("rows with a response_format need grammar state to sample")
        masks = grammar.masks(rows, raw.shape[-1], raw.device)
    x = process_logits(raw, rows, masks)
    failed = dict(masks.failed) if masks else {}
    if masks:
        # A logits processor may have ruled out every token the grammar allows.
        stuck = (~torch.isfinite(x[masks.rows]).any(dim=-1)).tolist()
        failed.update({i: "no token the response_format allows is left (a logits processor "
                          "ruled them all out)" for i, s in zip(masks.rows, stuck) if s})
    greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0]
    drawn = [i for i, r in enumerate(rows) if r.params.temperature != 0]
    if not drawn:  # every row greedy: one call
        token_ids = x.argmax(dim=-1)
    else:
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    if greedy and drawn:
        token_ids[greedy] = x[greedy].argmax(dim=-1)
    if drawn:
        sel = slice(None) if not greedy else drawn
        probs = _filter(x[sel], [rows[i].params for i in drawn])
        keys = torch.tensor([key_seed(rows[i].seed, rows[i].child, rows[i].site, rows[i].step)
                             for i in drawn], dtype=torch.int64, device=logits.device)
        cdf = probs.double().cumsum(dim=-1)
        target = uniform_rows(keys, 1) * cdf[:, -1:]  # u in (0, 1): never 0, never all
        token_ids[sel] = torch.searchsorted(cdf, target).squeeze(1).clamp_(max=cdf.shape[-1] - 1)

    asks = [r.params.logprobs for r in rows]
    if all(k is None for k in asks):
        return SampleResult(token_ids, None, None, failed)
    log_probs = torch.log_softmax(raw, dim=-1)
    chosen = log_probs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top: list[list[tuple[int, float]]] = [[] for _ in rows]
    most = min(max(k or 0 for k in asks), raw.shape[-1])
    if most:
        values, ids = log_probs.topk(most, dim=-1)
        values_l, ids_l = values.tolist(), ids.tolist()
        for i, k in enumerate(asks):
            top[i] = list(zip(ids_l[i][:k or 0], values_l[i][:k or 0]))
    return SampleResult(token_ids, chosen, top, failed)


def stop_reason(token_id: int, params: SamplingParams, *, num_generated: int, seq_len: int,
                max_seq_len: int, eos_token_ids: Sequence[int]) -> str | None:
    """Why generation at this site ends after `token_id`, or None to go on.

    A stop/EOS token wins over the length limit (the sequence ended by its own choice)."""
    if token_id in params.stop_token_ids or (
            not params.ignore_eos and token_id in eos_token_ids):
        return "stop"
    if (params.max_tokens is not None and num_generated >= params.max_tokens) \
            or seq_len >= max_seq_len:
        return "length"
    return None
