"""(kernel plan, call binding, config, target) -> a TVMExecutable: the plan's TE
graph (``emit_<kind>.py``), scheduled from the config (``schedule.py``), built
once per specialization (``launch.py``) and called on NumPy arrays (llvm) or
torch CUDA tensors (cuda, ``runtime.py``).

A specialization is the plan's ops and attributes, the layout, the optional
inputs present, D / Dv / K, the token dtype, the config and the target (with
its arch); B, N and H stay symbolic in the built function.
"""

from __future__ import annotations

import logging
from typing import Any

from gmagen.config import Config
from gmagen.errors import DTypeError, OptionError, ShapeError, UnsupportedFeature
from gmagen.ir.passes.plan import KernelPlan
from gmagen.ir.printer import print_op

from ..base import Executable
from . import emit_read, emit_responsibility, emit_scan, emit_write, launch, pipeline, space
from .prelude import Graph, Param, check_supported
from .runtime import ShapeMismatch, Slot, Step, run_step

log = logging.getLogger("gmagen.tvm")

TARGET_KINDS = ("llvm", "cuda")
TOKEN_DTYPES = {"llvm": ("f32",), "cuda": ("f32", "f16", "bf16")}
NUMPY_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
FUNC_NAME = "main"
# Test hook: True builds the cuda plans' tiled graphs (emit_*: ``tile``) for llvm too,
# with the CPU schedule, so that their numerics are checked without a GPU
# (tests/backends/tvm/test_tiled_graphs.py); part of the build cache key.
TILED_ON_CPU = False


def target_dict(kind: str, arch: str = "") -> dict:
    """The TVM target of a target kind ("llvm" / "cuda") and arch ("sm_90")."""
    return {"kind": "cuda", "arch": arch} if kind == "cuda" else {"kind": kind}


def _emit(kernel: KernelPlan, layout: str, dims: dict[str, int], present: frozenset,
          config: Config, target_kind: str = "llvm", token_dtype: str = "float32") -> Graph:
    # cuda: per-token stages in tiles of block_n tokens (schedule_cuda.py)
    tile = int(config["block_n"]) if target_kind == "cuda" or TILED_ON_CPU else 0
    # the tiles are only staged (shared memory) on cuda
    wide = bool(tile) and target_kind == "cuda" and bool(config.get("wide_tiles", 0))
    # tensor cores for the logits: cuda with 16-bit tokens (TILED_ON_CPU: the graph's
    # numerics on the CPU for any tokens, products in TE's plain loops); the emitters
    # take the block's warps (Graph.mma_warps), 0 for none
    on = bool(tile) and bool(config.get("mma", 0)) and (
        token_dtype != "float32" if target_kind == "cuda" else TILED_ON_CPU)
    mma = int(config["num_threads"]) // 32 if on else 0
    if kernel.kind == "responsibility":
        return emit_responsibility.emit(kernel, layout, dims, target_kind, token_dtype, tile,
                                        wide_tiles=wide, mma=mma)
    if kernel.kind == "write":
        return emit_write.emit(kernel, layout, dims, present, target_kind, token_dtype, tile,
                               int(config["write_tiles"]), wide_tiles=wide, mma=mma)
    if kernel.kind == "read":
        return emit_read.emit(kernel, layout, dims, present, target_kind, token_dtype, tile,
                              wide_tiles=wide, mma=mma)
    return emit_scan.emit(kernel, layout, dims, present, int(config["chunk"]), target_kind,
                          token_dtype, bool(tile), wide_tiles=wide, mma=mma)


def scheduled_module(kernel: KernelPlan, layout: str, dims: dict[str, int],
                     present: frozenset, config: Config, target_kind: str = "llvm",
                     token_dtype: str = "float32") -> tuple[Graph, Any, str]:
    """(graph, scheduled IRModule with one function FUNC_NAME, schedule trace)."""
    import tvm
    from tvm import te

    from .schedule import schedule

    graph = _emit(kernel, layout, dims, present, config, target_kind, token_dtype)
    func = te.create_prim_func(graph.params()).with_attr("global_symbol", FUNC_NAME)
    if target_kind == "cuda" and int(config.get("min_blocks", 0)) > 0:
        func = func.with_attr(pipeline.MIN_BLOCKS_ATTR, int(config["min_blocks"]))
    sch = schedule(graph, func, config, target_kind)
    return graph, tvm.IRModule({FUNC_NAME: sch.mod["main"]}), str(sch.trace)


def cuda_source(kernel: KernelPlan, layout: str, dims: dict[str, int], present: frozenset,
                config: Config, arch: str = "sm_90", token_dtype: str = "float32") -> str:
    """Build ``kernel`` for {"kind": "cuda", "arch": arch} (no GPU needed) and return
    the generated CUDA source."""
    import tvm

    _, mod, _ = scheduled_module(kernel, layout, dims, present,
                                 space.validate(config, "cuda", kernel.kind), "cuda",
                                 token_dtype)
    lib = tvm.compile(mod, target=tvm.target.Target(target_dict("cuda", arch)),
                      tir_pipeline=pipeline.register())
    return lib_cuda_source(lib)


def lib_cuda_source(lib: Any) -> str:
    from .cubin import cuda_imports

    return "\n".join(m.inspect_source() for m in cuda_imports(getattr(lib, "mod", lib)))


