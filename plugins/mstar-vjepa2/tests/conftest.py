"""The authors' planner helpers (facebookresearch/vjepa2 notebooks/utils/{mpc_utils,
world_model_wrapper}.py: the CEM planner, pose integration and world-model loop) are not in
the cc-vjepa2 package and CI reaches no GitHub: their inputs and outputs are committed
fixtures, written by fixtures/make_authors_fixtures.py from a checkout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def authors() -> dict[str, torch.Tensor]:
    """Inputs, the noise the authors' `cem` drew, and the authors' outputs."""
    return load_file(FIXTURES / "authors_fixtures.safetensors")


@pytest.fixture(scope="session")
def authors_params() -> dict[str, Any]:
    """The arguments the authors' functions were called with."""
    return json.loads((FIXTURES / "authors_fixtures.json").read_text())
