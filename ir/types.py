"""Types of IR values: tensors with symbolic shapes, and the K-slot memory.

A dimension is either a symbol (``"B"``, ``"N"``, ``"H"``, ``"D"``, ``"Dv"``,
``"K"``, ``"S"`` for the sequence count of packed input) bound when the program
is called, or an int fixed when the program is built.

A dtype is concrete (``f16 bf16 f32 f64 bool i32 i64``) or a variable bound at
call time: ``T`` is the token dtype (q, k, v, y share it), ``P`` the mixture
parameters' dtype, ``acc`` the accumulator dtype, chosen by the backend
(float32 on GPUs, float64 in the oracle; GMA_SPEC "state ... accumulated in
float32 (float64 in the oracle)").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Dim = Union[str, int]

FLOAT_DTYPES = ("f16", "bf16", "f32", "f64")
CONCRETE_DTYPES = FLOAT_DTYPES + ("bool", "i32", "i64")
DTYPE_VARS = ("T", "P", "acc")
LAYOUTS = ("bnhd", "bhnd")


def is_float(dtype: str) -> bool:
    """True for concrete floats and the float dtype variables."""
    return dtype in FLOAT_DTYPES or dtype in DTYPE_VARS


@dataclass(frozen=True)
class TensorType:
    """``dtype[d0,d1,...]``. Token tensors are stored in logical [B, N, H, X]
    order here; the program's layout says how they sit in memory."""

    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in CONCRETE_DTYPES and self.dtype not in DTYPE_VARS:
            raise ValueError(
                f"TensorType: dtype {self.dtype!r} is not one of "
                f"{CONCRETE_DTYPES + DTYPE_VARS}"
            )
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict:
        return {"kind": "tensor", "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class MemoryType:
    """The K-slot memory (S, n): S has ``shape`` [rows, H, K, Dv], n has
    ``shape[:-1]``; rows is B, or the sequence count S for packed input."""

    shape: tuple[Dim, ...]
    dtype: str = "acc"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if len(self.shape) != 4:
            raise ValueError(f"MemoryType: shape must be [rows, H, K, Dv], got {self.shape}")

    @property
    def rank(self) -> int:
        return 4

    @property
    def n_shape(self) -> tuple[Dim, ...]:
        return self.shape[:-1]

    def __str__(self) -> str:
        return f"mem<{self.dtype}>[{','.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict:
        return {"kind": "memory", "dtype": self.dtype, "shape": list(self.shape)}


ValueType = Union[TensorType, MemoryType]


def type_from_json(data: dict) -> ValueType:
    shape = tuple(data["shape"])
    if data["kind"] == "memory":
        return MemoryType(shape, data.get("dtype", "acc"))
    if data["kind"] == "tensor":
        return TensorType(data["dtype"], shape)
    raise ValueError(f"unknown type kind {data['kind']!r}")


def parse_type(text: str) -> ValueType:
    """Inverse of ``str(type)``: ``f32[B,N,H,K]`` or ``mem<acc>[B,H,K,Dv]``."""
    text = text.strip()
    head, _, rest = text.partition("[")
    if not rest.endswith("]"):
        raise ValueError(f"type {text!r} has no [shape]")
    dims: list[Dim] = []
    for part in rest[:-1].split(","):
        part = part.strip()
        if part:
            dims.append(int(part) if part.lstrip("-").isdigit() else part)
    if head.startswith("mem<") and head.endswith(">"):
        return MemoryType(tuple(dims), head[4:-1])
    return TensorType(head, tuple(dims))
