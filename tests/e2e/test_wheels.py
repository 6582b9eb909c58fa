"""The wheels work outside the repository: build `mstar-core` and the test plugin the way a
release does (`python -m build`: sdist, then the wheel from the sdist), install both into a
fresh virtual environment, and from a directory outside the repo let `mstar serve` find the
plugin's packaged default config and `mstar-serve --config <name>` a packaged config by
name. The venv sees the system's site-packages (torch and the other dependencies come from
there, nothing is downloaded), so the test also proves the wheels, not the repository's
editable installs, are what runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROJECTS = {"mstar-core": REPO / "mstar-core",
            "mstar-testvla": REPO / "tests" / "plugins" / "mstar-testvla"}
VALIDATE = ["--preset", "tiny", "--load-format", "dummy", "--validate-config"]


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A venv outside the repo with both wheels installed: (its bin dir, the environment)."""
    root = tmp_path_factory.mktemp("wheels")
    assert REPO not in root.parents
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MSTAR_")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    dist = root / "dist"
    for name, project in PROJECTS.items():
        # Build from a copy: building writes egg-info next to the sources.
        source = root / "src" / name
        shutil.copytree(project, source, ignore=shutil.ignore_patterns(
            "*.egg-info", "__pycache__", "build", "dist"))
        _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist),
              str(source)], root, env)
    wheels = sorted(dist.glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["mstar_core", "mstar_testvla"]
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")], root,
         env)
    bin_dir = root / "venv" / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--ignore-installed",
          *map(str, wheels)], root, env)
    return bin_dir, env


@pytest.mark.timeout(300)
def test_installed_wheels_serve_their_packaged_configs(venv, tmp_path):
    bin_dir, env = venv
    venv_root = bin_dir.parent
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = _run([str(bin_dir / "python"), "-c",
                  "import importlib.metadata as m, mstar, mstar_testvla\n"
                  "print(mstar.__file__); print(mstar_testvla.__file__)\n"
                  "print(m.distribution('mstar-testvla').locate_file(''))"], outside, env)
    for path in where.stdout.split():
        assert venv_root in Path(path).parents, f"{path} is not the installed wheel's"

    default = _run([str(bin_dir / "mstar"), "serve", "testvla", *VALIDATE], outside, env)
    config = yaml.safe_load(default.stdout)
    assert (config["model"], config["max_seq_len"]) == ("testvla", 512)
    assert config["node_groups"] == [{"node_names": ["vision_encoder", "LLM", "action_init",
                                                     "combine", "cem_sample", "cem_refit",
                                                     "consumer"],
                                      "ranks": [0], "graph_walks": None, "tp_size": 1,
                                      "dtype": None}]
    assert config["server"]["tensor_comm_protocol"] == "SHM"

    named = _run([str(bin_dir / "mstar-serve"), "--config", "testvla_node_split", *VALIDATE],
                 outside, env)
    config = yaml.safe_load(named.stdout)
    assert [(g["node_names"], g["ranks"]) for g in config["node_groups"]] == [
        (["vision_encoder"], [1]),
        (["LLM", "action_init", "combine", "cem_sample", "cem_refit", "consumer"], [0])]
