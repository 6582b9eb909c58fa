"""The start-up sweep of crash leftovers (`mstar.serving.leftovers`): a deployment whose
owner process is dead (or whose pid now belongs to another process) loses its socket
directory and its SHM segments; a live owner's, and a directory still being created, are
never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from mstar.communication.shm import SHM_DIR, ShmTransport, cleanup_deployment
from mstar.serving import leftovers

CLAIM = "import sys; from pathlib import Path; from mstar.serving.leftovers import claim; " \
        "claim(Path(sys.argv[1]))"


def deployment_dir(prefix: Path) -> tuple[str, Path]:
    """A new deployment id and its socket directory, with one SHM segment and a socket
    file in it, as a launcher leaves them."""
    deployment_id = uuid.uuid4().hex[:8]
    path = prefix / f"d{deployment_id}"
    path.mkdir(parents=True)
    (path / "worker:0.sock").touch()
    sender = ShmTransport("worker:0", deployment_id=deployment_id)
    sender.put(torch.ones(1 << 16), "r")  # 256 KiB: a segment, not inline
    return deployment_id, path


def segments(deployment_id: str) -> list[Path]:
    return list(SHM_DIR.glob(f"mstar_{deployment_id}_*"))


@pytest.fixture
def prefix(tmp_path):
    yield tmp_path / "sockets"
    for path in (tmp_path / "sockets").glob("d*"):
        cleanup_deployment(path.name[1:])  # a failed test leaves no segment behind


def test_sweep_removes_only_what_dead_owners_left(prefix):
    dead_id, dead = deployment_dir(prefix)
    subprocess.run([sys.executable, "-c", CLAIM, str(dead)], check=True)  # owner exited
    live_id, live = deployment_dir(prefix)
    leftovers.claim(live)  # this test is its owner
    reused_id, reused = deployment_dir(prefix)
    (reused / leftovers.OWNER_FILE).write_text(json.dumps(  # this pid, another process
        {"pid": os.getpid(), "start_time": leftovers.start_time(os.getpid()) - 1}))
    starting_id, starting = deployment_dir(prefix)  # no owner file yet
    assert all(segments(i) for i in (dead_id, live_id, reused_id, starting_id))

    swept = leftovers.sweep(prefix)

    assert sorted(s.deployment_id for s in swept) == sorted([dead_id, reused_id])
    assert all(s.segments == 1 for s in swept)
    assert not dead.exists() and not reused.exists()
    assert segments(dead_id) == [] and segments(reused_id) == []
    for deployment_id, path in ((live_id, live), (starting_id, starting)):
        assert (path / "worker:0.sock").exists() and len(segments(deployment_id)) == 1
    assert leftovers.sweep(prefix) == []  # nothing more to do
    assert leftovers.sweep(prefix / "absent") == []


def test_an_owner_record_names_this_process(tmp_path):
    leftovers.claim(tmp_path)
    record = json.loads((tmp_path / leftovers.OWNER_FILE).read_text())
    assert record["pid"] == os.getpid() and leftovers.owner_alive(record)
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left
