"""The media and tensor fields of a `/generate` request, gathered in the API server.

The model's schema declares them (`mstar.model.fields`). Here a multipart file part named
after such a field fills it (`<field>.<key>` / `<field>.<i>`: one item of a dict or list
field), and `upload://<file name>` refers to a file part by its file name; a file part that
fills no field is refused, so nothing a client sends is silently dropped. Media URLs are
fetched with the chat route's guard and limits (`mstar.media.fetch_media`), items of a
container like lone fields. Every fetched or uploaded item travels to the data worker as a
blob, its value becoming `{"blob": i}`; tensors given as JSON stay in the body. The data
worker decodes them all (`mstar.model.fields.decode_inputs`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from mstar.api_server.forms import FilePart
from mstar.api_server.request_flow import ApiError
from mstar.model.fields import (
    BLOB,
    MAX_ITEMS,
    UPLOAD_SCHEME,
    InputField,
    Key,
    field_items,
    item_name,
    with_items,
)

if TYPE_CHECKING:
    from mstar.media import MediaLimits


def _items(name: str, field: InputField, value: Any) -> list[tuple[Key, Any]]:
    try:
        return field_items(field, value)
    except ValueError as exc:
        raise ApiError(400, f"{name}: {exc}", param=name) from None


def _slot(part: str, body: Mapping[str, Any], fields: Mapping[str, InputField]
          ) -> tuple[str, Key] | None:
    """The field (and container key) a file part's name fills; None when it names none.
    An item of a field that takes a dict or a list goes where the body's value is, else
    into a dict when the field takes one."""
    if part in fields:
        return part, None
    name, dot, key = part.partition(".")
    field = fields.get(name)
    if not dot or field is None or not field.containers:
        return None
    as_list = isinstance(body.get(name), list) or "dict" not in field.containers
    if not as_list:
        return name, key
    if not key.isdigit() or int(key) >= MAX_ITEMS:
        raise ApiError(400, f"the file part {part!r}: {name} is a list, so its parts are "
                            f"named {name}.<index> (0 to {MAX_ITEMS - 1})", param=name)
    return name, int(key)


def _fill(body: dict[str, Any], name: str, key: Key, ref: str) -> None:
    """Put `ref` into field `name` (item `key`), refusing a value given twice."""
    here = item_name(name, key)
    if key is None:
        if body.get(name) is not None:
            raise ApiError(400, f"{name} is given twice: in the body and as a file part",
                           param=name)
        body[name] = ref
        return
    container = body.get(name)
    if container is None:
        container = body[name] = [] if isinstance(key, int) else {}
    if isinstance(key, int) and isinstance(container, list):
        container.extend([None] * (key + 1 - len(container)))
    elif not (isinstance(key, str) and isinstance(container, dict)):
        raise ApiError(400, f"{here} is given as a file part, but the body's {name} is no "
                            "container of items", param=name)
    if (container.get(key) if isinstance(container, dict) else container[key]) is not None:
        raise ApiError(400, f"{here} is given twice: in the body and as a file part",
                       param=here)
    container[key] = ref


def attach_files(body: dict[str, Any], files: list[FilePart],
                 fields: Mapping[str, InputField]) -> dict[str, FilePart]:
    """Point each field (or container item) a file part is named after at that file
    (`upload://<file name>`), refuse a file part no field names, and return the files by
    file name."""
    by_name: dict[str, FilePart] = {}
    for part in files:
        filename = part.filename or part.name
        if filename in by_name:
            raise ApiError(400, f"two file parts have the file name {filename!r}; give each "
                                "file its own name", param=part.name)
        by_name[filename] = part
        slot = _slot(part.name, body, fields)
        if slot is not None:
            _fill(body, *slot, UPLOAD_SCHEME + filename)
    referenced = {item.removeprefix(UPLOAD_SCHEME) for name, field in fields.items()
                  for _, item in _items(name, field, body.get(name))
                  if isinstance(item, str) and item.startswith(UPLOAD_SCHEME)}
    for filename, part in by_name.items():
        if filename not in referenced:
            known = ", ".join(fields) or "none"
            raise ApiError(400, f"the file part {part.name!r} ({filename!r}) fills no field: "
                                "name the part after a media or tensor field (this model's: "
                                f"{known}; an item of a dict or list field: <field>.<key>) "
                                f"or refer to it as upload://{filename}", param=part.name)
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
    """Fetch (concurrently) every media field or container item given as a URL and take
    every upload one refers to; each such value becomes `{"blob": i}`, the i-th of the
    returned bytes."""
    wanted = [(name, key, item, field) for name, field in fields.items()
              for key, item in _items(name, field, body.get(name))
              if isinstance(item, str) and (field.kind != "tensor"
                                            or item.startswith(UPLOAD_SCHEME))]
    if not wanted:
        return []
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        blobs = await asyncio.gather(*(_bytes(item_name(name, key), item, field, uploads,
                                              limits, client)
                                       for name, key, item, field in wanted))
    refs: dict[str, dict[Key, Any]] = {}
    for index, (name, key, _, _) in enumerate(wanted):
        refs.setdefault(name, {})[key] = {BLOB: index}
    for name, items in refs.items():
        body[name] = with_items(body[name], items)
    return list(blobs)


__all__ = ["attach_files", "fetch_inputs"]
