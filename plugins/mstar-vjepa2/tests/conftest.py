"""The authors' notebook helpers (notebooks/utils/{mpc_utils,world_model_wrapper}.py: the
CEM planner, pose integration and world-model loop), oracles that are not in the cc-vjepa2
package: read from a facebookresearch/vjepa2 checkout named by VJEPA2_REPO, which .ci/run
fetches at a pinned commit."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="session")
def authors_notebooks() -> ModuleType:
    """`notebooks.utils` of the authors' checkout, with `mpc_utils` and
    `world_model_wrapper` imported (skips without VJEPA2_REPO, scipy or tqdm)."""
    repo = os.environ.get("VJEPA2_REPO")
    if not repo or not (Path(repo) / "notebooks/utils/mpc_utils.py").is_file():
        pytest.skip("VJEPA2_REPO (a facebookresearch/vjepa2 checkout) is not set")
    pytest.importorskip("scipy")
    pytest.importorskip("tqdm")
    sys.path.insert(0, repo)
    try:
        for name in ("mpc_utils", "world_model_wrapper"):
            importlib.import_module(f"notebooks.utils.{name}")
        return importlib.import_module("notebooks.utils")
    finally:
        sys.path.remove(repo)
