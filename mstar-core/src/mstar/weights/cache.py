"""The weight cache shared by every process and server on a machine: huggingface_hub's
own cache (`models--owner--name/{blobs,snapshots,refs}`, its tree listings under
`trees/`) plus mstar's index (`mstar.weights.index`) and cross-process locks under
`<cache_dir>/.mstar/`.

A pull is claimed per (repo, commit) with a file lock, so N ranks or servers starting
together download once and the others wait and reuse the snapshot (huggingface_hub's
per-file locks alone would let each of them walk the repo). A pull is recorded complete
only once every file it asked for is in the snapshot at the size the hub listed; a pull
that failed (read-only directory, full disk, lost connection) leaves at most an entry the
cache does not list or serve, which the next pull completes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from mstar.weights.eviction import EvictionPolicy, plan_eviction
from mstar.weights.index import CacheIndex, Lease

_TRUE = ("1", "true", "yes", "on")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def resolve_cache_dir(cli: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: `--cache-dir`, else `MSTAR_CACHE_DIR`, `HF_HUB_CACHE`,
    `HF_HOME/hub`, else huggingface_hub's default (`$XDG_CACHE_HOME` or `~/.cache`, then
    `huggingface/hub`). Read from the environment now, not from huggingface_hub's
    constants (fixed when it was imported), so every process of a deployment agrees."""
    env = os.environ
    if cli:
        found = Path(cli)
    elif env.get("MSTAR_CACHE_DIR"):
        found = Path(env["MSTAR_CACHE_DIR"])
    elif env.get("HF_HUB_CACHE"):
        found = Path(env["HF_HUB_CACHE"])
    elif env.get("HF_HOME"):
        found = Path(env["HF_HOME"]) / "hub"
    else:
        found = Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface" / "hub"
    return found.expanduser().absolute()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now: huggingface_hub reads it only once, at import, so a
    process that imported it while the variable was set would stay offline for good."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


class WeightsError(RuntimeError):
    """A cache operation refused or failed; the message names the repo, revision, file or
    server concerned."""


class WeightsInUse(WeightsError):
    """The model is leased by a running server (named in the message)."""


@dataclass(frozen=True)
class CacheEntry:
    """One snapshot in the cache: `revision` its commit, `refs` the branches and tags
    pointing at it, `last_used` None when mstar never used it, `leases` the live ones."""

    repo: str
    revision: str
    refs: tuple[str, ...]
    size_bytes: int
    last_used: float | None
    pinned: bool
    leases: tuple[Lease, ...]
    path: Path


class LeaseHandle:
    """A server's leases, renewed by `heartbeat` (at least every `check_interval`),
    dropped by `release` (also on leaving a `with` block); both mark what they hold used
    now, so a model served for long is not the least recently used once it stops."""

    def __init__(self, index: CacheIndex, ids: list[int]):
        self._index, self.ids = index, ids

    def heartbeat(self) -> bool:
        """Renew; False when some lease was already taken for dead (the server stalled
        beyond its expiry) and is gone."""
        return not self.ids or self._index.heartbeat(self.ids, time.time()) == len(self.ids)

    def release(self) -> None:
        """Drop the leases; what they held was last used now."""
        if self.ids:
            self._index.release(self.ids, time.time())
            self.ids = []

    def __enter__(self) -> LeaseHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _quiet_tqdm() -> type:
    from huggingface_hub.utils import tqdm

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _disk_full(err: BaseException) -> bool:
    return (getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or (isinstance(err, OSError) and err.errno == errno.ENOSPC))


def _pull_error(err: BaseException, repo: str, revision: str, cache_dir: Path) -> WeightsError:
    """What a failed hub call or download means, in words that name what to fix."""
    from huggingface_hub.errors import (
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo}@{revision}"
    if isinstance(err, RevisionNotFoundError):
        return WeightsError(f"repo {repo!r} has no revision {revision!r}")
    if isinstance(err, RepositoryNotFoundError):
        return WeightsError(f"unknown repo {repo!r}: the hub has no such model (or it is "
                            "private or gated: set HF_TOKEN)")
    if _disk_full(err):
        return WeightsError(f"no space left in the cache directory {cache_dir} while pulling "
                            f"{at}; nothing was recorded as complete (free space, or evict "
                            "with `mstar weights gc`)")
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WeightsError(f"the cache directory {cache_dir} is not writable ({err}); "
                            f"cannot pull {at} (pass a writable --cache-dir)")
    return WeightsError(f"could not pull {at}: {type(err).__name__}: {err}")


