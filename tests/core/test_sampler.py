"""The core sampler and its keyed RNG: determinism per key, batch independence, the
filters' semantics and exact distributions, penalties against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from mstar.engine import rng
from mstar.engine.sampler import SampleRequest, process_logits, sample, stop_reason
from mstar.model.sampling import (
    SamplingParams,
    get_logits_processor,
    logits_processor_names,
    register_logits_processor,
)


def _ban_token_zero(history, logits):
    out = logits.clone()
    out[0] = float("-inf")
    return out


def _boost_last(history, logits):
    out = logits.clone()
    if history:
        out[history[-1]] += 100.0
    return out


register_logits_processor("test_ban_zero", _ban_token_zero)
register_logits_processor("test_boost_last", _boost_last)


def row(params: SamplingParams | None = None, *, seed: int = 0, child: int = 0,
        site: str = "default", step: int = 0, history=(), prompt_ids=()) -> SampleRequest:
    return SampleRequest(params=params or SamplingParams(), seed=seed, child=child, site=site,
                         step=step, history=list(history), prompt_ids=list(prompt_ids))


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 7) -> torch.Tensor:
    """`n` samples of one logits row [V], each under its own key (step varies)."""
    rows = [row(params, seed=seed, step=s) for s in range(n)]
    return sample(logits.expand(n, -1), rows).token_ids


def empirical(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p.double() - q.double()).abs().sum().item()


# --- rng ------------------------------------------------------------------------------------

def test_key_seed_is_a_fixed_stable_hash():
    # Computed once; a change here means every seeded request changes its outputs.
    assert rng.key_seed(1234, 0, "default", 7) == 3059750796393225729
    keys = {rng.key_seed(1234, 0, "default", 7), rng.key_seed(1234, 1, "default", 7),
            rng.key_seed(1234, 0, "noise", 7), rng.key_seed(1234, 0, "default", 8),
            rng.key_seed(1235, 0, "default", 7)}
    assert len(keys) == 5
    assert all(0 <= k < 2 ** 63 for k in keys)


def test_draw_seed_is_fresh_and_63_bit():
    seeds = {rng.draw_seed() for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2 ** 63 for s in seeds)


@pytest.mark.parametrize("ctr,key,want", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_random123_known_answers(ctr, key, want):
    out = rng.philox4x32(tuple(torch.tensor([c]) for c in ctr),
                         tuple(torch.tensor([k]) for k in key))
    assert tuple(int(w) for w in out) == want


def test_randn_is_keyed():
    key = dict(seed=3, child=0, site="noise", step=2)
    a = rng.randn((4, 8), **key)
    assert a.shape == (4, 8) and a.dtype == torch.float32
    assert torch.equal(a, rng.randn((4, 8), **key))
    assert torch.equal(a.to(torch.bfloat16), rng.randn((4, 8), **key, dtype=torch.bfloat16))
    assert not torch.equal(a, rng.randn((4, 8), **{**key, "step": 3}))
    assert not torch.equal(a, rng.randn((4, 8), **{**key, "child": 1}))
    big = rng.randn((20000,), seed=3, child=0, site="noise", step=0)
    assert abs(big.mean().item()) < 0.03 and abs(big.std().item() - 1) < 0.03


def test_uniform_rows_depend_only_on_their_key():
    # 64 rows of 3001 draws go in several chunks on CPU, a single row in one.
    keys = torch.tensor([rng.key_seed(1, 0, "s", t) for t in range(64)])
    together = rng.uniform_rows(keys, 3001)
    for b in (0, 1, 37, 63):
        assert torch.equal(together[b], rng.uniform_rows(keys[b:b + 1], 3001)[0])
    assert together.min() > 0 and together.max() < 1
    assert not torch.equal(together[0], together[1])
    u = rng.uniform((50000,), seed=1, child=0, site="s", step=0, dtype=torch.float64)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005


# --- greedy and determinism ----------------------------------------------------------------

def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    torch.manual_seed(0)
    logits = torch.randn(64, 300)
    greedy = SamplingParams(temperature=0.0)
    out = sample(logits, [row(greedy, step=i) for i in range(64)])
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.top_logprobs is None
    tied = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0]])
    assert sample(tied, [row(greedy)]).token_ids.item() == 1


def test_same_key_same_token_other_child_or_step_differs():
    torch.manual_seed(1)
    logits = torch.randn(1, 64) * 0.1  # nearly flat: independent draws rarely agree
    params = SamplingParams(temperature=1.0)

    def tokens(**over):
        return torch.stack([
            sample(logits, [row(params, **{"seed": s, "step": 5, **over})]).token_ids[0]
            for s in range(200)])

    base = tokens()
    assert torch.equal(base, tokens())
    assert (base == tokens(child=1)).float().mean() < 0.1
    assert (base == tokens(step=6)).float().mean() < 0.1
    assert (base == tokens(site="talker")).float().mean() < 0.1


def test_batch_independence():
    torch.manual_seed(2)
    vocab = 40
    target = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.02)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=3),
        SamplingParams(temperature=0.7, min_p=0.3, repetition_penalty=1.5),
        SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=1.0,
                       logits_processors=["test_ban_zero"]),
    ]
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
        step = int(torch.randint(0, 4096, (1,), generator=gen))
        logits = torch.randn(5, vocab, generator=gen) * 2
        where = int(torch.randint(0, 5, (1,), generator=gen))
        mine = row(target, seed=seed, step=step)
        alone = sample(logits[where:where + 1], [mine]).token_ids[0]
        rows = [row(p, seed=seed + 1 + j, step=step, history=[1, 2, 2])
                for j, p in enumerate(others)]
        rows.insert(where, mine)
        assert sample(logits, rows).token_ids[where] == alone


# --- filters --------------------------------------------------------------------------------

def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(4)
    logits = torch.randn(50, 100)
    logits[:, 7] = logits[:, 9] = logits.max() + 1  # a tie: both must pick the lower id
    want = sample(logits, [row(SamplingParams(temperature=0.0)) for _ in range(50)]).token_ids
    assert (want == 7).all()
    for params in (SamplingParams(temperature=1.5, top_k=1),
                   SamplingParams(temperature=1.5, top_p=1e-6)):
        got = sample(logits, [row(params, seed=i, step=i) for i in range(50)]).token_ids
        assert torch.equal(got, want)


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def test_temperature_one_matches_softmax():
    torch.manual_seed(5)
    logits = torch.randn(5)
    tokens = draws(logits, SamplingParams(temperature=1.0), 4000)
    assert total_variation(empirical(tokens, 5), torch.softmax(logits, -1)) < 0.05


def test_temperature_scales_the_distribution():
    logits = PROBS.log()
    tokens = draws(logits, SamplingParams(temperature=0.5), 4000)
    assert total_variation(empirical(tokens, 4), torch.softmax(logits / 0.5, -1)) < 0.05


@pytest.mark.parametrize("params,kept", [
    (SamplingParams(top_k=2), [0, 1]),
    (SamplingParams(top_p=0.7), [0, 1]),      # 0.5 < 0.7 <= 0.8: two tokens
    (SamplingParams(top_p=0.85), [0, 1, 2]),
    (SamplingParams(min_p=0.2), [0, 1, 2]),   # floor 0.1 drops 0.05 only
    (SamplingParams(min_p=0.7), [0]),         # floor 0.35 keeps the top token only
])
def test_filters_keep_the_right_tokens_and_renormalise(params, kept):
    tokens = draws(PROBS.log(), params, 3000)
    want = torch.zeros(4, dtype=torch.float64)
    want[kept] = PROBS[kept].double() / PROBS[kept].sum()
    got = empirical(tokens, 4)
    assert (got[[t for t in range(4) if t not in kept]] == 0).all()
    assert total_variation(got, want) < 0.05


# --- penalties and processors --------------------------------------------------------------

def test_repetition_penalty_matches_hf_semantics():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0]])
    params = SamplingParams(repetition_penalty=2.0)
    # 10**6 stands for a media placeholder id outside the logits' vocabulary: ignored.
    rows = [row(params, prompt_ids=[0, 10 ** 6, 1], history=[1, 3]), row(params)]
    got = process_logits(logits.repeat(2, 1), rows)
    # Seen: 0, 1, 3 (prompt + history). Positive divided, negative multiplied.
    assert torch.equal(got[0], torch.tensor([1.0, -2.0, 0.5, -6.0, 4.0]))
    assert torch.equal(got[1], logits[0])


def test_frequency_and_presence_penalties_match_openai_semantics():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    got = process_logits(logits, [row(params, prompt_ids=[3, 3], history=[1, 1, 1, 2])])
    # The prompt does not count; token 1 seen 3x, token 2 once.
    want = torch.tensor([[1.0, 1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0]])
    assert torch.allclose(got, want)


def test_penalties_apply_per_row_and_leave_the_input_alone():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    before = logits.clone()
    rows = [row(SamplingParams(presence_penalty=2.0), history=[2]), row(history=[2])]
    got = process_logits(logits, rows)
    assert torch.equal(got, torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 3.0]]))
    assert torch.equal(logits, before)
    greedy = SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert sample(logits[:1], [row(greedy, history=[2])]).token_ids.item() == 1


def test_logits_processors_apply_in_order():
    logits = torch.tensor([[5.0, 0.0, 1.0, 0.0]])
    greedy = SamplingParams(temperature=0.0, logits_processors=["test_ban_zero"])
    assert sample(logits, [row(greedy)]).token_ids.item() == 2
    both = SamplingParams(temperature=0.0,
                          logits_processors=["test_ban_zero", "test_boost_last"])
    assert sample(logits, [row(both, history=[3])]).token_ids.item() == 3
    sampled = SamplingParams(logits_processors=["test_ban_zero"])
    assert (draws(logits[0], sampled, 300) != 0).all()


def test_logit_bias_adds_to_its_rows_tokens_only():
    """OpenAI's logit_bias: +100 makes a token every draw, -100 bans the greedy one; other
    rows and ids past the vocabulary are untouched; out of range is refused."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    forced = SamplingParams(logit_bias={3: 100.0, 99: 5.0})
    assert (draws(logits[0], forced, 200) == 3).all()
    banned = SamplingParams(temperature=0.0, logit_bias={0: -100.0})
    assert sample(logits, [row(banned)]).token_ids.item() == 1
    got = process_logits(logits.expand(2, -1), [row(SamplingParams(logit_bias={1: 0.5})),
                                                row()])
    assert torch.equal(got, torch.tensor([[2.0, 1.5, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0]]))
    for bad in ({0: 100.5}, {-1: 1.0}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad).validate()


