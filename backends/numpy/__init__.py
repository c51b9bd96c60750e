"""The oracle backend: interprets each kernel plan with ``gmagen.ir.oracle`` in float64."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from gmagen.config import Config
from gmagen.ir import oracle
from gmagen.ir import ops as _ops
from gmagen.ir.passes.plan import KernelPlan
from gmagen.ir.printer import print_op

from ..base import Availability, Backend, Executable


class OracleExecutable(Executable):
    def __init__(self, kernel: KernelPlan):
        self.kernel = kernel
        self.config = Config()
        self.source = "\n".join(
            [f"# gmagen numpy oracle: {kernel.name} (float64, GMA_SPEC.md)"]
            + [f"#   oracle.{_ops.op_name(op)}: {print_op(op)}" for op in kernel.ops])

    def run(self, env: dict[str, Any], binding: Any) -> dict[str, Any]:
        swap = binding.layout == "bhnd"
        local: dict[str, Any] = {}

        def read(name: str) -> Any:
            if name in local:
                return local[name]
            value = env.get(name)
            if swap and isinstance(value, np.ndarray) and value.ndim == 4:
                value = np.swapaxes(value, 1, 2)  # call layout -> logical [B, N, H, X]
            return value

        for op in self.kernel.ops:
            args = {f: (None if v is None else read(v)) for f, v in _ops.operands(op).items()}
            out = getattr(oracle, _ops.op_name(op))(**args, **_ops.attrs(op))
            names = list(_ops.results(op).values())
            local.update({names[0]: out} if len(names) == 1 else dict(zip(names, out)))
        result = {}
        for name in self.kernel.outputs:
            value = local[name]
            if swap and isinstance(value, np.ndarray) and value.ndim == 4:
                value = np.swapaxes(value, 1, 2)
            result[name] = value
        return result


class NumpyBackend(Backend):
    name = "numpy"
    native = "numpy"
    devices = ("cpu",)
    dtypes = ("f16", "bf16", "f32", "f64")

    def availability(self) -> Availability:
        return Availability(True)

    def lower(self, kernel: KernelPlan, binding: Any, config: Config,
              options: Mapping[str, Any]) -> Executable:
        return OracleExecutable(kernel)

    def describe(self) -> str:
        return "numpy: the float64 oracle (CPU); every variant, varlen, state"


BACKEND = NumpyBackend()
