"""Fuzzing every route of a real `mstar-serve` of testvla from its own `/openapi.json`
(schemathesis: bodies generated from each route's schema, valid and not): no answer is a
5xx, every error is OpenAI-shaped, and the server is healthy afterwards.

Bounded for CI: schemathesis' fuzzing phase only (its coverage phase sends every boundary
case, hundreds per route), a fixed number of derandomized examples per route, and a short
`max_seq_len` (a chat without `max_tokens` may fill it). The served document is used as is
but for testvla's knobs that only cost time (its consumer's test delay, its denoising
steps, frames and CEM plans), narrowed so no example runs for seconds."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from serving_harness import running

pytestmark = pytest.mark.timeout(300)

KEY = "sk-test-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25
#: (schema property, largest value the fuzzer may send)
_SLOW = {"consumer_delay_s": 0.01, "num_steps": 8, "num_frames": 4, "plan_samples": 4,
         "plan_iters": 2, "plan_horizon": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("fuzz-server"), "--config", "testvla_single",
                 "--preset", "tiny", "--load-format", "dummy", "--api-key", KEY,
                 "--set", "max_seq_len=96") as srv:
        srv.client.headers.update(AUTH)
        yield srv


def _narrow(node: object) -> None:
    """Cap the `_SLOW` properties' maxima wherever they appear in the document."""
    if isinstance(node, dict):
        for name, cap in _SLOW.items():
            prop = node.get("properties", {}).get(name)
            if isinstance(prop, dict):
                prop["maximum"] = min(prop.get("maximum", cap), cap)
        for value in node.values():
            _narrow(value)
    elif isinstance(node, list):
        for value in node:
            _narrow(value)


@pytest.fixture(scope="module")
def api_schema(server):
    response = server.client.get("/openapi.json")
    assert response.status_code == 200, response.text
    doc = response.json()
    _narrow(doc)
    loaded = schemathesis.openapi.from_dict(doc)
    loaded.config.phases.update(phases=["fuzzing"])
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_route_answers_5xx_and_every_error_is_openai_shaped(case, server):
    response = case.call(base_url=server.url, headers=AUTH, timeout=60)
    where = f"{case.method} {case.path} body={str(case.body)[:300]}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (where, error)
        assert isinstance(error["message"], str) and error["message"], (where, error)
        assert "Traceback" not in error["message"], (where, error)


def test_the_server_is_healthy_and_idle_after_the_fuzzing(server):
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    server.wait_idle(timeout=60)
    assert server.metric('mstar_requests_total{status="ok"}') > 0  # some examples ran
