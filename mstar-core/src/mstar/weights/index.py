"""The weight cache's index: what huggingface_hub's cache layout cannot say on its own,
kept in SQLite at `<cache_dir>/.mstar/index.sqlite` so that every process and server using
the cache sees the same: when each snapshot was last used, which are pinned, whether a
pull finished (a snapshot a pull left half-done is never taken for complete), and the
leases of running servers on the models they serve.

WAL mode lets readers run beside a writer; the connection's busy `timeout` makes
concurrent writers wait for each other instead of failing. Every write is one statement
(or a batch of writes only), so no transaction ever upgrades from read to write, which
SQLite could refuse at once instead of waiting. A lease is dead when its process is gone
(on this host) or its heartbeat is older than its `ttl`; dead leases are dropped whenever
leases are read.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    repo TEXT NOT NULL, revision TEXT NOT NULL, last_used REAL,
    pinned INTEGER NOT NULL DEFAULT 0, complete INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (repo, revision));
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, server TEXT NOT NULL, pid INTEGER NOT NULL,
    host TEXT NOT NULL, started REAL NOT NULL, heartbeat REAL NOT NULL, ttl REAL NOT NULL,
    repo TEXT NOT NULL, revision TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verified (
    blob TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Lease:
    """A running server's claim on a model it serves: eviction and `rm` leave it alone."""

    server: str
    pid: int
    host: str
    started: float
    heartbeat: float


@dataclass(frozen=True)
class EntryRow:
    """What the index knows of one snapshot (repo, commit)."""

    last_used: float | None
    pinned: bool
    complete: bool


@dataclass(frozen=True)
class LeaseRow:
    """A live lease and the (repo, revision) it holds; `revision` is a commit hash or,
    when the server named a branch not yet pulled, that name."""

    id: int
    repo: str
    revision: str
    lease: Lease


def _used(db: sqlite3.Connection, lease_ids: Sequence[int], now: float) -> None:
    """The snapshots the leases `lease_ids` hold were last used `now`."""
    db.execute(f"UPDATE entries SET last_used = ? WHERE (repo, revision) IN (SELECT repo, "
               f"revision FROM leases WHERE id IN ({','.join('?' * len(lease_ids))}))",
               (now, *lease_ids))


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one we may not signal still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheIndex:
    """The index of one cache directory. Opening it creates the file and tables; a
    directory that cannot hold it raises `sqlite3.Error` (the cache says which).
    `read_only`: an existing index on read-only storage (a cache filled beforehand and
    shared), read as immutable."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0,
                 read_only: bool = False):
        self.path, self.timeout, self.read_only = Path(path), timeout, read_only
        if read_only:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            db = sqlite3.connect(f"{self.path.absolute().as_uri()}?immutable=1", uri=True)
        else:
            db = sqlite3.connect(self.path, timeout=self.timeout)
            db.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable but for power loss
        try:
            with db:  # commits, or rolls back on an exception
                yield db
        finally:
            db.close()

    def rows(self) -> dict[tuple[str, str], EntryRow]:
        with self._connect() as db:
            found = db.execute("SELECT repo, revision, last_used, pinned, complete "
                               "FROM entries").fetchall()
        return {(repo, rev): EntryRow(last_used, bool(pinned), bool(complete))
                for repo, rev, last_used, pinned, complete in found}

    def verified(self, blob: str, size: int, mtime_ns: int) -> bool:
        """Whether `blob` matched its hash when it had this size and modification time."""
        with self._connect() as db:
            return db.execute("SELECT 1 FROM verified WHERE blob = ? AND size = ? AND "
                              "mtime_ns = ?", (blob, size, mtime_ns)).fetchone() is not None

    def mark_verified(self, blob: str, size: int, mtime_ns: int) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO verified (blob, size, mtime_ns) VALUES "
                       "(?, ?, ?)", (blob, size, mtime_ns))

    def start_pull(self, repo: str, revision: str) -> None:
        """A pull of (repo, revision) begins: a snapshot not known before is recorded as
        incomplete until `finish_pull` (one known complete stays so: its files are)."""
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO entries (repo, revision) VALUES (?, ?)",
                       (repo, revision))

    def finish_pull(self, repo: str, revision: str, now: float) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO entries (repo, revision, last_used, complete) "
                       "VALUES (?, ?, ?, 1) ON CONFLICT (repo, revision) DO UPDATE SET "
                       "last_used = excluded.last_used, complete = 1", (repo, revision, now))

    def touch(self, repo: str, revision: str, now: float) -> None:
        """Last used now; a snapshot pulled outside mstar (no row yet) gets one."""
        with self._connect() as db:
            db.execute("INSERT INTO entries (repo, revision, last_used, complete) "
                       "VALUES (?, ?, ?, 1) ON CONFLICT (repo, revision) DO UPDATE SET "
                       "last_used = excluded.last_used", (repo, revision, now))

    def set_pinned(self, repo: str, revision: str, pinned: bool) -> None:
        """Pin or unpin; a snapshot pulled outside mstar (no row yet) gets one."""
        with self._connect() as db:
            db.execute("INSERT INTO entries (repo, revision, pinned, complete) "
                       "VALUES (?, ?, ?, 1) ON CONFLICT (repo, revision) DO UPDATE SET "
                       "pinned = excluded.pinned", (repo, revision, int(pinned)))

    def forget(self, repo: str, revision: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM entries WHERE repo = ? AND revision = ?", (repo, revision))

    def add_leases(self, server: str, repos: Iterable[tuple[str, str]], *, ttl: float,
                   now: float, pid: int | None = None, host: str | None = None) -> list[int]:
        """One lease row per (repo, revision), all by this process unless `pid`/`host`
        say otherwise; their ids."""
        pid, host = os.getpid() if pid is None else pid, host or this_host()
        with self._connect() as db:
            return [db.execute("INSERT INTO leases (server, pid, host, started, heartbeat, "
                               "ttl, repo, revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (server, pid, host, now, now, ttl, repo, rev)).lastrowid
                    for repo, rev in repos]

    def heartbeat(self, ids: Sequence[int], now: float) -> int:
        """Renew the leases `ids` (what they hold is in use: last used now); how many
        still existed (a lease taken for dead while its server was stalled is gone for
        good)."""
        with self._connect() as db:
            _used(db, ids, now)
            return db.execute(f"UPDATE leases SET heartbeat = ? WHERE id IN "
                              f"({','.join('?' * len(ids))})", (now, *ids)).rowcount

    def release(self, ids: Sequence[int], now: float | None = None) -> None:
        """Drop the leases `ids`; with `now`, what they held was last used then."""
        with self._connect() as db:
            if now is not None:
                _used(db, ids, now)
            db.execute(f"DELETE FROM leases WHERE id IN ({','.join('?' * len(ids))})",
                       tuple(ids))

    def live_leases(self, now: float | None = None) -> list[LeaseRow]:
        """Every live lease; the dead ones are dropped first."""
        now = time.time() if now is None else now
        with self._connect() as db:
            found = db.execute("SELECT id, server, pid, host, started, heartbeat, ttl, repo, "
                               "revision FROM leases").fetchall()
        host = this_host()
        live, dead = [], []
        for id_, server, pid, on, started, beat, ttl, repo, rev in found:
            gone = (on == host and not pid_alive(pid)) or beat + ttl < now
            if gone:
                dead.append(id_)
            else:
                live.append(LeaseRow(id_, repo, rev, Lease(server, pid, on, started, beat)))
        if dead and not self.read_only:
            self.release(dead)
        return live
