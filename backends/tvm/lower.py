"""(kernel plan, call binding, config, target) -> a TVMExecutable: the plan's TE
graph (``emit_<kind>.py``), scheduled from the config (``schedule.py``), built
once per specialization (``launch.py``) and called on NumPy arrays.

A specialization is the plan's ops and attributes, the layout, the optional
inputs present, D / Dv / K, the config and the target; B, N and H stay symbolic
in the built function.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gmagen.config import Config
from gmagen.errors import DTypeError, OptionError, ShapeError
from gmagen.ir.passes.plan import KernelPlan
from gmagen.ir.printer import print_op

from ..base import Executable
from . import emit_read, emit_responsibility, emit_scan, emit_write, launch, space
from .prelude import Graph, Param, check_supported

TARGETS = {"llvm": {"kind": "llvm"}}
FUNC_NAME = "main"


def _emit(kernel: KernelPlan, layout: str, dims: dict[str, int], present: frozenset,
          config: Config, target_kind: str = "llvm") -> Graph:
    if kernel.kind == "responsibility":
        return emit_responsibility.emit(kernel, layout, dims, target_kind)
    if kernel.kind == "write":
        return emit_write.emit(kernel, layout, dims, present, target_kind)
    if kernel.kind == "read":
        return emit_read.emit(kernel, layout, dims, present, target_kind)
    return emit_scan.emit(kernel, layout, dims, present, int(config["chunk"]), target_kind)


def scheduled_module(kernel: KernelPlan, layout: str, dims: dict[str, int],
                     present: frozenset, config: Config, target_kind: str = "llvm"
                     ) -> tuple[Graph, Any, str]:
    """(graph, scheduled IRModule with one function FUNC_NAME, schedule trace)."""
    import tvm
    from tvm import te

    from .schedule import schedule

    graph = _emit(kernel, layout, dims, present, config, target_kind)
    func = te.create_prim_func(graph.params()).with_attr("global_symbol", FUNC_NAME)
    sch = schedule(graph, func, config, target_kind)
    return graph, tvm.IRModule({FUNC_NAME: sch.mod["main"]}), str(sch.trace)


def cuda_source(kernel: KernelPlan, layout: str, dims: dict[str, int], present: frozenset,
                config: Config, arch: str = "sm_90") -> str:
    """Build ``kernel`` for {"kind": "cuda", "arch": arch} (no GPU needed) and return
    the generated CUDA source.  A first step of the cuda target (issue 7): the
    GPU schedule is untuned and nothing runs it yet."""
    import tvm

    _, mod, _ = scheduled_module(kernel, layout, dims, present, space.validate(config), "cuda")
    lib = tvm.compile(mod, target=tvm.target.Target({"kind": "cuda", "arch": arch}))
    return "\n".join(m.inspect_source() for m in lib.mod.imports if m.kind == "cuda")


class TVMExecutable(Executable):
    """One kernel plan built for one call specialization."""

    def __init__(self, kernel: KernelPlan, binding: Any, config: Config, target: str = "llvm"):
        import tvm

        if target not in TARGETS:
            raise OptionError(f"tvm backend: target={target!r} is not allowed; expected one of "
                              + ", ".join(map(repr, TARGETS)))
        check_supported(kernel, binding)
        token = binding.dtypes.get("T", "f32")
        if token != "f32":
            raise DTypeError(f"tvm backend: {token} tokens; target {target} computes float32 "
                             f"only: pass float32 arrays")
        self.kernel = kernel
        self.layout = binding.layout
        self.config = space.validate(config)
        self.target = target
        self.dims = {d: int(binding.dims[d]) for d in ("D", "Dv", "K") if d in binding.dims}
        optional = {getattr(kernel.main, f, None) for f in ("key_mask", "initial_state")}
        self.present = frozenset(v for v in optional if v is not None and v in binding.present)
        key = ("tvm", tvm.__version__, kernel.kind, tuple(print_op(op) for op in kernel.ops),
               kernel.inputs, kernel.outputs, self.layout, tuple(sorted(self.present)),
               tuple(sorted(self.dims.items())), tuple(sorted(self.config.items())), target)
        self.built = launch.build(key, self._make, TARGETS[target])
        self.source = self.built.source

    # -- code generation ---------------------------------------------------
    def _make(self) -> tuple:
        graph, mod, trace = scheduled_module(self.kernel, self.layout, self.dims, self.present,
                                             self.config, TARGETS[self.target]["kind"])

        def source_of(built_mod: Any) -> str:
            return self._source(graph, trace, built_mod)

        return mod, FUNC_NAME, graph.inputs, graph.outputs, source_of

    def _source(self, graph: Graph, trace: str, mod: Any) -> str:
        import tvm

        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        absent = [v for f in ("key_mask", "initial_state")
                  if (v := getattr(self.kernel.main, f, None)) is not None
                  and v not in self.present]
        lines = [f"# gmagen tvm backend: {self.kernel.name} (TE -> TensorIR, apache-tvm "
                 f"{tvm.__version__}, target {TARGETS[self.target]})",
                 *("# " + line for line in str(self.kernel).splitlines()),
                 f"# layout {self.layout}; {dims}; tokens float32, accumulate in float32; "
                 f"B, N, H symbolic"
                 + (f"; absent: {', '.join('%' + v for v in absent)}" if absent else ""),
                 f"# config: {self.config}",
                 *(f"#   {k}: {why}" for k, why in space.KNOBS.items()),
                 "# stages:",
                 *(f"#   {note}" for note in graph.notes),
                 "# schedule trace (s_tir):",
                 *("#   " + line for line in trace.splitlines()),
                 "# TensorIR of the scheduled function:",
                 mod.script()]
        return "\n".join(lines)

    # -- running -------------------------------------------------------------
    def run(self, env: dict[str, Any], binding: Any) -> dict[str, Any]:
        arrays: list[np.ndarray] = []
        dims: dict[str, int] = {}
        for p in self.built.inputs:
            value = env[p.name]
            if p.part:
                value = value[0 if p.part == "S" else 1]
            a = launch.prepare(value, p.dtype)
            _unify(dims, p, a.shape)
            arrays.append(a)
        outs = [launch.aligned_empty(_resolve(p.shape, dims), p.dtype)
                for p in self.built.outputs]
        if any(dims.get(d, 1) == 0 for d in ("B", "N", "H")):
            self._empty(outs, env)  # nothing to compute; zero-extent loops are not built for
        else:
            launch.call(self.built.fn, arrays + outs)
        result: dict[str, Any] = {}
        for p, a in zip(self.built.outputs, outs):
            if p.part:
                pair = result.setdefault(p.name, [None, None])
                pair[0 if p.part == "S" else 1] = a
            else:
                result[p.name] = a
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in result.items()}

    def _empty(self, outs: list[np.ndarray], env: dict[str, Any]) -> None:
        """No token (or no row): memories are zero, a causal state passes through."""
        init = getattr(self.kernel.main, "initial_state", None)
        for p, a in zip(self.built.outputs, outs):
            if p.part and init in self.present and a.size:
                a[...] = np.asarray(env[init][0 if p.part == "S" else 1], dtype=np.float32)
            else:
                a[...] = 0.0


def _unify(dims: dict[str, int], p: Param, shape: tuple[int, ...]) -> None:
    what = f"{p.name}{'[0] (S)' if p.part == 'S' else '[1] (n)' if p.part == 'n' else ''}"
    if len(shape) != len(p.shape):
        raise ShapeError(f"tvm backend: {what} has {len(shape)} dims, expected {list(p.shape)}")
    for want, got in zip(p.shape, shape):
        if isinstance(want, str):
            if dims.setdefault(want, int(got)) != got:
                raise ShapeError(f"tvm backend: {what} has shape {list(shape)}, expected "
                                 f"{want}={dims[want]} in {list(p.shape)}")
        elif want != got:
            raise ShapeError(f"tvm backend: {what} has shape {list(shape)}, expected "
                             f"{list(p.shape)}")


def _resolve(shape: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[d] if isinstance(d, str) else d for d in shape)
