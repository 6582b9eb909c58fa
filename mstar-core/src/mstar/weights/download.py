"""Weight sources that are a plain URL to one checkpoint file (a release file not on the
hub): downloaded once into the cache, under a path fixed by the URL and its checksum.

`https://host/path/file.pt#sha256=<hex>` names the file and, optionally, its sha256. The
download goes to a temporary file beside its final path and is renamed only once complete
and matching the checksum, so an HTTP error, a dropped connection or a wrong checksum
leaves nothing in the cache that a later start could take for the checkpoint (only the
lock file by which ranks starting together download it once). Plain
`http://` is accepted for loopback hosts only (a mirror on this machine, the tests'
server); anything else must be https.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import re
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from filelock import FileLock

_CHUNK = 1 << 20
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_SHA256 = re.compile(r"sha256=([0-9a-fA-F]{64})")


class DownloadError(RuntimeError):
    """The file could not be downloaded (or did not match its checksum)."""


def is_url(source: str) -> bool:
    """Whether a weight source is a URL (`scheme://...`) rather than a hub repo id or a
    local path."""
    return _SCHEME.match(source) is not None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_url(source: str) -> tuple[str, str | None]:
    """(the URL to fetch, the expected sha256 in lower case or None) of a URL source.
    Raises `DownloadError` for a URL that is not https (or http to a loopback host), names
    no file, or has a fragment other than `sha256=<64 hex digits>`."""
    url, _, fragment = source.partition("#")
    parts = urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http"
                                         and _loopback(parts.hostname or "")):
        raise DownloadError(f"weight URL {url!r}: use https (plain http is accepted only "
                            "for loopback hosts)")
    if not Path(unquote(parts.path)).name:
        raise DownloadError(f"weight URL {url!r} names no file")
    if not fragment:
        return url, None
    match = _SHA256.fullmatch(fragment)
    if match is None:
        raise DownloadError(f"weight URL {source!r}: the fragment must be "
                            "'#sha256=<64 hex digits>'")
    return url, match.group(1).lower()


def cached_path(source: str, cache_dir: str | os.PathLike[str]) -> Path:
    """Where the file of `source` lives in the cache: `<cache>/mstar-urls/<key>/<file
    name>`, the key a hash of the URL and checksum (another checksum is another file), the
    name the URL's own (its suffix picks the reader)."""
    url, sha256 = split_url(source)
    key = hashlib.sha256(f"{url}#{sha256 or ''}".encode()).hexdigest()[:32]
    return Path(cache_dir) / "mstar-urls" / key / Path(unquote(urlsplit(url).path)).name


def download(source: str, cache_dir: str | os.PathLike[str], *, offline: bool = False,
             timeout: float = 60.0) -> Path:
    """The local file of URL source `source`, downloaded into `cache_dir` unless it is
    there already (with a progress bar; checked against the sha256 when given). `offline`:
    only the cache is looked at. Raises `DownloadError` saying why."""
    url, sha256 = split_url(source)
    target = cached_path(source, cache_dir)
    if target.is_file():
        return target
    if offline:
        raise DownloadError(f"HF_HUB_OFFLINE is set and {url} is not in the cache ({target})")
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    # Ranks starting together download once: the others wait here, then find the file.
    with FileLock(target.parent.parent / f"{target.parent.name}.lock"):
        if not target.is_file():
            _fetch(url, sha256, target, timeout)
    return target


def _fetch(url: str, sha256: str | None, target: Path, timeout: float) -> None:
    """Download `url` into `target` through a temporary file beside it, renamed once
    complete and checked."""
    from huggingface_hub.utils import tqdm

    target.parent.mkdir(exist_ok=True)
    fd, part_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                     suffix=".part")
    part = Path(part_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=target.name) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and out.tell() != total:
                raise DownloadError(f"{url}: the connection closed after {out.tell()} of "
                                    f"{total} bytes; nothing was cached")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DownloadError(f"{url}: sha256 {digest.hexdigest()} does not match the "
                                f"declared {sha256}; nothing was cached")
        part.replace(target)
    except (OSError, http.client.HTTPException) as err:
        raise DownloadError(f"could not download {url}: {err}") from err
    finally:
        if part.exists():  # not renamed: whatever was written goes
            part.unlink()
            _remove_if_empty(target.parent)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass
