"""The media and tensor fields of a `/generate` request, gathered in the API server.

The model's schema declares them (`mstar.model.fields`). Here a multipart file part named
after such a field fills it, and `upload://<file name>` refers to a file part by its file
name; a file part that fills no field is refused, so nothing a client sends is silently
dropped. Media URLs are fetched with the chat route's guard and limits
(`mstar.media.fetch_media`). Every fetched or uploaded item travels to the data worker as a
blob, the field's value becoming `{"blob": i}`; tensors given as JSON stay in the body. The
data worker decodes them all (`mstar.model.fields.decode_inputs`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from mstar.api_server.forms import FilePart
from mstar.api_server.request_flow import ApiError
from mstar.model.fields import BLOB, UPLOAD_SCHEME, InputField

if TYPE_CHECKING:
    from mstar.media import MediaLimits


def attach_files(body: dict[str, Any], files: list[FilePart],
                 fields: Mapping[str, InputField]) -> dict[str, FilePart]:
    """Point each field a file part is named after at that file (`upload://<file name>`),
    refuse a file part no field names, and return the files by file name."""
    by_name: dict[str, FilePart] = {}
    for part in files:
        filename = part.filename or part.name
        if filename in by_name:
            raise ApiError(400, f"two file parts have the file name {filename!r}; give each "
                                "file its own name", param=part.name)
        by_name[filename] = part
        if part.name in fields:
            if body.get(part.name) is not None:
                raise ApiError(400, f"{part.name} is given twice: in the body and as a file "
                                    "part", param=part.name)
            body[part.name] = UPLOAD_SCHEME + filename
    referenced = {value.removeprefix(UPLOAD_SCHEME) for name in fields
                  if isinstance(value := body.get(name), str)
                  and value.startswith(UPLOAD_SCHEME)}
    for filename, part in by_name.items():
        if filename not in referenced:
            known = ", ".join(fields) or "none"
            raise ApiError(400, f"the file part {part.name!r} ({filename!r}) fills no field: "
                                "name the part after a media or tensor field (this model's: "
                                f"{known}) or refer to it as upload://{filename}",
                           param=part.name)
    return by_name


async def _bytes(name: str, value: str, field: InputField, uploads: Mapping[str, FilePart],
                 limits: MediaLimits, client: httpx.AsyncClient) -> bytes:
    from mstar import media
    from mstar.media.limits import too_large

    try:
        if value.startswith(UPLOAD_SCHEME):
            filename = value.removeprefix(UPLOAD_SCHEME)
            if filename not in uploads:
                raise media.MediaError(f"no file named {filename!r} was uploaded with this "
                                       "request")
            data = uploads[filename].data
            if field.kind != "tensor" and len(data) > limits.max_bytes:
                raise too_large(f"the upload {filename!r}", limits.max_bytes, "bytes")
            return data
        return await media.fetch_media(value, limits, client=client)
    except media.MediaError as exc:
        raise ApiError(exc.status, f"{name}: {exc}", param=name) from None


async def fetch_inputs(body: dict[str, Any], uploads: Mapping[str, FilePart],
                       fields: Mapping[str, InputField], limits: MediaLimits) -> list[bytes]:
    """Fetch (concurrently) every media field given as a URL and take every upload a field
    refers to; each such value becomes `{"blob": i}`, the i-th of the returned bytes."""
    wanted = [(name, value, field) for name, field in fields.items()
              if isinstance(value := body.get(name), str)
              and (field.kind != "tensor" or value.startswith(UPLOAD_SCHEME))]
    if not wanted:
        return []
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        blobs = await asyncio.gather(*(_bytes(name, value, field, uploads, limits, client)
                                       for name, value, field in wanted))
    for index, (name, _, _) in enumerate(wanted):
        body[name] = {BLOB: index}
    return list(blobs)


__all__ = ["attach_files", "fetch_inputs"]
