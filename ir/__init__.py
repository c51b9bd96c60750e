"""gmagen.ir: the GMA intermediate representation (stdlib and NumPy only).

Nothing here imports a backend or an array framework other than NumPy.
"""

from . import oracle
from .ops import (COVARIANCES, DEFAULT_EPS, NORMS, OPS, CausalScan, Op, Responsibility,
                  SlotRead, SlotWrite, attrs, op_name, operands, results)
from .passes import KernelPlan, Plan, eliminate_dead_ops, plan_program
from .printer import parse, print_program
from .program import Input, Program
from .types import FLOAT_DTYPES, LAYOUTS, MemoryType, TensorType
from .verify import verify

__all__ = [
    "COVARIANCES", "DEFAULT_EPS", "FLOAT_DTYPES", "LAYOUTS", "NORMS", "OPS",
    "CausalScan", "Input", "KernelPlan", "MemoryType", "Op", "Plan", "Program",
    "Responsibility", "SlotRead", "SlotWrite", "TensorType", "attrs",
    "eliminate_dead_ops", "op_name", "operands", "oracle", "parse", "plan_program",
    "print_program", "results", "verify",
]
