"""Config: an immutable mapping of tile knobs (block_n, num_warps, ...).

``str(config)`` reads ``Config(block_n=64, num_warps=4)`` and pastes back into
``gmagen.compile(..., config="Config(block_n=64, num_warps=4)")`` or into Python.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from typing import Any, Union

from .errors import OptionError

Scalar = Union[int, float, str, bool]


class Config(Mapping[str, Scalar]):
    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, Scalar] | None = None, /, **kwargs: Scalar):
        merged = dict(values or {}, **kwargs)
        for key, value in merged.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise OptionError(f"config key {key!r} is not an identifier")
            if not isinstance(value, (int, float, str, bool)):
                raise OptionError(f"config {key}={value!r}: expected int, float, str or bool")
        self._items = tuple(sorted(merged.items()))

    def __getitem__(self, key: str) -> Scalar:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self._items) + ")"

    __str__ = __repr__

    def replace(self, **kwargs: Scalar) -> "Config":
        return Config(dict(self, **kwargs))

    def to_json(self) -> dict[str, Scalar]:
        return dict(self._items)

    @classmethod
    def parse(cls, text: str) -> "Config":
        """Read ``Config(a=1, b='x')`` (or ``a=1, b='x'``) without eval."""
        text = text.strip()
        if text.startswith("Config(") and text.endswith(")"):
            text = text[len("Config("):-1]
        try:
            call = ast.parse(f"f({text})", mode="eval").body
            assert isinstance(call, ast.Call) and not call.args
            return cls({kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})  # type: ignore[misc]
        except (SyntaxError, ValueError, AssertionError):
            raise OptionError(f"config {text!r} is not of the form Config(key=value, ...)") from None


def as_config(value: Union[None, str, Mapping[str, Any]]) -> Config | None:
    if value is None or isinstance(value, Config):
        return value
    if isinstance(value, str):
        return Config.parse(value)
    if isinstance(value, Mapping):
        return Config(value)
    raise OptionError(f"config={value!r}: expected a Config, a dict or a string")
