"""The soak (`benchmarks/soak.py`) for 20 seconds against both tiny dummy models, started
by the script itself: 4 clients per server (twice `max_concurrent_requests` 2, so 429s
happen) send the seeded mix of kinds; the run must end with no hang, no 5xx, no answer of
the wrong shape, and every gauge (KV pages, running requests, /dev/shm segments) back to 0.
The script's own exit status carries those checks; its report is the failure message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(480)

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def test_a_20_second_soak_ends_clean():
    proc = subprocess.run([sys.executable, str(SOAK), "--duration", "20",
                           "--max-concurrent-requests", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout
    assert "OK: no hangs, no 5xx, every gauge back to 0" in proc.stdout