def test_unknown_processor_is_an_error_listing_registered_ones():
    params = SamplingParams(logits_processors=["nope"])
    with pytest.raises(ValueError, match="test_ban_zero"):
        sample(torch.zeros(1, 4), [row(params)])
    with pytest.raises(ValueError, match="unknown logits processor 'nope'"):
        get_logits_processor("nope")
    assert {"test_ban_zero", "test_boost_last"} <= set(logits_processor_names())
    register_logits_processor("test_ban_zero", _ban_token_zero)  # same function: fine
    with pytest.raises(ValueError, match="already registered"):
        register_logits_processor("test_ban_zero", _boost_last)


# --- logprobs -------------------------------------------------------------------------------

def test_logprobs_report_the_raw_distribution():
    torch.manual_seed(6)
    logits = torch.randn(3, 30)
    rows = [row(SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3,
                               logprobs=4), history=[0, 1]),
            row(SamplingParams(temperature=0.0, logprobs=0)),
            row(SamplingParams(temperature=0.0))]
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    values, ids = raw[0].topk(4)
    assert [t for t, _ in out.top_logprobs[0]] == ids.tolist()
    assert all(math.isclose(v, w, rel_tol=1e-6)
               for (_, v), w in zip(out.top_logprobs[0], values.tolist()))
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []


