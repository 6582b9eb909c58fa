"""Request bodies as schemas: the strict check of `/generate` against the model's declared
`request_schema`, and the OpenAPI document that describes every route's body.

The routes read their bodies themselves (size limits, nesting limit, multipart), so FastAPI
cannot infer the bodies; each route declares its pydantic model with `request_body`, and
`openapi_document` moves the models' shared definitions into `components/schemas`, where
OpenAPI's references point.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from mstar.api_server import openai_protocol as oai
from mstar.plugins.registry import import_string

if TYPE_CHECKING:
    from fastapi import FastAPI

    from mstar.api_server.backend import ModelInfo

_REF = "#/components/schemas/{model}"


def mstar_version() -> str:
    from mstar import __version__

    return __version__


def native_request_model(info: ModelInfo) -> type[BaseModel] | None:
    """The model's `/generate` request (`ModelSpec.request_schema`), refusing fields it
    does not declare: models declare what they read and may ignore the rest, the HTTP
    API tells the client instead. None when the model declares no schema."""
    path = info.get("request_schema")
    if not path:
        return None
    model = import_string(path)
    return type(model.__name__, (model,), {"model_config": ConfigDict(extra="forbid"),
                                           "__module__": model.__module__,
                                           "__doc__": model.__doc__})


def check_body(model: type[BaseModel], body: dict[str, Any]) -> None:
    """`body` against `model`, strictly (`oai.parse`): `InvalidRequest` naming the first
    unknown or ill-typed field."""
    oai.parse(model, body)


def field_types(model: type[BaseModel] | None) -> dict[str, Any]:
    """Each field's type (what plain multipart form fields are coerced to)."""
    return {name: info.annotation for name, info in model.model_fields.items()} if model \
        else {}


def request_body(model: type[BaseModel] | None, description: str, *,
                 served: str | None = None, files: Iterable[str] = ()) -> dict[str, Any]:
    """A route's `openapi_extra` describing its JSON body as `model` (any JSON object when
    None); `served`: the one value its `model` field takes; `files`: the fields a
    multipart/form-data body may give as file parts (beside the JSON in `request`)."""
    schema = (model.model_json_schema(ref_template=_REF) if model is not None
              else {"type": "object"})
    if served is not None:
        schema["properties"]["model"] = {"type": "string", "enum": [served]}
    content = {"application/json": {"schema": schema}}
    if files:
        binary = {"type": "string", "format": "binary"}
        content["multipart/form-data"] = {"schema": {
            "type": "object", "description": "File parts named after a field fill it; "
            "`<field>.<key>` / `<field>.<i>` fill one item of a dict or list field.",
            "properties": {
                "request": {"type": "string", "description": "The JSON body."},
                **{name: binary for name in files}}}}
    return {"requestBody": {"required": True, "description": description, "content": content}}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document (built once), each body's `$defs` moved into the
    components."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = app.openapi()
    shared = doc.setdefault("components", {}).setdefault("schemas", {})
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            for content in operation.get("requestBody", {}).get("content", {}).values():
                shared.update(content.get("schema", {}).pop("$defs", {}))
    return doc


__all__ = ["check_body", "field_types", "mstar_version", "native_request_model", "openapi_document",
           "request_body"]
