"""(kernel plan, call binding, config) -> a TorchExecutable that runs the plan's
ops with ``ops.py``, op by op, like the numpy backend's OracleExecutable.

Nothing is generated: ``source`` is a readable description of the torch calls
each op makes, headed by the plan, the specialization and the config.
"""

from __future__ import annotations

from typing import Any

from gmagen.config import Config
from gmagen.errors import DTypeError, OptionError
from gmagen.ir import ops as _ops
from gmagen.ir.passes.plan import KernelPlan
from gmagen.ir.printer import print_op

from ..base import Executable
from . import ops as torch_ops

# config knob -> what it means; every plan kind takes the same knobs (one config
# may be given for a whole program), only the scan uses "chunk"
KNOBS = {"chunk": "tokens per causal chunk, a positive int (masked C x C products inside "
                  "a chunk, a K x Dv state carried across chunks)"}
DEFAULT_CONFIG = Config(chunk=torch_ops.SCAN_CHUNK)


def validate(config: Config) -> Config:
    """The config with defaults filled in; OptionError naming a bad knob."""
    unknown = sorted(set(config) - set(KNOBS))
    if unknown:
        valid = "; ".join(f"{k}: {why}" for k, why in KNOBS.items())
        raise OptionError(f"torch backend: unknown config knob(s) {', '.join(map(repr, unknown))}; "
                          f"valid knobs: {valid}")
    full = DEFAULT_CONFIG.replace(**dict(config))
    chunk = full["chunk"]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise OptionError(f"torch backend: config knob chunk={chunk!r} is not allowed; expected "
                          f"{KNOBS['chunk']}; default {DEFAULT_CONFIG['chunk']}")
    return full


def _t_outputs(kernel: KernelPlan) -> set[str]:
    """Results of dtype T (y of slot_read and causal_scan): returned in the token dtype."""
    return {op.out for op in kernel.ops if isinstance(op, (_ops.SlotRead, _ops.CausalScan))}


class TorchExecutable(Executable):
    """One kernel plan for one call specialization (layout, dtypes, optional inputs)."""

    def __init__(self, kernel: KernelPlan, binding: Any, config: Config):
        self.kernel = kernel
        self.layout = binding.layout
        self.config = validate(config)
        self.chunk = int(self.config["chunk"])
        floats = [d for d in binding.input_dtypes.values() if d in ("f16", "bf16", "f32", "f64")]
        self.acc = "f64" if "f64" in floats else "f32"
        if binding.device[0] == "metal" and self.acc == "f64":
            raise DTypeError("torch backend on MPS: float64 inputs, but MPS has no float64; "
                             "pass float32 (or float16 / bfloat16) tensors")
        self.token_dtype = binding.dtypes.get("T", "f32")
        self.t_outputs = _t_outputs(kernel)
        self._optional = {v for op in kernel.ops for f, v in _ops.operands(op).items()
                          if v is not None and f in _ops.optional_operands(type(op))}
        self.source = self._describe(binding)

    def _describe(self, binding: Any) -> str:
        dtypes = ", ".join(f"{k}={binding.dtypes[k]}" for k in ("T", "P") if k in binding.dtypes)
        acc = "float64" if self.acc == "f64" else "float32"
        layout = ("bnhd" if self.layout == "bnhd"
                  else "bhnd (per-token tensors read and written as transposed views)")
        absent = [v for v in self.kernel.inputs if v in self._optional and v not in binding.present]
        lines = [f"# gmagen torch backend: {self.kernel.name} (plain torch ops, GMA_SPEC.md)",
                 f"# config: {self.config}  (chunk: {KNOBS['chunk']})",
                 f"# layout {layout}; dtypes {dtypes}; accumulate in {acc}; "
                 f"y returned as {self.token_dtype}",
                 "# reads " + " ".join(f"%{v}" for v in self.kernel.inputs if v not in absent)
                 + " -> " + " ".join(f"%{v}" for v in self.kernel.outputs)
                 + (f"  (absent: {', '.join('%' + v for v in absent)})" if absent else "")]
        for op in self.kernel.ops:
            name = _ops.op_name(op)
            lines.append(print_op(op))
            call = f"gmagen.backends.torch.ops.{name}"
            if isinstance(op, _ops.CausalScan):
                call += f"(chunk={self.chunk})"
            lines.append(f"    # {call}: {torch_ops.TORCH_CALLS[name]}")
        return "\n".join(lines)

    def run(self, env: dict[str, Any], binding: Any) -> dict[str, Any]:
        import torch

        result = run_ops(self.kernel, env, self.layout, self.chunk)
        token = getattr(torch, {"f16": "float16", "bf16": "bfloat16", "f32": "float32",
                                "f64": "float64"}[self.token_dtype])
        for name in self.t_outputs & set(result):
            result[name] = result[name].to(token)
        return result


def run_ops(kernel: KernelPlan, env: dict[str, Any], layout: str, chunk: int) -> dict[str, Any]:
    """The plan's ops on torch tensors (``env``: name -> tensor or (S, n), in the call's
    layout); returns its outputs in the call's layout, in the accumulation dtype.
    Differentiable: ``gmagen.torch`` runs it under autograd for its gradients."""
    import torch

    swap = layout == "bhnd"
    local: dict[str, Any] = {}

    def read(name: str) -> Any:
        if name in local:
            return local[name]
        value = env.get(name)
        if swap and isinstance(value, torch.Tensor) and value.dim() == 4:
            value = value.transpose(1, 2)  # call layout -> logical [B, N, H, X], a view
        return value

    for op in kernel.ops:
        args = {f: (None if v is None else read(v)) for f, v in _ops.operands(op).items()}
        extra = {"chunk": chunk} if isinstance(op, _ops.CausalScan) else {}
        out = getattr(torch_ops, _ops.op_name(op))(**args, **_ops.attrs(op), **extra)
        names = list(_ops.results(op).values())
        local.update({names[0]: out} if len(names) == 1 else dict(zip(names, out)))
    result = {}
    for name in kernel.outputs:
        value = local[name]
        if swap and isinstance(value, torch.Tensor) and value.dim() == 4:
            value = value.transpose(1, 2)  # back to the call's layout, a view
        result[name] = value
    return result