def test_logprobs_clamp_to_a_small_vocab_and_accept_bf16():
    logits = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.bfloat16)
    out = sample(logits, [row(SamplingParams(temperature=0.0, logprobs=20))])
    assert out.token_ids.item() == 2 and len(out.top_logprobs[0]) == 3


def test_bad_logits_shape_is_an_error():
    with pytest.raises(ValueError, match="len\\(rows\\)=2"):
        sample(torch.zeros(3, 4), [row(), row()])


# --- stop_reason ----------------------------------------------------------------------------

def test_stop_reason():
    p = SamplingParams(max_tokens=4, stop_token_ids=[9])
    common = dict(num_generated=1, seq_len=10, max_seq_len=100, eos_token_ids=[2])
    assert stop_reason(5, p, **common) is None
    assert stop_reason(9, p, **common) == "stop"
    assert stop_reason(2, p, **common) == "stop"
    assert stop_reason(2, SamplingParams(ignore_eos=True), **common) is None
    assert stop_reason(5, p, **{**common, "num_generated": 4}) == "length"
    assert stop_reason(5, p, **{**common, "seq_len": 100}) == "length"
    assert stop_reason(9, p, **{**common, "num_generated": 4}) == "stop"
    unlimited = SamplingParams(max_tokens=None)
    assert stop_reason(5, unlimited, **{**common, "num_generated": 10 ** 6}) is None


