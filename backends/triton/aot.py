"""Compile a generated Triton kernel for an NVIDIA architecture without a GPU.

``triton.compile`` accepts a ``GPUTarget``; with it the whole pipeline down to a
cubin runs on a machine without a driver.  That lets CI catch what only a GPU
run used to show (shared memory over the hardware limit, register spills) and
lets configs be pruned before a GPU is ever asked.  Resource usage comes from
the cubin through the ``cuobjdump`` that ships with Triton.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

# Shared memory per block (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_TYPES = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel needs per block / thread."""
    name: str
    arch: int
    shared: int        # bytes of shared memory per block
    registers: int     # per thread
    stack: int         # bytes of stack frame per thread (spills land here)
    local: int         # bytes of local memory per thread

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_LIMIT.get(self.arch, SHARED_LIMIT[80])

    def describe(self) -> str:
        return (f"{self.name} sm_{self.arch}: shared {self.shared} B, {self.registers} regs, "
                f"stack {self.stack} B, local {self.local} B")


def signature(fn: Any, token_dtype: str, overrides: Optional[dict[str, str]] = None) -> dict:
    """Triton signature of a generated kernel: token pointers (``q_ptr`` ... ``dv_ptr``)
    carry the token dtype, other pointers float32, the mask int8, scalars int64."""
    tokens = {f"{t}_ptr" for t in ("q", "k", "v", "x", "y", "dy", "dq", "dk", "dv", "r")}
    sig: dict[str, str] = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name == "mask_ptr":
            sig[p.name] = "*i8"
        elif p.name in tokens:
            sig[p.name] = "*" + _TYPES[token_dtype]
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp32"
        else:
            sig[p.name] = "i64"
    sig.update(overrides or {})
    return sig


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one function in ``cubin`` (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def compile_for(fn: Any, arch: int, *, token_dtype: str, constexprs: dict[str, Any],
                num_warps: int, num_stages: int) -> Resources:
    """Compile JITFunction ``fn`` for ``sm_{arch}`` and report its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):  # loaded under TRITON_INTERPRET: the same Python def
        fn = JITFunction(fn.fn)
    sig = signature(fn, token_dtype)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    usage = resource_usage(kernel.asm["cubin"])
    # Triton's shared memory is dynamic: the metadata has it, the cubin only the static part
    return Resources(fn.__name__, arch, int(kernel.metadata.shared) + usage.get("SHARED", 0),
                     usage.get("REG", 0), usage.get("STACK", 0), usage.get("LOCAL", 0))


def backward_resources(D: int, causal: bool, arch: int, dtype: str = "bf16",
                       config: Optional[dict] = None) -> list[Resources]:
    """Each backward kernel of one specialization (mask on, row norm) at the default
    config (or ``config``), compiled for ``sm_{arch}``.  Run it in a process without
    TRITON_INTERPRET: the interpreter patches triton.language for the whole process."""
    import warnings

    from . import backward, launch
    from .prelude import Shape
    from .variant import Variant

    cfg = {**backward.default_config(D, D, D, causal), **(config or {})}
    variant = Variant("backward", Shape(D, D, D, D, D, D), dtype, norm="row", eps=1e-6, mask=True)
    out = []
    for kind in (("scan_chunks", "scan_q", "scan_k") if causal else ("read", "write")):
        emit, name = backward._EMITTERS[kind]
        fn = getattr(launch.load(emit(variant, cfg), False), name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Triton 3.9's FP-fusion default notice
            params = inspect.signature(fn.fn).parameters  # JIT or interpreted: the Python def
            consts = {"BLOCK_N": cfg["block_n"]}
            if "GROUP" in params:
                consts["GROUP"] = cfg.get("group", 1)
            out.append(compile_for(fn, arch, token_dtype=dtype, constexprs=consts,
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return out


def main() -> None:
    """python -m gmagen.backends.triton.aot D causal arch [json-config]: one JSON line
    per kernel."""
    import json
    import sys

    D, causal, arch = int(sys.argv[1]), sys.argv[2] == "causal", int(sys.argv[3])
    config = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    for r in backward_resources(D, causal, arch, config=config):
        print(json.dumps({**r.__dict__, "fits": r.fits}))


if __name__ == "__main__":
    main()
