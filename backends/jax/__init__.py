"""JAX backend: the IR's ops in jax.numpy / lax, jitted per specialization
(``gmagen.compile(p, "jax")``).

Takes JAX arrays on any JAX device (CPU, CUDA) and returns JAX arrays there.
``ops.py`` holds one pure function per op (jit, grad and vmap work on them);
``lower.py`` runs a kernel plan's ops as one jitted function.  JAX is imported
only by ``availability`` and ``lower``, never when this package is imported.
"""

from __future__ import annotations

from typing import Any, Mapping

from gmagen.config import Config
from gmagen.errors import OptionError
from gmagen.ir.passes.plan import KernelPlan

from ..base import Availability, Backend, Executable

KNOBS = ("chunk",)  # the config knobs of every kernel plan kind
DEFAULT_CHUNK = 64  # tokens per lax.scan step (the C x C product of causal_scan)


def validate_config(config: Config) -> Config:
    """Unknown knobs or a bad chunk raise OptionError naming the knob."""
    for key in config:
        if key not in KNOBS:
            raise OptionError(f"backend 'jax' has no config knob {key!r}; valid knobs: "
                              + ", ".join(KNOBS))
    chunk = config.get("chunk", DEFAULT_CHUNK)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise OptionError(f"backend 'jax': config knob chunk={chunk!r} is not allowed; expected "
                          f"an int >= 1 (tokens per lax.scan step, default {DEFAULT_CHUNK})")
    return config


class JaxBackend(Backend):
    name = "jax"
    native = "jax"
    devices = ("cpu", "cuda")  # DLPack device names of JAX's CPU and CUDA arrays
    dtypes = ("f16", "bf16", "f32", "f64")

    def availability(self) -> Availability:
        try:
            import jax  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"jax is not installed (pip install 'gmagen[jax]'): {exc}")
        return Availability(True)

    def default_config(self, kernel: KernelPlan, binding: Any) -> Config:
        return Config(chunk=DEFAULT_CHUNK)

    def lower(self, kernel: KernelPlan, binding: Any, config: Config,
              options: Mapping[str, Any]) -> Executable:
        from .lower import JaxExecutable

        full = validate_config(self.default_config(kernel, binding).replace(**dict(config)))
        return JaxExecutable(kernel, binding, full)

    def describe(self) -> str:
        return ("jax: jax.numpy/lax on any JAX device (f16/bf16/f32; f64 with x64); every "
                "variant, key mask, state, varlen (cu_seqlens), both layouts; chunked lax.scan")


BACKEND = JaxBackend()
