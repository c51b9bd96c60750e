"""(kernel plan, call binding, config) -> one jitted JAX function.

A plan's ops run in order through ``ops.py`` (the functions named like the
oracle's); responsibilities are recomputed inside the kernel that reads them,
as the plan says.  The static attributes (norm, eps, covariance) and the chunk
are Python constants of the traced function, so each specialization is its own
jit; B, N, H and the number of packed sequences are shapes, retraced by jit as
they change.  Layout "bhnd" is a transpose at the boundary (fused by XLA).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import jax
import jax.numpy as jnp

from gmagen.adapters.dlpack import IR_TO_NAME
from gmagen.config import Config
from gmagen.ir import ops as _ops
from gmagen.ir.passes.plan import KernelPlan
from gmagen.ir.printer import print_op

from ..base import Executable
from . import ops as jax_ops

_CHUNKED = (_ops.SlotWrite, _ops.SlotRead, _ops.CausalScan)  # ops taking ``chunk``
_TOKEN_DIM = {"x": "D", "r": "K", "rq": "K", "rk": "K", "v": "Dv"}  # rank-4 operands
_LOG_VAR_DIMS = {"diag": ("H", "K", "D"), "spherical": ("H", "K"), "shared": ("H",)}


def _swap(value: Any) -> Any:
    """[B, N, H, X] <-> [B, H, N, X] for rank-4 (per-token) arrays; others unchanged."""
    if isinstance(value, jax.Array) and value.ndim == 4:
        return jnp.swapaxes(value, 1, 2)
    return value


def kernel_function(kernel: KernelPlan, layout: str, chunk: int,
                    y_dtype: Optional[str] = None):
    """The kernel as a pure function: {input name: array, (S, n) or None} ->
    {output name: array or (S, n)}; jit, grad and vmap apply to it.  ``y_dtype``
    (IR name): the dtype of the y that slot_read / causal_scan produce."""
    swap = layout == "bhnd"
    y_names = {op.out for op in kernel.ops if isinstance(op, (_ops.SlotRead, _ops.CausalScan))}

    def run(inputs: dict[str, Any]) -> dict[str, Any]:
        local: dict[str, Any] = {}

        def read(name: str) -> Any:
            if name in local:
                return local[name]
            value = inputs.get(name)
            return _swap(value) if swap else value  # call layout -> logical [B, N, H, X]

        for op in kernel.ops:
            args = {f: (None if v is None else read(v)) for f, v in _ops.operands(op).items()}
            extra = {"chunk": chunk} if isinstance(op, _CHUNKED) else {}
            out = getattr(jax_ops, _ops.op_name(op))(**args, **_ops.attrs(op), **extra)
            names = list(_ops.results(op).values())
            local.update({names[0]: out} if len(names) == 1 else dict(zip(names, out)))
        result = {}
        for name in kernel.outputs:
            value = local[name]
            if name in y_names and y_dtype is not None:
                value = value.astype(jnp.dtype(IR_TO_NAME[y_dtype]))
            result[name] = _swap(value) if swap else value
        return result

    return run


@lru_cache(maxsize=256)
def jitted_kernel(kernel: KernelPlan, layout: str, chunk: int, y_dtype: Optional[str]) -> Any:
    """The jitted kernel function, shared by every Kernel that lowers the same
    plan (jax.jit then traces and compiles each set of shapes once)."""
    return jax.jit(kernel_function(kernel, layout, chunk, y_dtype))


class JaxExecutable(Executable):
    """One kernel plan, jitted for one specialization (layout, dtypes, D/Dv/K,
    optional inputs present).  ``fn`` is the pure function (jit, grad and vmap
    apply to it); ``run`` calls its jitted form."""

    def __init__(self, kernel: KernelPlan, binding: Any, config: Config):
        self.kernel = kernel
        self.config = config
        self.layout = binding.layout
        self.binding = binding
        args = (kernel, binding.layout, int(config["chunk"]), binding.dtypes.get("T"))
        self.fn = kernel_function(*args)
        self._jitted = jitted_kernel(*args)
        # An absent key mask runs as all True and an absent initial state as zeros
        # (unpacked input only; packed input reads an initial state per sequence):
        # the same values, one specialization fewer to compile.
        self._defaults: dict[str, str] = {}
        for op in kernel.ops:
            packed = getattr(op, "cu_seqlens", None) in binding.present
            for field, name in _ops.operands(op).items():
                if name in kernel.inputs and (field == "key_mask" or (
                        field == "initial_state" and not packed)):
                    self._defaults[name] = field
        self._specs: Optional[dict[str, Any]] = None  # input shapes of the first call
        self._source: Optional[str] = None

    def _default(self, field: str, binding: Any) -> Any:
        """All True key mask / zero initial state for this call; None where the
        binding lacks a dim (fixed in the program): then none."""
        d = binding.dims
        try:
            if field == "key_mask":
                return jnp.ones((d["B"], d["N"]), bool)
            wide = "f64" in (binding.dtypes.get("T"), binding.dtypes.get("P"))
            dtype = jnp.float64 if wide else jnp.float32
            return (jnp.zeros((d["B"], d["H"], d["K"], d["Dv"]), dtype),
                    jnp.zeros((d["B"], d["H"], d["K"]), dtype))
        except KeyError:
            return None

    def run(self, env: dict[str, Any], binding: Any) -> dict[str, Any]:
        inputs = {name: env.get(name) for name in self.kernel.inputs}
        missing = [name for name in self._defaults if inputs[name] is None]
        if missing:
            # made on the inputs' device but uncommitted, like jnp.asarray's arrays:
            # committed ones would be a different jit cache entry
            devices = {dev for a in jax.tree_util.tree_leaves(inputs)
                       if isinstance(a, jax.Array) for dev in a.devices()}
            with jax.default_device(devices.pop() if len(devices) == 1 else None):
                for name in missing:
                    inputs[name] = self._default(self._defaults[name], binding)
        if self._specs is None:
            self._specs = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs)
        return self._jitted(inputs)

    # -- source ------------------------------------------------------------------
    @property
    def source(self) -> str:  # type: ignore[override]
        """Header (plan, variant, config) + the jaxpr of the jitted function, traced
        for the first call's shapes (before any call: the binding's dims)."""
        if self._source is None:
            self._source = self._render()
        return self._source

    def _render(self) -> str:
        b = self.binding
        dims = ", ".join(f"{d}={b.dims[d]}" for d in ("B", "N", "H", "S", "D", "Dv", "K")
                         if d in b.dims)
        head = [f"# gmagen jax backend: {self.kernel.name} (jax {jax.__version__}), "
                f"layout {self.layout}, dtypes {dict(b.dtypes)}, {self.config}",
                "# accumulation in float32 (float64 for float64 inputs), matmuls at "
                "Precision.HIGHEST; causal_scan: lax.scan over chunks of `chunk` tokens"]
        head += [f"#   ops.{_ops.op_name(op)}: {print_op(op)}" for op in self.kernel.ops]
        try:
            specs = self._specs if self._specs is not None else self._example_specs()
            shapes = {n: (None if s is None else jax.tree_util.tree_map(lambda a: a.shape, s))
                      for n, s in specs.items()}
            head.append(f"# jaxpr traced for {dims}: inputs {shapes}")
            return "\n".join(head) + "\n" + str(jax.make_jaxpr(self.fn)(specs))
        except Exception as exc:  # noqa: BLE001 -- a description must not fail a call
            return "\n".join(head + [f"# (no jaxpr: {type(exc).__name__}: {exc})"])

    def _example_specs(self) -> dict[str, Any]:
        """ShapeDtypeStructs of the kernel's inputs from the binding's dims."""
        b = self.binding
        d = dict(b.dims)
        swap = self.layout == "bhnd"
        acc = jnp.dtype(IR_TO_NAME.get(b.dtypes.get("acc", "f32"), "float32"))

        def dtype(name: str, default: str) -> Any:
            return jnp.dtype(IR_TO_NAME.get(b.input_dtypes.get(name, default), "float32"))

        specs: dict[str, Any] = {}
        for op in self.kernel.ops:
            for field, name in _ops.operands(op).items():
                if name is None or name not in self.kernel.inputs or name in specs:
                    continue
                if field in _ops.optional_operands(type(op)) and name not in b.present:
                    specs[name] = None
                    continue
                rows = d["S"] if getattr(op, "cu_seqlens", None) in b.present else d["B"]
                if field in _TOKEN_DIM:
                    shape = (d["B"], d["N"], d["H"], d[_TOKEN_DIM[field]])
                    shape = (shape[0], shape[2], shape[1], shape[3]) if swap else shape
                    is_r = field in ("r", "rq", "rk")  # responsibilities: acc dtype
                    specs[name] = jax.ShapeDtypeStruct(
                        shape, acc if is_r else dtype(name, b.dtypes.get("T", "f32")))
                elif field in ("mean", "log_var", "logit"):
                    dims = {"mean": ("H", "K", "D"), "logit": ("H", "K"),
                            "log_var": _LOG_VAR_DIMS[op.covariance]}[field]
                    specs[name] = jax.ShapeDtypeStruct(tuple(d[x] for x in dims),
                                                       dtype(name, b.dtypes.get("P", "f32")))
                elif field == "key_mask":
                    specs[name] = jax.ShapeDtypeStruct((d["B"], d["N"]), jnp.bool_)
                elif field == "cu_seqlens":
                    specs[name] = jax.ShapeDtypeStruct((d["S"] + 1,), jnp.int32)
                elif field in ("memory", "initial_state"):
                    specs[name] = (jax.ShapeDtypeStruct((rows, d["H"], d["K"], d["Dv"]), acc),
                                   jax.ShapeDtypeStruct((rows, d["H"], d["K"]), acc))
        for name, field in self._defaults.items():  # what run() passes when absent
            if specs.get(name) is None:
                specs[name] = jax.eval_shape(lambda f=field: self._default(f, b))
        return specs
