"""The base of every JSON request body the server parses.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do, so newer SDKs keep
working. A number field takes only a JSON number: pydantic would otherwise read ``true`` as 1
and ``"5"`` as 5, and a client that sent ``"max_tokens": true`` or ``"temperature": "0.7"``
would get an answer to a question it did not ask instead of a 400 naming the field (the OpenAI
API rejects both).
"""

from __future__ import annotations

import types
from functools import cache
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

_NUMBERS = (int, float)


def _is_number_field(annotation: Any) -> bool:
    """``int``, ``float``, or a union of them with ``None`` (nothing else in the union)."""
    if annotation in _NUMBERS:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return bool(members) and all(a in _NUMBERS for a in members)
    return False


@cache
def _number_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(
        name for name, field in model.model_fields.items() if _is_number_field(field.annotation)
    )


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool | str) and info.field_name in _number_fields(cls):
            shown = "a string" if isinstance(value, str) else str(value).lower()
            raise ValueError(f"must be a JSON number, not {shown}")
        return value