# --- placement ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_match_cpu():
    keys = torch.tensor([rng.key_seed(s, 0, "default", 3) for s in range(8)])
    assert torch.equal(rng.uniform_rows(keys, 5000),
                       rng.uniform_rows(keys.cuda(), 5000).cpu())
    key = dict(seed=1, child=0, site="noise", step=0)
    assert torch.equal(rng.randn((3, 64), **key), rng.randn((3, 64), **key, device="cuda").cpu())
    torch.manual_seed(8)
    logits = torch.randn(64, 1000) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.9),
              SamplingParams(temperature=1.0, top_k=50, min_p=0.01, repetition_penalty=1.2)]
    rows = [row(params[i % 3], seed=i, step=i, history=[i, 2 * i]) for i in range(64)]
    assert torch.equal(sample(logits, rows).token_ids, sample(logits.cuda(), rows).token_ids.cpu())


def test_the_candidate_nucleus_equals_a_whole_vocabulary_sort():
    """top-k / top-p look among the most likely tokens first; rows whose cut lies beyond
    them (flat distributions, top_p near 1, top-k past the candidates) are sorted whole:
    either way the kept set is the whole sort's."""
    from mstar.engine.sampler import TOP_CANDIDATES, _nucleus

    def whole(x, top_k, top_p):
        sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
        drop = torch.arange(x.shape[-1]).unsqueeze(0) >= torch.tensor(top_k).unsqueeze(1)
        probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
        drop |= (probs.cumsum(-1) - probs) >= torch.tensor(top_p).unsqueeze(1)
        return ~torch.zeros_like(drop).scatter(-1, order, drop)

    vocab = 4 * TOP_CANDIDATES + 123
    gen = torch.Generator().manual_seed(0)
    top_k = [vocab, 50, 2 * TOP_CANDIDATES, vocab, 1, 10]
    top_p = [0.8, 0.9, float("inf"), 0.999, float("inf"), 0.3]
    for scale in (0.1, 1.0, 3.0, 20.0):  # flat (whole sorts) to peaked (candidates only)
        x = torch.randn(len(top_k), vocab, generator=gen) * scale
        assert torch.equal(_nucleus(x, top_k, top_p), whole(x, top_k, top_p)), scale


def test_in_node_sampling_uses_the_sites_params_and_each_childs_history():
    """`ctx.sample` (a Talker's code predictor): the request's params for the site, else the
    node's; penalties see the ids drawn before at the keyed site by this request and child
    only, recorded only when the params use them."""
    from mstar.engine.work import KeyedStepContext, NodeWork
    from mstar.graph.primitives import GraphNode

    node_own = SamplingParams(temperature=0)
    site = SamplingParams(temperature=0, frequency_penalty=2.0)
    works = [NodeWork("r", child, GraphNode("Talker"), {}, seed=0, sampling=node_own,
                      site_sampling={"code_predictor": site}) for child in (0, 1)]
    ctx = KeyedStepContext(works)
    logits = torch.tensor([[4.0, 3.5, 3.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    drawn = [ctx.sample(0, logits, "code_predictor", step).tolist() for step in range(3)]
    assert drawn == [[0, 3], [1, 3], [2, 3]]  # each row its own history ("<site>/<j>")
    assert works[0].site_history == {"code_predictor/0": [0, 1, 2],
                                     "code_predictor/1": [3, 3, 3]}
    assert ctx.sample(1, logits, "code_predictor", 0).tolist() == [0, 3]  # another child
    assert works[1].site_history == {"code_predictor/0": [0], "code_predictor/1": [3]}
    # a site the request has no params for: the node's own (greedy, no penalty, no record)
    assert [ctx.sample(0, logits, "other", s).tolist() for s in range(2)] == [[0, 3]] * 2
    assert "other/0" not in works[0].site_history
    # a sequence rebuilt after preemption has no invocation: a clear error, not a guess
    with pytest.raises(RuntimeError, match="rebuilt after preemption"):
        KeyedStepContext([None]).sample(0, logits, "code_predictor", 0)


def test_keyed_noise_is_drawn_on_cpu_and_lands_on_the_engines_device():
    """`ctx.randn` is placement-independent (drawn on CPU from the request's key) and is
    handed over on the engine's device, so a node without parameters (flow noise) gets it
    beside the tensors it combines with."""
    from mstar.engine import rng
    from mstar.engine.work import KeyedStepContext, NodeWork
    from mstar.graph.primitives import GraphNode

    work = NodeWork("r", 0, GraphNode("init"), {}, seed=7, sampling=SamplingParams())
    here = KeyedStepContext([work]).randn(0, (2, 3), "noise")
    assert torch.equal(here, rng.randn((2, 3), seed=7, child=0, site="noise", step=0))
    elsewhere = KeyedStepContext([work], device=torch.device("meta"))
    assert elsewhere.device == torch.device("meta")
    assert elsewhere.randn(0, (2, 3), "noise").device.type == "meta"
