"""Validation shared by every wire format: strict models, field types and `parse`, which names the field
that is wrong.

Every model forbids unknown fields so that a typo is an error naming the field, not a silent default.
"""

from __future__ import annotations

import typing
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from common.errors import InvalidInput

T = TypeVar("T", bound=BaseModel)

Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
Model = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")]
Stack = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._+-]*$")]
Count = Annotated[int, Field(ge=0, le=10_000_000)]


class Arch(StrEnum):
    CPU = "CPU"
    GPU = "GPU"
    ASIC = "ASIC"
    FPGA = "FPGA"


def _takes_bool(annotation: Any) -> bool:
    return annotation is bool or annotation is Any or any(_takes_bool(a) for a in typing.get_args(annotation))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`true` is not a count: pydantic would read it as 1, so a boolean is refused wherever a field does
        not take one."""
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and not _takes_bool(field.annotation):
                raise ValueError("must not be true or false")
        return value


def _field_of(error: ValidationError) -> tuple[str, str | None]:
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"] if part != "[key]") or None
    if loc == "schema_":
        loc = "schema"
    message = first["msg"]
    if loc:
        message = f"{loc}: {message}"
    return message, loc


def json_object(payload: bytes | str) -> dict[str, Any]:
    """`payload` decoded as a JSON object, or InvalidInput saying why it is not one."""
    try:
        decoded = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}", None, code="malformed_json") from None
    if not isinstance(decoded, dict):
        raise InvalidInput("body must be a JSON object", None)
    return decoded


def parse(model: type[T], payload: bytes | str | dict[str, Any]) -> T:
    """Validate `payload` (JSON bytes or a decoded dict) as `model`, raising InvalidInput naming the field."""
    if isinstance(payload, bytes | str):
        payload = json_object(payload)
    if not isinstance(payload, dict):
        raise InvalidInput("body must be a JSON object", None)
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        message, field = _field_of(exc)
        raise InvalidInput(message, field) from None
