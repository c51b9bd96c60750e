"""The TIR pipeline of the cuda builds: TVM's default (s_tir) pipeline, then the
config's ``min_blocks`` as each kernel's ``__launch_bounds__(threads, min_blocks)``.

Why: nvcc sizes a kernel's registers from ``__launch_bounds__(threads)`` alone, and
gave the write kernel 124 registers at the benchmark shape (272 threads: one block
per SM, 9 warps), where its shared memory allows three blocks per SM.  With a
minimum of blocks per SM it caps the registers to fit them (72 at 3 blocks, no
spills).  TVM 0.27 prints the second bound from the device function's attribute
``tirx.launch_bounds_min_blocks_per_sm``; SplitHostDevice sets it only from an
AttrStmt in the kernel body, which no s_tir schedule primitive writes, so this
pipeline sets the attribute on the device functions it split off.  The value
travels on the PrimFunc as ``MIN_BLOCKS_ATTR`` (``lower.scheduled_module``).
"""

from __future__ import annotations

from typing import Any

NAME = "gmagen_cuda"
MIN_BLOCKS_ATTR = "gmagen.min_blocks_per_sm"
_TVM_ATTR = "tirx.launch_bounds_min_blocks_per_sm"


def _attr(func: Any, key: str) -> Any:
    return func.attrs[key] if func.attrs is not None and key in func.attrs else None


def _factory() -> tuple:
    import tvm
    from tvm import tirx

    base, finalize_host, finalize_device = tirx.get_tir_pipeline("default")

    @tvm.transform.module_pass(opt_level=0, name="gmagen.CudaPipeline")
    def pipeline(mod: Any, _ctx: Any) -> Any:
        blocks = [int(v) for f in mod.functions.values()
                  if isinstance(f, tirx.PrimFunc) and (v := _attr(f, MIN_BLOCKS_ATTR))]
        mod = base(mod)
        if blocks and max(blocks) > 0:
            for gv, func in list(mod.functions.items()):
                if isinstance(func, tirx.PrimFunc) and _attr(func, "tirx.is_global_func"):
                    mod[gv] = func.with_attr(_TVM_ATTR, max(blocks))
        return mod

    return pipeline, finalize_host, finalize_device


def register() -> str:
    """Register the pipeline with TVM (once per process); returns its name, the
    ``tir_pipeline`` argument of ``tvm.compile``."""
    from tvm import tirx
    from tvm.tirx import compilation_pipeline

    if NAME not in compilation_pipeline.PIPELINE_MAP:
        tirx.register_tir_pipeline(NAME, _factory)
    return NAME
