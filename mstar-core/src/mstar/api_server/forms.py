"""Request bodies as JSON or multipart/form-data, parsed once for every route.

A multipart body comes in one of two shapes: a part named `request` holding the JSON body
plus file parts (mstar's own form: `/generate`, chat uploads), or plain form fields plus
file parts, as OpenAI's clients send `images.edit` and `audio.transcriptions`. Plain fields
arrive as strings, so they are coerced against the route's field types (`form_values`): a
value the type takes as a string stays one, else it is read as JSON (`"5"` -> 5,
`"true"` -> true). The body is bounded by `max_body_bytes` in either shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile

from mstar.api_server.request_flow import ApiError, check_json_depth, decode_json, read_json

MAX_FILES, MAX_FIELDS = 64, 64


@dataclass(frozen=True)
class FilePart:
    """One file of a multipart body: the part's name, the client's file name, its bytes."""

    name: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class Body:
    """A parsed body: its fields (the JSON object, or the coerced form fields) and files."""

    fields: dict[str, Any]
    files: list[FilePart]


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def read_body(request: Request, max_body_bytes: int,
                    types: Mapping[str, Any] | None = None) -> Body:
    """The body of `request`: JSON, or multipart/form-data in either shape (see the module
    docstring); `types`: the field types plain form fields are coerced to."""
    if not is_multipart(request):
        return Body(await read_json(request, max_body_bytes), [])
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > max_body_bytes:
        raise ApiError(413, f"a multipart body needs a content-length of at most "
                            f"{max_body_bytes} bytes")
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS,
                              max_part_size=max_body_bytes)
    try:
        plain: dict[str, list[str]] = {}
        files = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append(FilePart(name, value.filename or "", value.content_type or "",
                                      await value.read()))
            else:
                plain.setdefault(name, []).append(value)
    finally:
        await form.close()
    if "request" in plain:
        others = sorted(set(plain) - {"request"})
        if others or len(plain["request"]) > 1:
            raise ApiError(400, "a multipart request with a `request` part holds the body "
                                "there, once; other plain fields are not read: "
                                f"{', '.join(others) or 'request (twice)'}",
                           param=others[0] if others else "request")
        return Body(decode_json(plain["request"][0], what="the request field",
                                param="request"), files)
    return Body(form_values(plain, types or {}), files)


def form_values(plain: Mapping[str, list[str]], types: Mapping[str, Any]) -> dict[str, Any]:
    """Plain form fields as body fields: a field given more than once (or named `x[]`, as
    OpenAI's clients write lists) is a list; each string stays one where its field's type
    takes a string, else it is read as JSON (a string that is no JSON stays a string, for
    the schema check to name)."""
    fields: dict[str, Any] = {}
    for raw_name, values in plain.items():
        name = raw_name.removesuffix("[]")
        adapter = _adapter(types.get(name))
        coerced = [_coerced(name, v, adapter) for v in values]
        fields[name] = coerced if raw_name.endswith("[]") or len(coerced) > 1 else coerced[0]
    return fields


def _adapter(annotation: Any) -> TypeAdapter[Any] | None:
    return None if annotation is None else TypeAdapter(annotation)


def _coerced(name: str, value: str, adapter: TypeAdapter[Any] | None) -> Any:
    if adapter is not None:
        try:
            adapter.validate_python(value, strict=True)
            return value
        except ValidationError:
            pass
    data = value.encode()
    check_json_depth(data, what=f"the form field {name}", param=name)
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return value


__all__ = ["MAX_FIELDS", "MAX_FILES", "Body", "FilePart", "form_values", "is_multipart",
           "read_body"]
