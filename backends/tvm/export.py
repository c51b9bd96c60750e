"""``kernel.export(path, *specs)``: ahead-of-time libraries of a tvm kernel that
``gmagen.load(path)`` runs with TVM's runtime alone (the way TVM deploys).

``path`` becomes a directory holding one shared library per kernel plan and
specialization (``s<i>_<plan>.so``: host code, and for target cuda the kernels
as cubin for the target's arch, never CUDA source) and ``gmagen_tvm.json``, the
manifest: the program's inputs and outputs, and per specialization its layout,
token dtype, D / Dv / K, optional inputs present and the steps (library,
function, parameters) that compute it.  B, N and H stay free.

Specializations: each ``spec`` is a mapping ``{"D": 64, "Dv": 64, "K": 32,
"layout": "bnhd", "dtype": "f32", "key_mask": False, "initial_state": False}``
(D, Dv, K required except Dv for the responsibility program; the rest
default to the program's layout, float32 and absent).  Without specs, every
specialization the kernel has run so far is exported.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from gmagen.errors import OptionError
from gmagen.ir.types import MemoryType, TensorType

MANIFEST = "gmagen_tvm.json"
FORMAT = "gmagen-tvm-export"
VERSION = 1
SPEC_KEYS = ("D", "Dv", "K", "layout", "dtype", "key_mask", "initial_state")


def export(kernel: Any, path: str, *specs: Mapping[str, Any]) -> str:
    """Write the libraries and manifest of ``kernel`` under directory ``path``;
    returns ``path``."""
    import tvm

    if kernel.backend != "tvm":
        raise OptionError(f"export: kernel of backend {kernel.backend!r}; only backend 'tvm' "
                          f"exports libraries")
    if specs:
        groups = [kernel._lower(_binding(kernel, spec)) for spec in specs]
    else:
        groups = list(kernel._compiled.values())
        if not groups:
            raise OptionError("export: the kernel has not run yet, so there is nothing built to "
                              "export; pass specializations, e.g. kernel.export(path, "
                              "{'D': 64, 'Dv': 64, 'K': 32})")
    os.makedirs(path, exist_ok=True)
    program = kernel.program
    types = kernel._types
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "tvm": tvm.__version__,
        "program": program.name, "layout": program.layout, "state": program.state,
        "inputs": [{"name": i.name, "optional": bool(i.optional), "role": i.role,
                    "memory": isinstance(i.type, MemoryType)} for i in program.inputs],
        "outputs": [{"name": o, "memory": isinstance(types[o], MemoryType),
                     "token": isinstance(types[o], TensorType) and types[o].dtype == "T"}
                    for o in program.outputs],
        "specializations": [],
    }
    if program.state is not None and program.state not in program.outputs:
        manifest["state_memory"] = isinstance(types[program.state], MemoryType)
    for index, exes in enumerate(groups):
        first = exes[0]
        steps = []
        for exe in exes:
            name = f"s{index}_{exe.kernel.name}.so"
            exe.built.export(os.path.join(path, name))
            steps.append({"lib": name, "func": exe.built.name, "plan": exe.kernel.name,
                          **exe.built.step.to_json()})
        present = sorted(set().union(*(exe.present for exe in exes)))
        manifest["specializations"].append({
            "layout": first.layout, "dtype": first.token_dtype, "dims": first.dims,
            "present": present, "device": first.device,
            "target": {"kind": first.target, **({"arch": first.arch} if first.arch else {})},
            "config": {exe.kernel.name: dict(exe.config) for exe in exes},
            "steps": steps})
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(path, MANIFEST))
    return path


def _binding(kernel: Any, spec: Mapping[str, Any]) -> Any:
    """A call binding for ``spec`` (no arrays: B = N = H = 1 stand-ins; they stay
    symbolic in the built functions)."""
    from gmagen.adapters.checks import Binding

    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise OptionError(f"export: unknown spec key(s) {unknown}; valid keys: "
                          f"{', '.join(SPEC_KEYS)}")
    program = kernel.program
    dims = {"B": 1, "N": 1, "H": 1, "S": 1}
    for d in ("D", "Dv", "K"):
        if d in spec:
            value = spec[d]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"export: spec {d}={value!r}, expected a positive int")
            dims[d] = value
    need = {"D", "K"} | ({"Dv"} if any(i.name == "v" for i in program.inputs) else set())
    missing = sorted(need - set(dims))
    if missing:
        raise OptionError(f"export: spec {dict(spec)} lacks {missing} (program {program.name})")
    dtype = spec.get("dtype", "f32")
    present = set()
    for inp in program.inputs:
        if inp.role == "mask" and spec.get("key_mask"):
            present.add(inp.name)
        if isinstance(inp.type, MemoryType) and inp.optional and spec.get("initial_state"):
            present.add(inp.name)
        if not inp.optional:
            present.add(inp.name)
    device = kernel._backend.devices[-1]
    cuda = kernel.options.get("target") == "cuda"
    framework = "torch" if cuda else "numpy"
    return Binding(framework, ("cuda" if cuda else device, 0), spec.get("layout", program.layout),
                   dims, {"T": dtype, "P": "f32", "acc": "f32"},
                   {i.name: "f32" for i in program.inputs}, frozenset(present), ())
