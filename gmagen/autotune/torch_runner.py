"""A Runner (gmagen.autotune's protocol) for backends whose executables run on
torch tensors on a CUDA device (Triton; CuPy with torch installed): one kernel
plan and specialization.

The runner owns its inputs: random tensors of the specialization's shapes and
dtypes on the device, several sets rotated so that timed launches do not find
their inputs in L2 (METHOD.md); the plans before the tuned one run once with
their default configs to produce its inputs (e.g. the memory a read consumes).
Nothing the caller passed is read or written.  Every candidate's outputs are
compared with the default config's before it may be timed.  On CUDA a sample
is one launch between CUDA events; on the CPU (Triton's interpreter, tests) it
is wall time.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

from gmagen.config import Config
from gmagen.ir.types import MemoryType

from .space import DeviceLimits

L2_BYTES = 50 * 2**20          # H100; rotating past it is what matters
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 2e-2}  # vs the default config's output


def device_limits(index: int) -> DeviceLimits:
    import torch

    p = torch.cuda.get_device_properties(index)
    shared = getattr(p, "shared_memory_per_block_optin", 0) or 227 * 1024
    return DeviceLimits(name=p.name, capability=(p.major, p.minor),
                        sm_count=p.multi_processor_count, shared_memory_per_block=int(shared))


def _random_inputs(program: Any, binding: Any, device: Any, gen: Any) -> dict[str, Any]:
    """Program inputs of the binding's shapes, dtypes and layout (torch)."""
    import torch

    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
          "f64": torch.float64}
    dims = binding.dims
    env: dict[str, Any] = {}
    for inp in program.inputs:
        if inp.optional and inp.name not in binding.present:
            env[inp.name] = None
            continue
        t = inp.type
        if isinstance(t, MemoryType):
            shape = [dims[d] if isinstance(d, str) else d for d in t.shape]
            dtype = dt[binding.dtypes.get("acc", "f32")]
            s = torch.randn(shape, generator=gen, device=device).to(dtype)
            env[inp.name] = (s, torch.rand(shape[:-1], generator=gen, device=device).to(dtype))
            continue
        shape = [dims[d] if isinstance(d, str) else d for d in t.shape]
        if t.dtype == "bool":
            env[inp.name] = torch.rand(shape, generator=gen, device=device) > 0.2
            continue
        dtype = dt[binding.input_dtypes.get(inp.name, binding.dtypes.get(t.dtype, "f32"))]
        x = torch.randn(shape, generator=gen, device=device)
        if inp.role == "token" and binding.layout == "bhnd":
            x = x.transpose(1, 2).contiguous()  # logical [B, N, H, X] stored as [B, H, N, X]
        if inp.name == "log_var":
            x = 0.1 * x
        env[inp.name] = x.to(dtype)
    return env


def _flat(value: Any) -> list:
    return list(value) if isinstance(value, tuple) else [value]


class TorchRunner:
    """gmagen.autotune's Runner for one kernel plan and specialization of
    ``backend`` (its ``lower``, ``default_config`` and executables' ``run``)."""

    def __init__(self, backend: Any, program: Any, plan: Any, kernel: Any, binding: Any,
                 options: Any, limits: Optional[DeviceLimits] = None) -> None:
        import torch

        self.backend, self.kernel, self.binding, self.options = backend, kernel, binding, options
        self.cuda = binding.device[0] == "cuda"
        self.device = torch.device(f"cuda:{binding.device[1]}" if self.cuda else "cpu")
        self.limits = limits or (device_limits(binding.device[1]) if self.cuda
                                 else DeviceLimits.fake(name="interpreter"))
        self.default = backend.default_config(kernel, binding)
        gen = torch.Generator(device=self.device).manual_seed(0)
        first = _random_inputs(program, binding, self.device, gen)
        per_set = sum(x.numel() * x.element_size() for v in first.values() if v is not None
                      for x in _flat(v))
        n_sets = 1 if not self.cuda else max(1, min(4, math.ceil(2 * L2_BYTES / max(per_set, 1))))
        self.sets = [first] + [_random_inputs(program, binding, self.device, gen)
                               for _ in range(n_sets - 1)]
        # the plans before this one, once, with their defaults: this plan's inputs
        for env in self.sets:
            for kp in plan.kernels:
                if kp is kernel:
                    break
                exe = backend.lower(kp, binding, backend.default_config(kp, binding), options)
                env.update(exe.run(env, binding))
        self._turn = 0

    def compile(self, config: Config) -> Any:
        full = self.default.replace(**dict(config))
        return self.backend.lower(self.kernel, self.binding, full, self.options)

    def run(self, exe: Any) -> dict[str, Any]:
        out = exe.run(dict(self.sets[0]), self.binding)
        return {k: tuple(x.clone() for x in _flat(v)) for k, v in out.items()}

    def check(self, output: dict[str, Any], reference: dict[str, Any]) -> Optional[str]:
        tol = TOLERANCE[self.binding.dtypes.get("T", "f32")]
        for name, ref in reference.items():
            for i, (a, b) in enumerate(zip(output[name], ref)):
                a, b = a.double(), b.double()
                if not bool(a.isfinite().all()):
                    return f"{name}[{i}] has non-finite values"
                err = float((a - b).norm() / b.norm().clamp_min(1e-30))
                if err > tol:
                    return f"{name}[{i}] differs from the default config's: {err:.2e} > {tol:.0e}"
        return None

    def sample(self, exe: Any) -> float:
        import torch

        env = dict(self.sets[self._turn % len(self.sets)])
        self._turn += 1
        if not self.cuda:
            t0 = time.perf_counter()
            exe.run(env, self.binding)
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        exe.run(env, self.binding)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def now(self) -> float:
        return time.monotonic()


def tune_plan(backend: Any, tuning_space: Any, program: Any, plan: Any, kernel: Any,
              binding: Any, options: Any, strategy: str = "auto",
              tune_options: Optional[Any] = None, space: Any = None) -> Any:
    """``Backend.tune`` of a torch-native backend: gmagen.autotune's loop over a
    TorchRunner, in ``space`` or ``tuning_space(kind, default, D, Dv, K, dtype)``."""
    from gmagen import autotune

    runner = TorchRunner(backend, program, plan, kernel, binding, options)
    if space is None:
        dims = binding.dims
        K = dims.get("K", 64)
        space = tuning_space(kernel.kind, runner.default, dims.get("D", 64), dims.get("Dv", K),
                             K, binding.dtypes.get("T", "f32"))
    return autotune.tune(space, runner, strategy, tune_options)
