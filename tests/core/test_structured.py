"""Structured outputs: grammar-masked sampling over random logits always yields text in the
grammar's language; bad grammars fail at admission; grammar state follows the history."""

from __future__ import annotations

import json
import re

import jsonschema
import msgspec
import pytest
import torch

from mstar.engine.sampler import SampleRequest, sample
from mstar.engine.structured import GrammarStates, llg_tokenizer
from mstar.model.forward import SeqKey
from mstar.model.grammar import check_response_format
from mstar.model.sampling import (
    ResponseFormat,
    SamplingFields,
    SamplingParams,
    register_logits_processor,
)

BOS, EOS = 256, 257
VOCAB = 300  # logits wider than the tokenizer's 258 ids, as real checkpoints often are


class ByteVocab:
    """Bytes 0-255 plus BOS and EOS: the smallest tokenizer `token_bytes()` describes."""

    bos_token_id = BOS
    eos_token_id = EOS

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [b"", b""]

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 12},
        "meta": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"},
                           "tag": {"type": "string", "maxLength": 3}},
            "required": ["ok", "tag"],
            "additionalProperties": False,
        },
    },
    "required": ["color", "count", "meta"],
    "additionalProperties": False,
}


def json_schema(schema: dict) -> ResponseFormat:
    return ResponseFormat(type="json_schema", schema=json.dumps(schema))


def generate(fmt: ResponseFormat, n: int, *, seed: int = 0, bias: dict[int, float] | None = None,
             max_steps: int = 200, temperature: float = 1.0,
             tokenizer=ByteVocab) -> list[list[int]]:
    """`n` sequences sampled together from random logits under `fmt`, the way the engine
    drives the sampler (one batch per step, history grows by the sampled token)."""
    torch.manual_seed(seed)
    grammar = GrammarStates(tokenizer)
    params = SamplingParams(temperature=temperature, response_format=fmt, max_tokens=None)
    histories: list[list[int]] = [[] for _ in range(n)]
    live = list(range(n))
    for step in range(max_steps):
        if not live:
            break
        logits = torch.randn(len(live), VOCAB) * 2
        for tok, b in (bias or {}).items():
            logits[:, tok] += b
        rows = [SampleRequest(params=params, seed=seed, child=i, site="default", step=step,
                              history=histories[i], key=SeqKey(f"r{i}", "LLM"))
                for i in live]
        result = sample(logits, rows, grammar)
        assert not result.failed, result.failed
        for i, tok in zip(live, result.token_ids.tolist()):
            histories[i].append(tok)
        live = [i for i in live if histories[i][-1] != EOS]
    assert not live, "a constrained sequence did not end"
    return [h[:-1] for h in histories]


def test_json_schema_samples_parse_and_validate():
    outs = generate(json_schema(SCHEMA), 50, seed=1)
    docs = [json.loads(bytes(out).decode()) for out in outs]
    for doc in docs:
        jsonschema.validate(doc, SCHEMA)
    assert len({d["color"] for d in docs}) == 3 and len({d["count"] for d in docs}) > 3
    assert bytes(outs[0]).startswith(b'{"color": ')  # compact, json.dumps-style spacing


def test_regex_samples_full_match():
    for out in generate(ResponseFormat(type="regex", schema=r"[a-c]{3}-\d{2}"), 20, seed=2):
        assert re.fullmatch(r"[a-c]{3}-\d{2}", bytes(out).decode()), bytes(out)


def test_lark_samples_follow_the_grammar():
    lark = 'start: "(" item ("," item)* ")"\nitem: /[xy]/'
    fmt = ResponseFormat(type="lark", schema=lark)
    closing = {ord(")"): 3.0}  # random logits would rarely choose to stop the list
    for out in generate(fmt, 10, seed=3, bias=closing):
        assert re.fullmatch(r"\([xy](,[xy])*\)", bytes(out).decode()), bytes(out)


def test_json_object_gives_objects():
    short = {ord(c): 6.0 for c in '"}]0'}  # keep random documents small
    for out in generate(ResponseFormat(type="json_object"), 10, seed=4, bias=short,
                        max_steps=400):
        assert isinstance(json.loads(bytes(out).decode()), dict), bytes(out)


def test_greedy_is_constrained_too():
    (out,) = generate(ResponseFormat(type="regex", schema=r"(yes|no)!"), 1, temperature=0)
    assert bytes(out) in (b"yes!", b"no!")


def test_unconstrained_rows_share_the_batch():
    """Constrained and plain rows in one batch: only the constrained ones are masked."""
    torch.manual_seed(0)
    grammar = GrammarStates(ByteVocab)
    logits = torch.randn(2, VOCAB)
    logits[:, ord("z")] = 50.0
    fmt = ResponseFormat(type="regex", schema="[ab]+")
    rows = [SampleRequest(SamplingParams(temperature=0, response_format=fmt), 0, 0, "d", 0,
                          [], key=SeqKey("a", "LLM")),
            SampleRequest(SamplingParams(temperature=0), 0, 0, "d", 0, [])]
    tokens = sample(logits, rows, grammar).token_ids.tolist()
    assert tokens[0] in (ord("a"), ord("b")) and tokens[1] == ord("z")


@pytest.mark.parametrize("fmt, words", [
    (ResponseFormat(type="json_schema", schema='{"type": "bogus"}'), "bogus"),
    (ResponseFormat(type="json_schema", schema="{not json"), "not JSON"),
    (ResponseFormat(type="json_schema", schema="[1, 2]"), "JSON object"),
    (ResponseFormat(type="json_schema",
                    schema='{"type": "integer", "minimum": 5, "maximum": 1}'), "minimum"),
    (ResponseFormat(type="regex", schema="[a-"), "regex"),
    (ResponseFormat(type="lark", schema="start: missing_rule"), "missing_rule"),
])
def test_invalid_grammar_is_a_value_error_naming_response_format(fmt, words):
    with pytest.raises(ValueError, match="response_format") as err:
        SamplingParams(response_format=fmt).validate()
    assert words in str(err.value)


