"""Crash leftovers: what a deployment whose API server was killed (SIGKILL, OOM killer)
leaves behind, and the sweep at the next start that removes it.

A clean stop removes a deployment's socket directory and SHM segments itself; a killed API
server cannot (its children die with it). So each deployment's socket directory
`<prefix>/d<id>` names its owner in `owner.json`: the API server's pid and that process's
start time (field 22 of /proc/<pid>/stat), written before any child starts. At start,
`sweep` looks at every deployment directory under the same prefix and removes, for each
whose owner is dead, its SHM segments (named after the deployment id) and the directory.
A pid that runs again but started at another time was reused: its owner is dead too. A
directory without `owner.json` (a deployment still being created) is never touched, nor is
a live owner's or another user's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mstar.serving")

OWNER_FILE = "owner.json"
_DEPLOYMENT_DIR = re.compile(r"d[0-9a-f]{8}")


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), None if it does not exist or
    /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; fields 1-2 end at ")"


def claim(socket_dir: Path) -> None:
    """Record this process as the owner of the deployment in `socket_dir` (atomically: a
    sweep never reads half a file)."""
    pid = os.getpid()
    tmp = socket_dir / f".{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps({"pid": pid, "start_time": start_time(pid)}))
    os.replace(tmp, socket_dir / OWNER_FILE)


def owner_alive(record: dict) -> bool:
    """The recorded process still runs (the same process, not a reuse of its pid)."""
    pid = record["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    started = record.get("start_time")
    return started is None or start_time(pid) in (None, started)


@dataclass
class Swept:
    """One dead deployment removed by `sweep`."""

    deployment_id: str
    owner_pid: int
    segments: int


def sweep(prefix: Path) -> list[Swept]:
    """Remove the socket directory and SHM segments of every deployment under `prefix`
    whose owner is dead (logged); what was removed."""
    from mstar.communication.shm import SHM_DIR, cleanup_deployment

    swept = []
    entries = sorted(prefix.iterdir()) if prefix.is_dir() else []
    for path in entries:
        if not _DEPLOYMENT_DIR.fullmatch(path.name) or path.is_symlink() or not path.is_dir() \
                or path.stat().st_uid != os.getuid():
            continue  # not a deployment directory of this user's
        try:
            record = json.loads((path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # being created (or not ours): never touched
        if not isinstance(record, dict) or not isinstance(record.get("pid"), int) \
                or owner_alive(record):
            continue
        deployment_id = path.name[1:]
        segments = cleanup_deployment(deployment_id) if SHM_DIR.is_dir() else 0
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed what deployment %s left behind (its API server, pid %d, is "
                    "gone): its socket directory %s and %d SHM segment(s)", deployment_id,
                    record["pid"], path, segments)
        swept.append(Swept(deployment_id, record["pid"], segments))
    return swept


__all__ = ["OWNER_FILE", "Swept", "claim", "owner_alive", "start_time", "sweep"]