def _file_digest(path: Path, algorithm: str, *, git_blob: bool = False) -> str:
    digest = hashlib.new(algorithm)
    if git_blob:  # git's object id: sha1 over a "blob <size>\0" header and the content
        digest.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class WeightCache:
    """The cache at `resolve_cache_dir(cache_dir)`: pulls, lists, verifies, removes, pins
    and evicts snapshots, and holds servers' leases."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None):
        self.cache_dir = resolve_cache_dir(cache_dir)
        self._mstar = self.cache_dir / ".mstar"
        self._index: CacheIndex | None = None

    # -- plumbing -------------------------------------------------------------------

    @property
    def index(self) -> CacheIndex:
        """The index, created on first use (one that cannot be: `WeightsError`); on a
        read-only cache, the index it holds, read only."""
        if self._index is None:
            try:
                self._index = CacheIndex(self._mstar / "index.sqlite",
                                         read_only=self._read_only())
            except (OSError, sqlite3.Error) as err:
                why = "no space left on its disk" if _disk_full(err) else "is it writable?"
                raise WeightsError(f"cannot open the cache index in {self.cache_dir} "
                                   f"({err}): {why}") from err
        return self._index

    def _read_only(self) -> bool:
        return self.cache_dir.is_dir() and not os.access(self.cache_dir, os.W_OK)

    def _writable(self, what: str) -> None:
        if self._read_only():
            raise WeightsError(f"the cache directory {self.cache_dir} is read-only: cannot "
                               f"{what}")

    @contextmanager
    def _claim(self, repo: str, revision: str) -> Iterator[None]:
        """The cross-process lock on one snapshot (pull and removal take it)."""
        from huggingface_hub.file_download import repo_folder_name

        locks = self._mstar / "locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            lock = FileLock(locks / f"{repo_folder_name(repo_id=repo, repo_type='model')}"
                                    f"--{revision}.lock")
            lock.acquire()
        except OSError as err:
            raise _pull_error(err, repo, revision, self.cache_dir) from err
        try:
            yield
        finally:
            lock.release()

    def _storage(self, repo: str) -> Path:
        from huggingface_hub.file_download import repo_folder_name

        return self.cache_dir / repo_folder_name(repo_id=repo, repo_type="model")

    def cached_commit(self, repo: str, revision: str | None) -> str:
        """The commit `revision` names in the cache (a commit, or a branch or tag by its
        ref), without asking the hub; `WeightsError` when the cache has no such ref."""
        revision = revision or "main"
        if _COMMIT.fullmatch(revision):
            return revision
        ref = self._storage(repo) / "refs" / revision
        if not ref.is_file():
            raise WeightsError(f"{repo}@{revision} is not in the cache {self.cache_dir} "
                               f"(pull it: `mstar weights pull {repo}`)")
        return ref.read_text().strip()

    def resolve(self, repo: str, revision: str | None = None, *,
                token: str | None = None) -> str:
        """The commit `revision` (default: main) names on the hub now (in the cache's refs
        when offline): what every process of a deployment then loads, whatever the
        branch does meanwhile."""
        return self._resolve(repo, revision, token, hub_offline())

    def _resolve(self, repo: str, revision: str | None, token: str | None,
                 offline: bool) -> str:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HFValidationError

        try:
            return HfApi(token=token).resolve_revision(
                repo, revision=revision, cache_dir=self.cache_dir,
                local_files_only=offline).resolved
        except HFValidationError as err:
            raise WeightsError(f"{repo!r} is not a hub repo id: {err}") from err
        except Exception as err:
            raise _pull_error(err, repo, revision or "main", self.cache_dir) from err

    def _size_problems(self, repo: str, commit: str, snapshot: Path,
                       allow_patterns: Sequence[str] | str | None) -> list[str] | None:
        """Files the pull asked for that are missing from the snapshot or not at the size
        the hub listed (huggingface_hub's tree listing of the commit, recorded at pull);
        None without a listing."""
        files = self._hub_files(repo, commit)
        if files is None:
            return None
        from huggingface_hub.utils import filter_repo_objects

        problems = []
        for name in filter_repo_objects(list(files), allow_patterns=allow_patterns):
            local = snapshot / name
            if not local.exists():
                problems.append(f"{name}: missing")
            elif local.stat().st_size != files[name].size:
                problems.append(f"{name}: {local.stat().st_size} bytes, the hub lists "
                                f"{files[name].size} (truncated or corrupt)")
        return problems

    def _hub_files(self, repo: str, commit: str) -> dict[str, Any] | None:
        """The commit's files as the hub listed them at pull (`RepoFile`s by path), or
        None when no listing was recorded."""
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError

        try:
            tree = get_cached_repo_tree(repo, revision=commit, cache_dir=self.cache_dir)
        except CachedRepoTreeNotFoundError:
            return None
        return {f.path: f for f in tree}

    # -- the API ----------------------------------------------------------------------

    def pull(self, repo: str, revision: str | None = None, *,
             allow_patterns: Sequence[str] | str | None = None, token: str | None = None,
             progress: bool = True) -> Path:
        """The snapshot directory of `repo` at `revision` (default: main) holding
        `allow_patterns` (default: every file), downloaded unless the cache has it. Raises
        `WeightsError` for an unknown repo or revision, an unwritable or full cache
        directory, or a file that is not at the size the hub lists (named)."""
        offline = hub_offline()
        commit = self._resolve(repo, revision, token, offline)
        at = f"{repo}@{revision or 'main'}" + (f" ({commit})" if revision != commit else "")
        if self._read_only():
            return self._read_only_snapshot(repo, commit, at, allow_patterns)
        with self._claim(repo, commit):
            index = self.index
            try:
                index.start_pull(repo, commit)
                snapshot = self._download(repo, commit, allow_patterns, token=token,
                                          offline=offline, progress=progress)
            except WeightsError:
                raise
            except Exception as err:
                raise _pull_error(err, repo, revision or "main", self.cache_dir) from err
            listed = self._check(repo, commit, snapshot, at, allow_patterns)
            if listed or not offline:  # offline, unlisted: huggingface_hub cannot tell either
                index.finish_pull(repo, commit, time.time())
        return snapshot

    def _download(self, repo: str, commit: str, allow_patterns: Sequence[str] | str | None,
                  *, token: str | None, offline: bool, progress: bool) -> Path:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo, revision=commit, cache_dir=self.cache_dir,
            allow_patterns=allow_patterns if isinstance(allow_patterns, str | None)
            else list(allow_patterns), token=token, local_files_only=offline,
            tqdm_class=None if progress else _quiet_tqdm()))

    def _check(self, repo: str, commit: str, snapshot: Path, at: str,
               allow_patterns: Sequence[str] | str | None) -> bool:
        """Refuse a snapshot missing a file or holding one at another size than the hub
        listed, or (in a writable cache) one whose content does not match its hash; False
        when no listing was recorded (nothing to check against)."""
        problems = self._size_problems(repo, commit, snapshot, allow_patterns)
        if problems is None:
            return False
        if not problems and not self._read_only():
            problems = self._hash_problems(repo, commit, snapshot, allow_patterns)
        if problems:
            raise WeightsError(f"{at} in {snapshot}: {'; '.join(problems)}. Remove it "
                               f"(`mstar weights rm {repo}`) and pull again")
        return True

    def _read_only_snapshot(self, repo: str, commit: str, at: str,
                            allow_patterns: Sequence[str] | str | None) -> Path:
        """A read-only cache (one filled beforehand and shared) serves what it holds
        complete, without a claim or the index, which it cannot write."""
        try:
            snapshot = self._download(repo, commit, allow_patterns, token=None, offline=True,
                                      progress=False)
        except Exception as err:
            raise WeightsError(f"the cache directory {self.cache_dir} is not writable and "
                               f"does not hold {at} complete ({type(err).__name__}); pull "
                               "it into a writable --cache-dir") from err
        self._check(repo, commit, snapshot, at, allow_patterns)
        return snapshot

    def entries(self) -> list[CacheEntry]:
        """Every complete snapshot of a model in the cache (pulled by mstar or not),
        sorted by repo; a pull that has not finished is not listed."""
        return self._scan(complete_only=True)

    def _scan(self, *, complete_only: bool) -> list[CacheEntry]:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            scanned = scan_cache_dir(self.cache_dir)
        except CacheNotFound:
            return []
        if self._read_only() and not (self._mstar / "index.sqlite").is_file():
            rows, leases = {}, []  # filled outside mstar: nothing recorded
        else:
            rows, leases = self.index.rows(), self.index.live_leases()
        found = []
        for cached in scanned.repos:
            if cached.repo_type != "model":
                continue
            for rev in cached.revisions:
                row = rows.get((cached.repo_id, rev.commit_hash))
                if complete_only and row is not None and not row.complete:
                    continue
                names = {rev.commit_hash, *rev.refs}
                held = tuple(r.lease for r in leases
                             if r.repo == cached.repo_id and r.revision in names)
                found.append(CacheEntry(
                    repo=cached.repo_id, revision=rev.commit_hash, refs=tuple(sorted(rev.refs)),
                    size_bytes=rev.size_on_disk, last_used=row.last_used if row else None,
                    pinned=bool(row and row.pinned), leases=held, path=rev.snapshot_path))
        return sorted(found, key=lambda e: (e.repo, e.revision))

    def _entry(self, repo: str, revision: str | None, *,
               complete_only: bool = True) -> CacheEntry:
        commit = self.cached_commit(repo, revision)
        for entry in self._scan(complete_only=complete_only):
            if entry.repo == repo and entry.revision == commit:
                return entry
        raise WeightsError(f"{repo}@{revision or 'main'} ({commit}) is not in the cache "
                           f"{self.cache_dir}, or its pull did not finish (pull it: `mstar "
                           f"weights pull {repo}`)")

    def path(self, repo: str, revision: str | None = None) -> Path:
        """The snapshot directory; `WeightsError` when it is not (completely) cached."""
        return self._entry(repo, revision).path

    def verify(self, repo: str, revision: str | None = None) -> list[str]:
        """Every problem of the snapshot's files, each naming the file: a missing blob, a
        size other than the hub's, a sha256 (LFS files) or git sha1 (others) other than the
        hub's (`_file_problem`)."""
        entry = self._entry(repo, revision)
        listed = self._hub_files(repo, entry.revision) or {}
        problems = [problem for local in sorted(p for p in entry.path.rglob("*")
                                                if not p.is_dir())
                    if (problem := self._file_problem(entry.path, local, listed))]
        return [f"{repo}@{entry.revision}: {p}" for p in problems]

    def _file_problem(self, snapshot: Path, local: Path, listed: dict[str, Any]
                      ) -> str | None:
        """What is wrong with one file of a snapshot (naming it), or None. Where the
        listing lacks an LFS file's sha256, or there is no listing, the blob's name is the
        expected hash, as huggingface_hub names blobs by it."""
        name = local.relative_to(snapshot).as_posix()
        if not local.exists():
            return f"{name}: its blob is missing"
        blob = local.resolve()
        hub = listed.get(name)
        size = local.stat().st_size
        if hub is not None and size != hub.size:
            return f"{name}: {size} bytes, the hub lists {hub.size}"
        if hub is not None and hub.lfs is not None:
            expected, algorithm = hub.lfs.sha256, "sha256"
        elif _SHA256.fullmatch(blob.name):
            # an LFS file (huggingface_hub names its blob by the sha256; its cached
            # listing may drop the LFS part, leaving only the pointer's git sha1)
            expected, algorithm = blob.name, "sha256"
        elif hub is not None:
            expected, algorithm = hub.blob_id, "sha1"
        elif _COMMIT.fullmatch(blob.name):
            expected, algorithm = blob.name, "sha1"
        else:
            return f"{name}: no hash to check it against"
        got = _file_digest(blob, algorithm, git_blob=algorithm == "sha1")
        if got != expected:
            what = "sha256" if algorithm == "sha256" else "git sha1"
            return f"{name}: {what} {got}, expected {expected} (corrupt)"
        return None

    def _hash_problems(self, repo: str, commit: str, snapshot: Path,
                       allow_patterns: Sequence[str] | str | None) -> list[str]:
        """The loaded files' hash problems, hashing only a blob not yet seen matching at
        its current size and modification time (recorded in the index): a snapshot is
        hashed once after its download, and again only where a file changed since."""
        from huggingface_hub.utils import filter_repo_objects

        listed = self._hub_files(repo, commit) or {}
        names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                 if not p.is_dir()]
        problems = []
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            local = snapshot / name
            blob = local.resolve()
            stat = blob.stat()
            if self.index.verified(str(blob), stat.st_size, stat.st_mtime_ns):
                continue
            problem = self._file_problem(snapshot, local, listed)
            if problem:
                problems.append(problem)
            else:
                self.index.mark_verified(str(blob), stat.st_size, stat.st_mtime_ns)
        return problems

    def remove(self, repo: str, revision: str | None = None) -> int:
        """Delete the snapshot (and the blobs no other revision uses); the bytes freed.
        `WeightsInUse` when a running server holds a lease on it. A snapshot a failed pull
        left half-done is removed too."""
        self._writable(f"remove {repo}")
        entry = self._entry(repo, revision, complete_only=False)
        if entry.leases:
            lease = entry.leases[0]
            raise WeightsInUse(f"{repo}@{entry.revision} is in use by server {lease.server} "
                               f"(pid {lease.pid} on {lease.host}); stop it first")
        from huggingface_hub import scan_cache_dir

        with self._claim(repo, entry.revision):
            strategy = scan_cache_dir(self.cache_dir).delete_revisions(entry.revision)
            freed = strategy.expected_freed_size
            try:
                strategy.execute()
            except OSError as err:
                raise WeightsError(f"could not remove {repo}@{entry.revision}: {err}") from err
            self.index.forget(repo, entry.revision)
        return freed

    def pin(self, repo: str, revision: str | None = None) -> None:
        """Never evict this snapshot (`rm` still removes it)."""
        self._writable(f"pin {repo}")
        self.index.set_pinned(repo, self._entry(repo, revision).revision, True)

    def unpin(self, repo: str, revision: str | None = None) -> None:
        self._writable(f"unpin {repo}")
        self.index.set_pinned(repo, self._entry(repo, revision).revision, False)

    def touch(self, repo: str, revision: str) -> None:
        """Mark the snapshot used now (eviction goes least recently used first)."""
        self._writable(f"mark {repo} used")
        self.index.touch(repo, self._entry(repo, revision).revision, time.time())

    def gc(self, policy: EvictionPolicy, *, dry_run: bool = False) -> list[CacheEntry]:
        """Evict by `policy` (`plan_eviction`); the entries evicted (`dry_run`: that would
        be). One gc at a time per cache; an entry leased meanwhile is skipped."""
        if dry_run:
            return self._plan(policy)
        self._writable("evict")
        self._mstar.mkdir(parents=True, exist_ok=True)
        with FileLock(self._mstar / "gc.lock"):
            evicted = []
            for entry in self._plan(policy):
                try:
                    self.remove(entry.repo, entry.revision)
                except WeightsError:  # leased or removed since the plan
                    continue
                evicted.append(entry)
            return evicted

    def _plan(self, policy: EvictionPolicy) -> list[CacheEntry]:
        return plan_eviction(self.entries(), policy, shutil.disk_usage(self.cache_dir).free,
                             time.time())

    def lease(self, repos: Sequence[tuple[str, str | None]], server: str, *,
              check_interval: float = 3600.0) -> LeaseHandle:
        """Lease `repos` ((repo, revision) pairs) for `server`, this process: they are not
        evicted or removed until released, or until the lease expires (this process gone,
        or no heartbeat for 3 x `check_interval`). A branch or tag is leased as the commit
        the cache has for it, else by its name."""
        self._writable("lease the weights served")
        pinned = []
        for repo, revision in repos:
            try:
                pinned.append((repo, self.cached_commit(repo, revision)))
            except WeightsError:  # not pulled yet: held by its name
                pinned.append((repo, revision or "main"))
        ids = self.index.add_leases(server, pinned, ttl=3 * check_interval, now=time.time())
        return LeaseHandle(self.index, ids)


__all__ = ["CacheEntry", "EvictionPolicy", "Lease", "LeaseHandle", "WeightCache",
           "WeightsError", "WeightsInUse", "hub_offline", "resolve_cache_dir"]
