"""Throwaway plugin distributions: a directory on the path holding `<dist>-0.1.dist-info`
(METADATA, entry_points.txt with group [mstar]) and the plugin's package, exactly what
`pip install` leaves behind, so discovery runs through the real importlib.metadata."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from mstar.plugins import manager


class PluginDir:
    def __init__(self, root: Path):
        self.root = root
        self.packages: list[str] = []

    def add(self, dist: str, package: str, files: dict[str, str],
            entry_point: str | None = None) -> None:
        """Install distribution `dist` whose entry point loads `package` (or
        `entry_point`); `files` maps paths inside the package to their text."""
        info = self.root / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(
            f"[mstar]\n{package} = {entry_point or package}\n")
        for relative, text in files.items():
            path = self.root / package / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        self.packages.append(package)

    def run(self, code: str) -> subprocess.CompletedProcess[str]:
        """Run Python code in a fresh interpreter that sees these plugins."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.root),
                                                          env.get("PYTHONPATH")]))
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(f"import sys\nfrom mstar.cli.main import main\nsys.exit(main({list(args)!r}))")


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginDir]:
    """A plugin directory on this process's path too; discovery is reset around the test."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    manager.reset()
    plugins = PluginDir(root)
    yield plugins
    manager.reset()
    for name in list(sys.modules):
        if name.split(".")[0] in plugins.packages:
            del sys.modules[name]


@pytest.fixture(scope="module")
def llm():
    """testvla's tiny LLM node with dummy weights, and its model: a real KV-cache module
    for engine tests."""
    import torch

    from mstar.model.contract import BuildContext
    from mstar.weights import init_dummy_weights
    from mstar_testvla.model import TestVLA

    torch.manual_seed(0)
    model = TestVLA(TestVLA.make_config(preset="tiny"))
    module = model.build_submodule("LLM", BuildContext("LLM", torch.device("cpu"),
                                                       torch.float32))
    init_dummy_weights(module, seed=0)
    return model, module.eval()
