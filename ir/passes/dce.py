"""Dead-op elimination: keep only ops whose results reach an output or the state."""

from __future__ import annotations

from dataclasses import replace

from .. import ops as _ops
from ..program import Program


def eliminate_dead_ops(program: Program) -> Program:
    live = set(program.outputs) | ({program.state} if program.state else set())
    kept: list[_ops.Op] = []
    for op in reversed(program.ops):
        if live & set(_ops.results(op).values()):
            kept.append(op)
            live |= {v for v in _ops.operands(op).values() if v is not None}
    return replace(program, ops=tuple(reversed(kept)))
