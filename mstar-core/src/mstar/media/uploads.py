"""Files uploaded with a request (multipart `/generate`), kept on disk only while it lives.

Layout: `upload_dir/<request id>/<file name>`. A request's directory goes when the request
ends (`release`); everything goes at shutdown and at start-up (`purge`, which also clears what
a crashed server left). Because `purge` deletes, the store only ever purges a directory it
owns: one it created, or found empty, and marked with `.mstar-uploads`; pointing
`--upload-dir` at a directory holding other files is refused rather than emptied. Names come
from clients, so a name that could leave the request's directory (separators, `..`, NUL) is
refused, and files are created exclusively (a second file of the same name is an error, never
an overwrite). Several servers must not share one upload directory (each purges at start).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from mstar.media.limits import MediaError, MediaLimits, too_large

_MARKER = ".mstar-uploads"
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _checked_name(filename: str) -> str:
    """`filename` if it names a plain file inside one directory; else a 400."""
    if (filename in ("", ".", "..") or len(filename.encode("utf-8", "replace")) > 255
            or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in filename)):
        raise MediaError(f"refused the upload file name {filename!r}: a name must be one "
                         "path component (no '/', '\\', control characters, '.' or '..') "
                         "of at most 255 bytes")
    return filename


class UploadStore:
    """Files uploaded with a request, under `upload_dir/<request id>/`, removed when the
    request ends (`release`), and everything at close and start-up (`purge`)."""

    def __init__(self, upload_dir: str | Path, limits: MediaLimits):
        self.root = Path(upload_dir)
        self.limits = limits
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker = self.root / _MARKER
        if not marker.exists():
            if any(self.root.iterdir()):
                raise ValueError(f"upload directory {str(self.root)!r} holds files mstar did "
                                 "not put there, and mstar empties its upload directory; "
                                 "choose a new or empty one (--upload-dir)")
            marker.touch()

    def _request_dir(self, request_id: str) -> Path:
        if not _REQUEST_ID.fullmatch(request_id):
            raise MediaError(f"invalid request id {request_id!r} for uploads: letters, "
                             "digits, '.', '_' and '-', starting with a letter or digit, at "
                             "most 128 characters")
        return self.root / request_id

    def save(self, request_id: str, filename: str, data: bytes) -> Path:
        """Store one uploaded file of a request and return its path: 400 for an unsafe or
        repeated name, 413 over `max_bytes`."""
        directory = self._request_dir(request_id)
        name = _checked_name(filename)
        if len(data) > self.limits.max_bytes:
            raise too_large(f"the upload {name!r}", self.limits.max_bytes, "bytes")
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / name
        try:
            with open(path, "xb") as file:
                file.write(data)
        except FileExistsError:
            raise MediaError(f"a file named {name!r} was already uploaded with this "
                             "request") from None
        return path

    def read(self, request_id: str, filename: str) -> bytes:
        """The bytes of a file the request uploaded: 400 when it uploaded none by that name
        (a request can only name its own uploads)."""
        path = self._request_dir(request_id) / _checked_name(filename)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise MediaError(f"no file named {filename!r} was uploaded with this "
                             "request") from None

    def release(self, request_id: str) -> None:
        """Delete a finished request's uploads (nothing to do if it had none)."""
        if _REQUEST_ID.fullmatch(request_id):
            shutil.rmtree(self.root / request_id, ignore_errors=True)

    def purge(self) -> None:
        """Delete every request's uploads: at start-up (what a crashed server left) and at
        close."""
        for entry in self.root.iterdir():
            if entry.name == _MARKER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