def test_openai_shaped_field_converts_and_validates():
    class Req(SamplingFields):
        prompt: str

    def params(response_format):
        req = Req.model_validate({"prompt": "x", "response_format": response_format})
        return req.sampling_params()

    assert params({"type": "text"}).response_format is None
    assert params({"type": "json_object"}).response_format == ResponseFormat(type="json_object")
    fmt = params({"type": "json_schema",
                  "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
                 ).response_format
    assert fmt.type == "json_schema" and json.loads(fmt.schema) == SCHEMA
    with pytest.raises(ValueError, match="response_format"):
        params({"type": "json_schema", "json_schema": {"name": "thing"}})
    with pytest.raises(ValueError, match="response_format"):
        params({"type": "json_schema",
                "json_schema": {"name": "thing", "schema": {"type": "nope"}}})


def test_params_with_a_response_format_travel_in_control_messages():
    params = SamplingParams(response_format=json_schema(SCHEMA))
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert back == params
    check_response_format(back.response_format)


def _allowed(grammar: GrammarStates, fmt: ResponseFormat, history: list[int],
             key: SeqKey = SeqKey("r", "LLM")) -> torch.Tensor:
    row = SampleRequest(SamplingParams(response_format=fmt), 0, 0, "d", len(history),
                        history, key=key)
    masks = grammar.masks([row], VOCAB)
    assert not masks.failed, masks.failed
    return masks.allowed[0]


def test_matcher_resyncs_with_a_shortened_or_changed_history():
    fmt = json_schema(SCHEMA)
    text = list(b'{"color": "green", "count": 1')
    grammar = GrammarStates(ByteVocab)
    assert _allowed(grammar, fmt, text).nonzero().flatten().tolist() == [
        ord(","), *range(ord("0"), ord("3"))]  # 1 may become 10, 11, 12
    # Preempted and recomputed, or rolled back: a shorter history rebuilds the state.
    short = list(b'{"color": "')
    fresh = _allowed(GrammarStates(ByteVocab), fmt, short)
    assert torch.equal(_allowed(grammar, fmt, short), fresh)
    assert fresh.nonzero().flatten().tolist() == [ord("b"), ord("g"), ord("r")]
    # Same length, other tokens (a reused key): rebuilt too, not advanced.
    other = list(b'{"color": "red", "count": 7')
    assert torch.equal(_allowed(grammar, fmt, other),
                       _allowed(GrammarStates(ByteVocab), fmt, other))


def test_complete_grammar_allows_only_eos_and_ids_past_the_tokenizer_never():
    grammar = GrammarStates(ByteVocab)
    fmt = ResponseFormat(type="regex", schema="ab")
    assert _allowed(grammar, fmt, list(b"ab")).nonzero().flatten().tolist() == [EOS]
    first = _allowed(grammar, fmt, [], key=SeqKey("s", "LLM"))
    assert first.nonzero().flatten().tolist() == [ord("a")] and not first[258:].any()


def test_release_forgets_sequences():
    grammar = GrammarStates(ByteVocab)
    fmt = ResponseFormat(type="regex", schema="[ab]+")
    for key in (SeqKey("r1", "LLM"), SeqKey("r1", "LLM", child=1), SeqKey("r2", "LLM")):
        _allowed(grammar, fmt, [ord("a")], key=key)
    assert len(grammar) == 3
    grammar.release(SeqKey("r2", "LLM"))
    assert len(grammar) == 2
    grammar.release_request("r1")
    assert len(grammar) == 0


def _one_row(grammar: GrammarStates, history: list[int], **params) -> SampleRequest:
    fmt = ResponseFormat(type="regex", schema="[ab]+")
    return SampleRequest(SamplingParams(response_format=fmt, **params), 0, 0, "d", 0,
                         history, key=SeqKey("r", "LLM"))


def test_rows_that_cannot_be_constrained_fail_alone():
    logits = torch.zeros(2, VOCAB)
    plain = SampleRequest(SamplingParams(temperature=0), 0, 0, "d", 0, [])
    no_tokenizer = GrammarStates(lambda: None)
    result = sample(logits, [_one_row(no_tokenizer, []), plain], no_tokenizer)
    assert list(result.failed) == [0] and "tokenizer" in result.failed[0]
    off_grammar = GrammarStates(ByteVocab)
    result = sample(logits, [_one_row(off_grammar, [ord("z")]), plain], off_grammar)
    assert list(result.failed) == [0] and "grammar" in result.failed[0]
    register_logits_processor("test_only_z", _only_z)
    grammar = GrammarStates(ByteVocab)
    result = sample(logits, [_one_row(grammar, [], logits_processors=["test_only_z"]), plain],
                    grammar)
    assert list(result.failed) == [0] and "logits processor" in result.failed[0]
    with pytest.raises(ValueError, match="grammar state"):
        sample(logits[:1], [_one_row(grammar, [])])


def _only_z(history, logits):
    out = torch.full_like(logits, float("-inf"))
    out[ord("z")] = 0.0
    return out


def test_logprobs_stay_the_raw_model_logprobs():
    torch.manual_seed(5)
    logits = torch.randn(1, VOCAB)
    grammar = GrammarStates(ByteVocab)
    result = sample(logits, [_one_row(grammar, [], temperature=0, logprobs=2)], grammar)
    tok = int(result.token_ids[0])
    assert tok in (ord("a"), ord("b"))
    raw = torch.log_softmax(logits[0], dim=-1)
    assert result.logprobs[0].item() == pytest.approx(raw[tok].item())
    assert [t for t, _ in result.top_logprobs[0]] == raw.topk(2).indices.tolist()


def test_hugging_face_fast_tokenizer(tmp_path):
    """A trained BPE vocabulary (tokens of several bytes) through llguidance's HF path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["abc-12 cab-34 bca-56 aab-78 ccc-90"] * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    assert llg_tokenizer(hf).vocab_size == len(hf)
    eos = hf.eos_token_id
    torch.manual_seed(6)
    grammar = GrammarStates(lambda: hf)
    fmt = ResponseFormat(type="regex", schema=r"[a-c]{3}-\d{2}")
    params = SamplingParams(response_format=fmt)
    merged = False
    for seq in range(10):
        history: list[int] = []
        while not history or history[-1] != eos:
            assert len(history) < 20
            row = SampleRequest(params, seq, 0, "d", len(history), history,
                                key=SeqKey(f"r{seq}", "LLM"))
            history.append(int(sample(torch.randn(1, VOCAB), [row], grammar).token_ids[0]))
        text = hf.decode(history[:-1])
        assert re.fullmatch(r"[a-c]{3}-\d{2}", text), text
        merged |= len(history) - 1 < len(text)
    assert merged  # multi-character tokens were allowed where they fit