class TVMExecutable(Executable):
    """One kernel plan built for one call specialization."""

    def __init__(self, kernel: KernelPlan, binding: Any, config: Config, target: str = "llvm",
                 arch: str = ""):
        if target not in TARGET_KINDS:
            raise OptionError(f"tvm backend: target={target!r} is not allowed; expected one of "
                              + ", ".join(map(repr, TARGET_KINDS)))
        if target == "cuda" and not arch:
            raise OptionError("tvm backend: target 'cuda' needs an arch here (no CUDA device to "
                              "take it from): target={'kind': 'cuda', 'arch': 'sm_90'}")
        check_supported(kernel, binding)
        token = binding.dtypes.get("T", "f32")
        if token not in TOKEN_DTYPES[target]:
            raise DTypeError(f"tvm backend: {token} tokens; target {target} computes with "
                             f"{'/'.join(TOKEN_DTYPES[target])} tokens (float32 accumulation): "
                             f"pass float32 arrays")
        self.kernel = kernel
        self.layout = binding.layout
        self.config = space.validate(config, target, kernel.kind)
        self.target = target
        self.arch = arch if target == "cuda" else ""
        self.token_dtype = NUMPY_NAMES[token]
        self.device = "cpu" if target == "llvm" else "cuda"
        self.dims = {d: int(binding.dims[d]) for d in ("D", "Dv", "K") if d in binding.dims}
        optional = {getattr(kernel.main, f, None) for f in ("key_mask", "initial_state")}
        self.present = frozenset(v for v in optional if v is not None and v in binding.present)
        # wide_tiles and mma are preferences: float32 tiles (bidirectional at D = Dv = K =
        # 256 on sm_90 needs 270,336 bytes with them, 207,360 without) and the token
        # pieces of mma where they fit the arch's shared memory per block, else without
        # (first wide_tiles, then mma): UnsupportedFeature from launch.check_shared_memory
        while True:
            try:
                self.built = self._build(token)
                break
            except UnsupportedFeature:
                knob = next((k for k in ("wide_tiles", "mma") if self.config[k]), None)
                if not (target == "cuda" and knob and self.token_dtype != "float32"):
                    raise
                log.info("tvm backend: %s: %s=1 exceeds the shared memory per block of %s; "
                         "built with %s=0", kernel.name, knob, self.arch, knob)
                self.config = self.config.replace(**{knob: 0})
        self.source = self.built.source

    def _build(self, token: str) -> Any:
        import tvm

        key = ("tvm", tvm.__version__, self.kernel.kind,
               tuple(print_op(op) for op in self.kernel.ops), self.kernel.inputs,
               self.kernel.outputs, self.layout, tuple(sorted(self.present)),
               tuple(sorted(self.dims.items())), tuple(sorted(self.config.items())),
               self.target, self.arch, self.token_dtype, TILED_ON_CPU)
        what = (f"the {self.kernel.kind} plan ("
                f"{', '.join(f'{d}={n}' for d, n in self.dims.items())}, {token} tokens, "
                f"config {dict(self.config)})")
        return launch.build(key, self._make, target_dict(self.target, self.arch), what)

    # -- code generation ---------------------------------------------------
    def _make(self) -> tuple:
        graph, mod, trace = scheduled_module(self.kernel, self.layout, self.dims, self.present,
                                             self.config, self.target, self.token_dtype)
        init = getattr(self.kernel.main, "initial_state", None)
        step = Step(tuple(_slot(p) for p in graph.inputs), tuple(_slot(p) for p in graph.outputs),
                    init if init in self.present else None)

        def source_of(built_mod: Any, lib: Any) -> str:
            return self._source(graph, trace, built_mod, lib)

        return mod, FUNC_NAME, step, source_of

    def _source(self, graph: Graph, trace: str, mod: Any, lib: Any) -> str:
        import tvm

        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        absent = [v for f in ("key_mask", "initial_state")
                  if (v := getattr(self.kernel.main, f, None)) is not None
                  and v not in self.present]
        lines = [f"# gmagen tvm backend: {self.kernel.name} (TE -> TensorIR, apache-tvm "
                 f"{tvm.__version__}, target {target_dict(self.target, self.arch)})",
                 *("# " + line for line in str(self.kernel).splitlines()),
                 f"# layout {self.layout}; {dims}; tokens {self.token_dtype}, accumulate in "
                 f"float32; "
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
        if self.target == "cuda":
            lines += ["// CUDA source generated by TVM (compiled to cubin with nvcc when the "
                      "function is first run or exported)", lib_cuda_source(lib)]
        return "\n".join(lines)

    # -- running -------------------------------------------------------------
    def run(self, env: dict[str, Any], binding: Any) -> dict[str, Any]:
        if binding.device[0] != self.device:
            from gmagen.errors import DeviceError

            raise DeviceError(f"tvm backend: target {self.target} runs on {self.device} "
                              f"arrays, got arrays on {binding.device[0]}")
        try:
            return run_step(self.built.fn, self.built.step, env, self.device)
        except ShapeMismatch as exc:
            raise ShapeError(f"tvm backend: {exc}") from None


def _slot(p: Param) -> Slot:
    return Slot(p.name, p.part, tuple(p.shape), p.dtype)
