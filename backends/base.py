"""The interface every backend implements (one small class per package)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from gmagen.config import Config
from gmagen.errors import OptionError
from gmagen.ir.passes.plan import KernelPlan


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class Executable(ABC):
    """One compiled kernel plan for one specialization."""

    source: str = ""
    config: Config = Config()

    @abstractmethod
    def run(self, env: dict[str, Any], binding: Any) -> dict[str, Any]:
        """Read the plan's inputs from ``env`` (native arrays, the call's layout
        and strides), return its outputs (memories as (S, n) pairs)."""


class Backend(ABC):
    """A code generator + runtime. ``native`` names the array framework its
    executables take ("numpy", "torch", ...); the Kernel converts through DLPack."""

    name: str = ""
    native: str = "numpy"
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = ("f16", "bf16", "f32", "f64")
    options: Mapping[str, tuple] = {}  # option name -> allowed values ((): any)

    @abstractmethod
    def availability(self) -> Availability:
        """Can this backend run here? If not, why (missing package, no device)."""

    @abstractmethod
    def lower(self, kernel: KernelPlan, binding: Any, config: Config,
              options: Mapping[str, Any]) -> Executable:
        """Generate and compile code for one kernel plan and specialization."""

    def default_config(self, kernel: KernelPlan, binding: Any) -> Config:
        return Config()

    # -- autotuning (gmagen.autotune) ---------------------------------------
    def tuning_device(self, binding: Any) -> Optional[dict[str, Any]]:
        """What a tuned config depends on besides the problem: {"gpu", "capability",
        "sm_count", "backend_version"} of the device ``binding`` runs on, or None
        when configs are not tuned there (the CPU, an interpreter)."""
        return None

    # A backend that can tune also defines
    #   tune(program, plan, kernel, binding, options) -> gmagen.autotune.TuneResult
    # (used by autotune="on-miss" and gmagen.tune); without it on-miss raises.

    def validate_config(self, kernel: KernelPlan, config: Config) -> Config:
        """``config`` if this backend accepts it for ``kernel``, else raise naming
        the knob (a cached config from an older version is then ignored)."""
        return config

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in options.items():
            if key not in self.options:
                valid = ", ".join(sorted(self.options)) or "none"
                raise OptionError(f"backend {self.name!r} has no option {key!r}; valid options: {valid}")
            allowed = self.options[key]
            if allowed and value not in allowed:
                raise OptionError(f"backend {self.name!r}: {key}={value!r} is not allowed; "
                                  f"expected one of {', '.join(map(repr, allowed))}")
            out[key] = value
        return out

    def describe(self) -> str:
        return f"{self.name}: devices {', '.join(self.devices)}; dtypes {', '.join(self.dtypes)}"
