"""Fusion planner: group a program's ops into kernel plans that backends lower.

Each slot_write, slot_read and causal_scan becomes one kernel together with the
responsibility ops that produce its r operands; the responsibilities are
recomputed inside every kernel that needs them instead of being stored
(GMA_SPEC: "a fused kernel can avoid even those").  A responsibility whose
result is itself a program output also gets a standalone kernel.

Kernel kinds: ``responsibility``, ``write`` (responsibility + slot_write over
the keys), ``read`` (responsibility + slot_read over the queries) and ``scan``
(two responsibilities + causal_scan, one chunked pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import ops as _ops
from ..program import Program
from ..verify import verify
from .dce import eliminate_dead_ops

KINDS = ("responsibility", "write", "read", "scan")
_ANCHORS = {_ops.SlotWrite: "write", _ops.SlotRead: "read", _ops.CausalScan: "scan"}
# Which operand of each anchor op is a responsibility matrix.
_R_OPERANDS = {"write": ("r",), "read": ("r",), "scan": ("rq", "rk")}


@dataclass(frozen=True)
class KernelPlan:
    """One kernel: its ops in order, the values it reads from outside, and the
    values it writes.  ``main`` is the op that names the kernel."""

    kind: str
    ops: tuple[_ops.Op, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def main(self) -> _ops.Op:
        return self.ops[-1]

    @property
    def name(self) -> str:
        return f"gma_{self.kind}"

    def responsibility_of(self, operand: str) -> Optional[_ops.Responsibility]:
        """The fused responsibility op producing the main op's ``operand`` (None if
        that r comes from outside the kernel)."""
        value = getattr(self.main, operand)
        for op in self.ops:
            if isinstance(op, _ops.Responsibility) and op.out == value:
                return op
        return None

    def __str__(self) -> str:
        from ..printer import print_op

        head = (f"kernel {self.name}: reads " + " ".join(f"%{v}" for v in self.inputs)
                + " -> " + " ".join(f"%{v}" for v in self.outputs))
        return "\n".join([head] + ["    " + print_op(op) for op in self.ops])


@dataclass(frozen=True)
class Plan:
    program: Program
    kernels: tuple[KernelPlan, ...]

    def __str__(self) -> str:
        lines = [f"plan for {self.program.name}: {len(self.program.ops)} ops -> "
                 f"{len(self.kernels)} kernel(s)"]
        lines += ["  " + str(k).replace("\n", "\n  ") for k in self.kernels]
        return "\n".join(lines)


def _kernel(kind: str, op_list: list[_ops.Op]) -> KernelPlan:
    defined: set[str] = set()
    reads: list[str] = []
    for op in op_list:
        for value in _ops.operands(op).values():
            if value is not None and value not in defined and value not in reads:
                reads.append(value)
        defined |= set(_ops.results(op).values())
    outs = tuple(_ops.results(op_list[-1]).values())
    return KernelPlan(kind, tuple(op_list), tuple(reads), outs)


def plan_program(program: Program) -> Plan:
    """Verify, drop dead ops, and group the rest into kernels (program order)."""
    verify(program)
    program = eliminate_dead_ops(program)
    wanted = set(program.outputs) | ({program.state} if program.state else set())
    kernels: list[KernelPlan] = []
    for op in program.ops:
        if isinstance(op, _ops.Responsibility):
            if op.out in wanted:
                kernels.append(_kernel("responsibility", [op]))
            continue  # otherwise recomputed inside each consumer
        kind = _ANCHORS[type(op)]
        fused: list[_ops.Op] = []
        for field in _R_OPERANDS[kind]:
            producer = program.producer(getattr(op, field))
            if isinstance(producer, _ops.Responsibility) and producer not in fused:
                fused.append(producer)
        kernels.append(_kernel(kind, fused + [op]))
    return Plan(program, tuple(kernels))
