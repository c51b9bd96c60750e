"""IR passes, one per module: ``dce`` drops dead ops, ``plan`` groups ops into kernels."""

from .dce import eliminate_dead_ops
from .plan import KernelPlan, Plan, plan_program

__all__ = ["KernelPlan", "Plan", "eliminate_dead_ops", "plan_program"]
