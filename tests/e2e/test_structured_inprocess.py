"""Structured outputs end to end on testvla (random weights): a `response_format` turns the
model's noise into documents of the schema, through the whole runtime, for sampled, greedy
and `n > 1` requests, and across preemption by recompute."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import collect, finished, run_concurrently, settle, tokens

import mstar

EOS = 257  # testvla's byte tokenizer
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
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def dep():
    with mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=256) as d:
        yield d


def req(seed: int = 11, **kw) -> dict:
    return {"prompt": "describe it as JSON", "max_tokens": 200, "temperature": 1.0,
            "seed": seed, "response_format": FORMAT, **kw}


def document(ids: list[int]) -> dict:
    """The schema-valid document a constrained completion spells (it ends with EOS)."""
    assert ids[-1] == EOS, ids
    doc = json.loads(bytes(ids[:-1]).decode())
    jsonschema.validate(doc, SCHEMA)
    return doc


def grammar_states(d) -> int:
    return sum(len(e.grammar) for w in d.workers.values() for e in w.engines.values()
               if hasattr(e, "grammar"))


def test_sampled_and_greedy_requests_give_schema_documents(dep):
    docs = []
    for r in (req(), req(seed=12), req(temperature=0)):
        evs = collect(dep, r)
        assert finished(evs).reason == "stop"
        docs.append(document(tokens(evs)))
    assert docs[0] != docs[1]  # the seed matters: the grammar narrows, the model chooses
    settle(dep)
    assert grammar_states(dep) == 0  # released with their requests


def test_n_completions_each_follow_the_schema(dep):
    evs = collect(dep, req(n=2))
    assert finished(evs).reasons == {0: "stop", 1: "stop"}
    a, b = document(tokens(evs, 0)), document(tokens(evs, 1))
    assert tokens(evs, 0) != tokens(evs, 1), (a, b)
    settle(dep)


def test_without_response_format_the_model_gives_no_json(dep):
    """The same seeded request, unconstrained: the constraint is what makes the JSON."""
    evs = collect(dep, {**req(), "response_format": {"type": "text"}})
    with pytest.raises(ValueError):
        json.loads(bytes(t for t in tokens(evs) if t < 256).decode())
    settle(dep)


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
     "nope"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
])
def test_bad_response_format_is_rejected_at_admission(dep, fmt, words):
    with pytest.raises(mstar.RequestError, match="response_format") as err:
        collect(dep, req(response_format=fmt))
    assert words in str(err.value)


def test_constrained_requests_survive_preemption_by_recompute():
    reqs = [req(seed=s, prompt=f"request {s} as JSON", max_tokens=100) for s in range(5)]
    with mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=256) as roomy:
        expected = [tokens(collect(roomy, r)) for r in reqs]
    with mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=128,
                    kv_cache={"num_pages": 8, "page_size": 16}) as tight:
        got = [tokens(e) for e in run_concurrently(tight, reqs)]
        recomputes = [e for s in tight.step_log("LLM") for e in s.entries
                      if e["walk"] == "recompute"]
        settle(tight)
        assert grammar_states(tight) == 0
    assert recomputes, "the cache was never short: the test does not exercise preemption"
    assert got == expected
    for ids in got:
        document(ids)
