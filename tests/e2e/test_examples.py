"""Every script in examples/ runs as written against one `mstar-serve` of the tiny test
model (started with an API key, which the scripts take from `MSTAR_API_KEY`) and prints
what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from serving_harness import MSTAR, Server, running

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY = "examples-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running(tmp_path_factory.mktemp("examples"), "--config", "testvla_single",
                 "--preset", "tiny", "--load-format", "dummy", "--api-key", KEY) as server:
        yield server


def run(server: Server, *command: str) -> str:
    """Run an example against `server`; its stdout (it must exit 0)."""
    env = {**os.environ, "MSTAR_URL": server.url, "MSTAR_API_KEY": KEY}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_sdk_generate(server):
    out = run(server, sys.executable, str(EXAMPLES / "sdk_generate.py"))
    assert "health: ok" in out and "models: ['testvla']" in out
    assert re.search(r"text: .* \(finish: (stop|length), \d+ tokens\)", out), out
    assert "streamed: " in out
    assert re.search(r"actions: shape \[\d+, \d+\], first row \[", out), out
    assert "binary answer equals the JSON one: True" in out


def test_sdk_chat(server, tmp_path):
    image = tmp_path / "cup.png"
    Image.new("RGB", (16, 16), (10, 120, 200)).save(image)
    out = run(server, sys.executable, str(EXAMPLES / "sdk_chat.py"), str(image))
    assert re.search(r"reply: .* \(finish: (stop|length), usage: Usage\(", out), out
    assert "streamed: " in out and "with history: " in out
    assert re.search(r"image: .* \(\d+ prompt tokens\)", out), out
    assert "error: 404 the model 'no-such-model' does not exist" in out
    assert re.search(r"async: \[.*, .*, .*\]", out), out


def test_openai_chat(server):
    out = run(server, sys.executable, str(EXAMPLES / "openai_chat.py"))
    assert "model: testvla" in out
    assert re.search(r"reply: .* \(finish: (stop|length), \d+ tokens\)", out), out
    assert re.search(r"usage: \d+ prompt \+ \d+ completion tokens", out), out


def test_curl_chat(server):
    out = run(server, "bash", str(EXAMPLES / "curl_chat.sh"))
    sections = out.split("== ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "GET /v1/models", "POST /v1/chat/completions", "POST /v1/chat/completions (stream)",
        "POST /generate"]
    models, chat, streamed, native = sections
    assert '"id":"testvla"' in models and '"object":"chat.completion"' in chat
    assert '"object":"chat.completion.chunk"' in streamed
    assert streamed.rstrip().endswith("data: [DONE]") and '"usage":{' in streamed
    assert '"finish_reason":"length"' in native


def test_vjepa2_mpc_loop(tmp_path):
    """The MPC loop against `mstar serve vjepa2_ac` (its own server: another model)."""
    world_model = Server(tmp_path, "serve", "vjepa2_ac", "--preset", "tiny", "--load-format",
                         "dummy", "--api-key", KEY, cli=MSTAR)
    try:
        world_model.wait_healthy()
        out = run(world_model, sys.executable, str(EXAMPLES / "vjepa2_mpc_loop.py"),
                  "--steps", "2", "--samples", "8", "--iterations", "2")
    finally:
        assert world_model.stop() == 0, world_model.output()
    world_model.assert_clean()
    assert re.search(r"goal latents: shape \[1, \d+, \d+\]", out), out
    for t in range(2):
        assert re.search(rf"step {t}: planned \[2, 7\] in [\d.]+ s, applied \[.*\], pose "
                         r"error [\d.]+, latent L1 to goal [\d.]+", out), out
    assert re.search(r"forecast: 2 steps of \[\d+, \d+\] latents", out), out


def readme_blocks(section: str) -> list[str]:
    """The ```python blocks of one `## ` section of the README."""
    text = (EXAMPLES.parent / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.parametrize("section", ["Python SDK", "OpenAI-compatible API"])
def test_the_readme_examples_run_as_written(server, tmp_path, section):
    """Only the address changes (the test server's port) and the key (it has one)."""
    blocks = readme_blocks(section)
    assert blocks, f"no python block under '## {section}'"
    for i, code in enumerate(blocks):
        script = tmp_path / f"block{i}.py"
        script.write_text(code.replace("http://localhost:8000", server.url)
                          .replace('api_key="none"', f'api_key="{KEY}"'))
        out = run(server, sys.executable, str(script))
        assert out.strip(), f"block {i} of '{section}' printed nothing"
