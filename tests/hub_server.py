"""A local Hugging Face hub for offline tests of the real download code.

It serves what the installed huggingface_hub's `snapshot_download` / `hf_hub_download`
ask for, as the hub answers it: `GET /api/models/<repo>[/revision/<rev>]` (the commit a
revision names), `GET /api/models/<repo>/tree/<rev>` (the files, with their git and LFS
ids), `HEAD|GET /<repo>/resolve/<rev>/<file>` (`X-Repo-Commit`, `ETag`: git sha1 of a
regular file served here; an LFS file redirects to a "CDN" listener on another port with
`X-Linked-Etag` = its sha256 and `X-Linked-Size`, so the client takes the redirect path
a real download takes), byte ranges (a cut transfer is resumed with `Range`), and the
hub's 404s (`X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound).

Repos are written by the test (`HubRepo`: commits, branches, tags). Fault knobs: `cut`
(the next transfer of a file stops after N bytes), `hold` (a file's transfer waits on an
event, so concurrent pullers overlap); counters of what was asked (`api_calls`, `heads`)
and transferred (`gets`, `ranges`), and `wait_until` one of them moves.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz")
HOLD_TIMEOUT = 60.0  # a held transfer never outlives a failed test by long


def read_tree(directory: str | Path) -> dict[str, bytes]:
    """Every file under `directory` by its path inside it: what to commit to upload it."""
    root = Path(directory)
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file: what the hub's ETag is for a file not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """A file at a commit. LFS files (weights) are identified by sha256, the rest by git
    sha1, as on the hub; that is what ends up as the blob name in the cache."""

    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {len(self.data)}\n").encode()

    @property
    def git_oid(self) -> str:
        """The id of what git stores: the file, or for LFS its pointer."""
        return git_blob_sha1(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        """What the client names the blob by: sha256 for LFS, else the git id."""
        return self.sha256 if self.lfs else self.git_oid

    def tree_entry(self) -> dict:
        entry = {"type": "file", "path": self.path, "size": len(self.data), "oid": self.git_oid}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data),
                            "pointerSize": len(self.pointer)}
        return entry


@dataclass
class HubRepo:
    """A model repo: commits (each a whole tree), branches and tags naming them."""

    name: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, bytes], *, branch: str = "main",
               lfs: tuple[str, ...] | None = None) -> str:
        """Commit `files` (path -> bytes) as the whole tree of `branch`; returns its hash.
        `lfs`: the paths stored in LFS (default: weight files by suffix)."""
        tree = {path: HubFile(path, data, path in lfs if lfs is not None
                              else path.endswith(LFS_SUFFIXES))
                for path, data in files.items()}
        parent = self.refs.get(branch, "")
        digest = hashlib.sha1(parent.encode() + b"".join(
            f.path.encode() + f.etag.encode() for f in tree.values()))
        sha = digest.hexdigest()
        self.commits[sha] = tree
        self.refs[branch] = sha
        return sha

    def tag(self, name: str, revision: str = "main") -> str:
        sha = self.resolve(revision)
        if sha is None:
            raise KeyError(f"{self.name} has no revision {revision!r}")
        self.refs[name] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        """The commit a branch, tag or commit hash names, else None."""
        return revision if revision in self.commits else self.refs.get(revision)


class HubServer:
    """The hub and its CDN, each a threaded HTTP server on 127.0.0.1 (port 0)."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified when a counter moves
        self.gets: collections.Counter[str] = collections.Counter()  # transfers per "repo/path"
        self.heads: collections.Counter[str] = collections.Counter()  # metadata asks per file
        self.ranges: list[tuple[str, int]] = []                      # ("repo/path", first byte)
        self.api_calls: collections.Counter[str] = collections.Counter()  # "info"/"tree" per repo
        self.cut: dict[str, int] = {}                # "repo/path" -> bytes sent before the cut
        self.hold: dict[str, threading.Event] = {}   # "repo/path" -> transfer waits on it
        self._blobs: dict[str, tuple[str, HubFile]] = {}  # sha256 -> ("repo/path", file)
        self.hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=False))
        self.cdn = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=True))
        self.hub.daemon_threads = self.cdn.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True)
                         for s in (self.hub, self.cdn)]
        for thread in self._threads:
            thread.start()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = HOLD_TIMEOUT) -> bool:
        """Wait until `predicate` (of the counters) holds; False if it did not in time."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def repo(self, name: str) -> HubRepo:
        """The repo `name`, created empty on first use."""
        return self.repos.setdefault(name, HubRepo(name))

    def close(self) -> None:
        for event in self.hold.values():
            event.set()
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- request handling -------------------------------------------------------------------

    def _handler(self, cdn: bool) -> type[http.server.BaseHTTPRequestHandler]:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                (hub._cdn if cdn else hub._route)(self, body=True)

            def do_HEAD(self) -> None:
                (hub._cdn if cdn else hub._route)(self, body=False)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def _route(self, req: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        url = urlsplit(req.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if len(rest) >= 2 and rest[0] == "tree":
                return self._tree(req, repo_id, rest[1], "/".join(rest[2:]),
                                  "true" in parse_qs(url.query).get("recursive", []))
            if not rest or (len(rest) == 2 and rest[0] == "revision"):
                return self._info(req, repo_id, rest[1] if rest else "main")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(req, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        _reply(req, 404, {"X-Error-Code": "RepoNotFound"}, b"not a hub route")

    def _commit(self, req: http.server.BaseHTTPRequestHandler, repo_id: str,
                revision: str) -> tuple[str, dict[str, HubFile]] | None:
        """The commit `revision` names, or None after answering the hub's 404."""
        repo = self.repos.get(repo_id)
        if repo is None:
            _reply(req, 404, {"X-Error-Code": "RepoNotFound",
                              "X-Error-Message": "Repository not found"}, b"")
            return None
        sha = repo.resolve(revision)
        if sha is None:
            _reply(req, 404, {"X-Error-Code": "RevisionNotFound",
                              "X-Error-Message": f"Invalid rev id: {revision}"}, b"")
            return None
        return sha, repo.commits[sha]

    def _info(self, req: http.server.BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        with self.changed:
            self.api_calls[f"info {repo_id}"] += 1
            self.changed.notify_all()
        found = self._commit(req, repo_id, revision)
        if found is not None:
            sha, tree = found
            _json(req, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                        "siblings": [{"rfilename": p} for p in sorted(tree)]})

    def _tree(self, req: http.server.BaseHTTPRequestHandler, repo_id: str, revision: str,
              under: str, recursive: bool) -> None:
        with self.changed:
            self.api_calls[f"tree {repo_id}"] += 1
            self.changed.notify_all()
        found = self._commit(req, repo_id, revision)
        if found is None:
            return
        prefix = f"{under}/" if under else ""
        entries = [f.tree_entry() for p, f in sorted(found[1].items())
                   if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])]
        _json(req, entries)

    def _resolve(self, req: http.server.BaseHTTPRequestHandler, repo_id: str, revision: str,
                 path: str, body: bool) -> None:
        found = self._commit(req, repo_id, revision)
        if found is None:
            return
        sha, tree = found
        file = tree.get(path)
        if not body:
            with self.changed:
                self.heads[f"{repo_id}/{path}"] += 1
                self.changed.notify_all()
        if file is None:
            _reply(req, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, b"")
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{file.git_oid}"'}
        if file.lfs:
            with self.lock:
                self._blobs[file.sha256] = (f"{repo_id}/{path}", file)
            headers.update({"X-Linked-Etag": f'"{file.etag}"',
                            "X-Linked-Size": str(len(file.data)),
                            "Location": f"{self.cdn_url}/blobs/{file.sha256}"})
            _reply(req, 302, headers, b"")
            return
        self._transfer(req, f"{repo_id}/{path}", file.data, headers, body)

    def _cdn(self, req: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        with self.lock:
            found = self._blobs.get(urlsplit(req.path).path.rsplit("/", 1)[-1])
        if found is None:
            _reply(req, 404, {}, b"no such blob")
            return
        key, file = found
        self._transfer(req, key, file.data, {"ETag": f'"{file.sha256}"'}, body)

    def _transfer(self, req: http.server.BaseHTTPRequestHandler, key: str, data: bytes,
                  headers: dict[str, str], body: bool) -> None:
        """Send `data` (from the `Range` start when asked), applying the fault knobs."""
        start = _range_start(req.headers.get("Range"))
        if not body:
            _reply(req, 200, {**headers, "Content-Length": str(len(data))}, b"", body=False)
            return
        with self.changed:
            self.gets[key] += 1
            if start:
                self.ranges.append((key, start))
            cut = self.cut.pop(key, None)
            hold = self.hold.get(key)
            self.changed.notify_all()
        if hold is not None:
            hold.wait(HOLD_TIMEOUT)
        status = 206 if start else 200
        if start:
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        part = data[start:]
        try:
            req.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(part))}.items():
                req.send_header(name, value)
            req.end_headers()
            req.wfile.write(part if cut is None else part[:cut])
            req.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the puller was killed meanwhile
            req.close_connection = True
        if cut is not None:
            req.close_connection = True


def _range_start(value: str | None) -> int:
    """The first byte of a `bytes=N-` range (what huggingface_hub sends to resume), or 0."""
    if not value or not value.startswith("bytes="):
        return 0
    return int(value.removeprefix("bytes=").split("-", 1)[0] or 0)


def _reply(req: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str],
           payload: bytes, body: bool = True) -> None:
    req.send_response(status)
    for name, value in headers.items():
        req.send_header(name, value)
    if "Content-Length" not in headers:
        req.send_header("Content-Length", str(len(payload)))
    req.end_headers()
    if body and payload:
        req.wfile.write(payload)


def _json(req: http.server.BaseHTTPRequestHandler, value: object) -> None:
    _reply(req, 200, {"Content-Type": "application/json"}, json.dumps(value).encode())


def hub_env(server: HubServer) -> dict[str, str]:
    """The environment a subprocess needs to use `server` as its hub (and nothing else)."""
    return {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def point_hub_at(server: HubServer, monkeypatch) -> None:
    """Make huggingface_hub in this process talk to `server`: it reads `HF_ENDPOINT` at
    import, so its constants are patched, and the env set for subprocesses."""
    from huggingface_hub import constants

    for name, value in hub_env(server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
