"""A boolean where a number belongs is a mistake, not 1 or 0.

pydantic (in its default, lax mode) reads ``true`` as 1 for an int or float field, so ``rate_per_s: yes`` (YAML
1.1's booleans include yes/no/on/off) or ``peak_flops: {bf16: true}`` would run as 1 request/s or 1 FLOP/s,
silently. The project's config models derive from ``NumbersNotBools``, which checks their input before validating
it: a boolean, at any depth of a value's lists and mappings, in a field that holds numbers and nothing a boolean
could stand for (no bool, Any or nested model in its type) is an error naming the key.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, model_validator
from pydantic_core import PydanticCustomError


class NumbersNotBools(BaseModel):
    """A config model whose number fields refuse booleans (``numbers_not_bools``)."""

    @model_validator(mode="before")
    @classmethod
    def _numbers_not_bools(cls, data):
        return numbers_not_bools(cls, data)


def numbers_not_bools(model: type[BaseModel], data):
    """``data`` (a model's input) unchanged, after checking it gives no boolean where ``model`` takes numbers. The
    error's context names the key (``ctx["key"]``), as an unknown key's does."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and _contains_bool(value) and _numbers_only(model, key):
                raise PydanticCustomError(
                    "bool_number", "expected a number, got a boolean (true/false, or YAML's yes/no/on/off)",
                    {"key": key})
    return data


def _contains_bool(value) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, dict):
        return any(_contains_bool(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_bool(v) for v in value)
    return False


@lru_cache(maxsize=None)
def _numbers_only(model: type[BaseModel], field_name: str) -> bool:
    """Whether the field holds numbers (int, float) and no value a boolean may be."""
    field = model.model_fields.get(field_name)
    if field is None:
        return False
    leaves: list = []

    def walk(a) -> None:
        origin = get_origin(a)
        if origin is Literal:
            leaves.extend(type(v) for v in get_args(a))
        elif origin is Annotated:
            walk(get_args(a)[0])
        elif get_args(a):
            for arg in get_args(a):
                walk(arg)
        else:
            leaves.append(a)

    walk(field.annotation)
    if any(leaf is bool or leaf is Any or (isinstance(leaf, type) and issubclass(leaf, BaseModel))
           for leaf in leaves):
        return False
    return any(leaf in (int, float) for leaf in leaves)
