"""Program: typed inputs, a list of ops in SSA order, outputs; JSON and a stable hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from gmagen.errors import ParseError

from . import ops as _ops
from .types import LAYOUTS, ValueType, type_from_json

FORMAT = "gmagen.program/1"
# What an input is for; the compiled Kernel uses it to map call arguments.
ROLES = ("token", "mixture", "mask", "state", "seqlens", "responsibility")


def _canonical_attrs(op: _ops.Op) -> dict[str, Any]:
    """Attributes with float fields as floats: eps=0 and eps=0.0 compare equal, so
    they must serialize (and hash) the same."""
    out = _ops.attrs(op)
    for f in fields(op):
        value = out.get(f.name)
        if f.type in ("float", float) and isinstance(value, int) and not isinstance(value, bool):
            out[f.name] = float(value)
    return out


@dataclass(frozen=True)
class Input:
    """A program parameter. ``optional`` inputs may be omitted at call time
    (key_mask, initial_state, cu_seqlens); the ops that read them then
    behave as GMA_SPEC says for the absent case."""

    name: str
    type: ValueType
    role: str = "token"
    optional: bool = False

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.type.to_json(), "role": self.role,
                "optional": self.optional}


@dataclass(frozen=True)
class Program:
    """A GMA computation. Token tensors have logical shape [B, N, H, X]; ``layout``
    says how they are stored ("bnhd" or "bhnd", GMA_SPEC "Shapes and names").

    ``outputs`` are returned on every call; ``state`` names the (S, n) memory
    returned when the caller asks for it (``return_state=True``)."""

    name: str
    inputs: tuple[Input, ...]
    ops: tuple[_ops.Op, ...]
    outputs: tuple[str, ...]
    state: Optional[str] = None
    layout: str = "bnhd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "outputs", tuple(self.outputs))

    # -- lookups ---------------------------------------------------------
    def input(self, name: str) -> Input:
        for inp in self.inputs:
            if inp.name == name:
                return inp
        raise KeyError(name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def producer(self, value: str) -> Optional[_ops.Op]:
        for op in self.ops:
            if value in _ops.results(op).values():
                return op
        return None

    def users(self, value: str) -> list[_ops.Op]:
        return [op for op in self.ops if value in _ops.operands(op).values()]

    @property
    def causal(self) -> bool:
        return any(isinstance(op, _ops.CausalScan) for op in self.ops)

    def with_layout(self, layout: str) -> "Program":
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        return replace(self, layout=layout)

    # -- serialisation ---------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "layout": self.layout,
            "inputs": [i.to_json() for i in self.inputs],
            "ops": [{"op": _ops.op_name(op), **_ops.results(op), **_ops.operands(op),
                     **_canonical_attrs(op)} for op in self.ops],
            "outputs": list(self.outputs),
            "state": self.state,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> "Program":
        if isinstance(data, str):
            data = json.loads(data)
        if data.get("format", FORMAT) != FORMAT:
            raise ParseError(f"program JSON has format {data['format']!r}, expected {FORMAT!r}")
        ops = []
        for i, entry in enumerate(data["ops"]):
            entry = dict(entry)
            name = entry.pop("op", None)
            if name not in _ops.OPS:
                raise ParseError(f"program JSON op {i}: unknown op {name!r}, expected one of "
                                 f"{tuple(_ops.OPS)}")
            try:
                ops.append(_ops.OPS[name](**entry))
            except TypeError as exc:
                raise ParseError(f"program JSON op {i} ({name}): {exc}") from None
        inputs = tuple(Input(i["name"], type_from_json(i["type"]), i.get("role", "token"),
                             bool(i.get("optional", False))) for i in data["inputs"])
        return cls(data["name"], inputs, tuple(ops), tuple(data["outputs"]),
                   data.get("state"), data.get("layout", "bnhd"))

    def hash(self) -> str:
        """Stable across processes and versions of Python: sha256 of the
        canonical JSON (sorted keys, repr of floats), first 16 hex digits."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        from .printer import print_program

        return print_program(self)
