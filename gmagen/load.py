"""``gmagen.load(path)``: run a kernel exported with ``kernel.export(path, ...)``
(backend "tvm") with TVM's runtime alone.

Needs ``tvm.runtime`` (the runtime-only package works: ``TVM_USE_RUNTIME_LIB=1``,
no ``libtvm_compiler``) and NumPy; for libraries built for cuda, torch and
TVM's CUDA runtime (``libtvm_runtime_cuda``, loaded here if TVM has not).
Nothing of gmagen's compiler (IR passes, emitters, TVM's ``te`` / ``s_tir``)
runs: the manifest says which library computes which specialization.

    run = gmagen.load("exported/")
    y, (S, n) = run(q, k, v, mean, log_var, logit, key_mask=mask, return_state=True)

CPU libraries take and return NumPy arrays (float32); cuda libraries take
torch CUDA tensors (tokens float32 / float16 / bfloat16) and return torch
tensors, y in the tokens' dtype, states in float32.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from gmagen.errors import DeviceError, DTypeError, FrameworkError, OptionError, ShapeError

MANIFEST = "gmagen_tvm.json"
FORMAT = "gmagen-tvm-export"
_TORCH_NAMES = {"torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16",
                "float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}


def load(path: str) -> "LoadedKernel":
    """The exported kernel under directory ``path`` as a callable."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise OptionError(f"gmagen.load: {manifest_path} does not exist; expected a directory "
                          f"written by kernel.export(path, ...)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != 1:
        raise OptionError(f"gmagen.load: {manifest_path} is not a gmagen tvm export of version 1 "
                          f"(format {manifest.get('format')!r}, version "
                          f"{manifest.get('version')!r})")
    return LoadedKernel(path, manifest)


class LoadedKernel:
    """``run(q, k, v, mean, log_var, logit, key_mask=None, initial_state=None,
    return_state=False, layout=None)``: arguments as for the compiled kernel."""

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.program = manifest["program"]
        self._modules: dict[str, Any] = {}

    def __repr__(self) -> str:
        specs = [f"{s['layout']}/{s['dtype']}/{s['device']}/{s['dims']}/{s['present']}"
                 for s in self.manifest["specializations"]]
        return f"LoadedKernel({self.program}, {self.path!r}, specializations={specs})"

    def _function(self, lib: str, func: str, device: str) -> Any:
        if lib not in self._modules:
            import tvm

            if device == "cuda":
                _ensure_cuda_runtime()
            self._modules[lib] = tvm.runtime.load_module(os.path.join(self.path, lib))
        return self._modules[lib][func]

    def __call__(self, *args: Any, return_state: bool = False, layout: Optional[str] = None,
                 **kwargs: Any) -> Any:
        from gmagen.backends.tvm.runtime import ShapeMismatch, Step, run_step

        m = self.manifest
        required = [i["name"] for i in m["inputs"] if not i["optional"]]
        if len(args) > len(required):
            raise FrameworkError(f"{self.program} takes {len(required)} positional arrays "
                                 f"({', '.join(required)}), got {len(args)}")
        env: dict[str, Any] = {i["name"]: None for i in m["inputs"]}
        env.update(zip(required, args))
        for key, value in kwargs.items():
            if key not in env:
                raise FrameworkError(f"unexpected argument {key!r}; {self.program} takes "
                                     + ", ".join(env))
            env[key] = value
        missing = [n for n in required if env[n] is None]
        if missing:
            raise FrameworkError(f"missing required argument(s) {missing}")
        layout = layout or m["layout"]
        present = sorted(i["name"] for i in m["inputs"] if i["optional"] and env[i["name"]]
                         is not None)
        token = next(i["name"] for i in m["inputs"] if i["role"] == "token")
        dtype = _TORCH_NAMES.get(str(env[token].dtype), str(env[token].dtype))
        device = "cuda" if _is_cuda(env[token]) else "cpu"
        spec = self._pick(layout, dtype, device, present, env)
        for step_data in spec["steps"]:
            step = Step.from_json(step_data)
            fn = self._function(step_data["lib"], step_data["func"], device)
            try:
                env.update(run_step(fn, step, env, device))
            except ShapeMismatch as exc:
                raise ShapeError(f"gmagen.load: {exc}") from None
        outs = []
        for out in m["outputs"]:
            value = env[out["name"]]
            if out["token"] and dtype != "f32":
                value = value.to(env[token].dtype) if device == "cuda" else value
            outs.append(value)
        result: Any = outs[0] if len(outs) == 1 else tuple(outs)
        if return_state:
            if m["state"] is None:
                raise FrameworkError(f"program {self.program} has no state to return")
            return result, env[m["state"]]
        return result

    def _pick(self, layout: str, dtype: str, device: str, present: list, env: dict) -> dict:
        from gmagen.backends.tvm.runtime import ShapeMismatch, Step, unify

        candidates = []
        for spec in self.manifest["specializations"]:
            if (spec["layout"], _TORCH_NAMES.get(spec["dtype"], spec["dtype"]), spec["device"],
                    sorted(spec["present"])) != (layout, dtype, device, present):
                continue
            candidates.append(spec)
            dims: dict[str, int] = {}
            try:
                for step_data in spec["steps"]:
                    for slot in Step.from_json(step_data).inputs:
                        value = env.get(slot.name)
                        if value is None:
                            continue  # computed by an earlier step
                        if slot.part:
                            value = value[0 if slot.part == "S" else 1]
                        unify(dims, slot, tuple(value.shape))
            except ShapeMismatch:
                continue
            return spec
        have = "; ".join(f"layout {s['layout']}, {s['dtype']} on {s['device']}, dims "
                         f"{s['dims']}, optional inputs {s['present']}"
                         for s in self.manifest["specializations"])
        error = ShapeError if candidates else (DeviceError if all(
            s["device"] != device for s in self.manifest["specializations"]) else DTypeError)
        raise error(f"gmagen.load: no exported specialization of {self.program} for layout "
                    f"{layout}, {dtype} tokens on {device}, optional inputs {present} and these "
                    f"shapes; {self.path} has: {have}; export it with kernel.export(path, spec)")


def _is_cuda(x: Any) -> bool:
    dev = getattr(x, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return int(dev()[0]) == 2
    except Exception:
        return False


def _ensure_cuda_runtime() -> None:
    """Register TVM's CUDA module loader: ``libtvm_runtime_cuda`` beside
    ``libtvm_runtime``, loaded with RTLD_GLOBAL when ``import tvm`` did not."""
    import ctypes

    import tvm
    import tvm_ffi

    name = "ffi.Module.load_from_bytes.cuda"
    if tvm_ffi.get_global_func(name, allow_missing=True) is not None:
        return
    libs = getattr(tvm.base, "_LOADED_LIBS", {})
    runtime = libs.get("tvm_runtime")
    folder = os.path.dirname(os.path.realpath(runtime._name)) if runtime is not None else ""
    path = os.path.join(folder, "libtvm_runtime_cuda.so")
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise DeviceError(f"gmagen.load: this library runs on CUDA, and TVM's CUDA runtime "
                          f"{path} does not load ({exc})") from exc
    if tvm_ffi.get_global_func(name, allow_missing=True) is None:
        raise DeviceError(f"gmagen.load: loaded {path}, but {name} is still not registered")
