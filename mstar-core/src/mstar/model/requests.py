"""A model's request checked against its pydantic schema, with one error form for every
plugin: "invalid <model> request: <field>: <problem>; …" and the first field at fault as
the error's `param`.

A whole-request check (a `model_validator`) has no field location: it names its field by
starting its message with it ("n: at most 4 images"), and `named_field` reads it back (the
HTTP layer's strict check does the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mstar.errors import RequestError

T = TypeVar("T", bound=BaseModel)


def named_field(message: str, schema: type[BaseModel]) -> str | None:
    """The field of `schema` a whole-request check's message starts with, if any."""
    name = message.removeprefix("Value error, ").split(":", 1)[0]
    return name if name in schema.model_fields else None


def validate_request(schema: type[T], request: Mapping[str, Any], model: str) -> T:
    """`request` as `schema`, or a `RequestError` listing every problem (by field) and
    naming the first field at fault in `param`."""
    try:
        return schema.model_validate(dict(request))
    except ValidationError as err:
        parts, params = [], []
        for e in err.errors():
            message = e["msg"].removeprefix("Value error, ")
            field = ".".join(str(x) for x in e["loc"])
            params.append(str(e["loc"][0]) if e["loc"] else named_field(message, schema))
            parts.append(f"{field or 'request'}: {message}")
        raise RequestError(f"invalid {model} request: " + "; ".join(parts),
                           param=params[0]) from None
