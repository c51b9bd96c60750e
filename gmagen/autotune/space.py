"""Search spaces as data: typed knobs, validity rules, pruning by device limits.

Why data and not code: a strategy only needs to draw, enumerate and step to a
neighbour, and the cache and CLI need to print and fingerprint a space; a knob
that knows its own values (power of two, choice, integer range) serves all of
them.  Validity rules are functions of (config, device limits) so that pruning
happens before anything is compiled (Triton's ``early_config_prune``), and a
space that prunes to nothing raises naming the rules and knobs that emptied it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Optional, Union

from gmagen.config import Config, Scalar
from gmagen.errors import OptionError

__all__ = ["Choice", "DeviceLimits", "EmptySpaceError", "IntRange", "Knob", "PowerOfTwo",
           "PrunedSpace", "Rule", "Space"]

ENUMERATE_MAX = 4096   # spaces up to this many configs are listed in full when pruned
PRUNE_SAMPLES = 2000   # larger spaces: random draws checked before giving up


class EmptySpaceError(OptionError):
    """Every config of a space breaks a validity rule on this device."""


# -- device limits ----------------------------------------------------------------

@dataclass(frozen=True)
class DeviceLimits:
    """What a validity rule may ask about the GPU (CUDA device attributes)."""

    name: str
    capability: tuple[int, int]
    sm_count: int
    shared_memory_per_block: int      # bytes, the opt-in maximum
    registers_per_sm: int = 65536
    registers_per_thread: int = 255
    max_threads_per_block: int = 1024
    warp_size: int = 32

    @classmethod
    def fake(cls, **overrides: object) -> "DeviceLimits":
        """H100-SXM-like limits for tests; any field may be overridden."""
        base = cls(name="Fake H100", capability=(9, 0), sm_count=132,
                   shared_memory_per_block=227 * 1024)
        return replace(base, **overrides)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "capability": f"{self.capability[0]}.{self.capability[1]}",
                "sm_count": self.sm_count}


# -- knobs ------------------------------------------------------------------------

@dataclass(frozen=True)
class PowerOfTwo:
    """Powers of two lo, 2 lo, ..., hi; neighbours are half and double."""

    lo: int
    hi: int
    default: int

    def __post_init__(self) -> None:
        for name in ("lo", "hi"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise OptionError(f"PowerOfTwo {name}={v!r}: expected a power of two >= 1")
        if self.lo > self.hi:
            raise OptionError(f"PowerOfTwo lo={self.lo} > hi={self.hi}")
        if not self.contains(self.default):
            raise OptionError(f"PowerOfTwo default={self.default!r} not in {self.values()}")

    def values(self) -> tuple[int, ...]:
        out, v = [], self.lo
        while v <= self.hi:
            out.append(v)
            v *= 2
        return tuple(out)

    def contains(self, value: object) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                and self.lo <= value <= self.hi and value & (value - 1) == 0)

    def draw(self, rng: random.Random) -> int:
        return rng.choice(self.values())

    def neighbours(self, value: Scalar) -> tuple[int, ...]:
        return tuple(v for v in (int(value) // 2, int(value) * 2) if self.contains(v))


@dataclass(frozen=True)
class Choice:
    """One of ``values``; ordered choices step to the adjacent values, unordered
    ones (``ordered=False``, e.g. names) to every other value."""

    values_: tuple[Scalar, ...]
    default: Scalar
    ordered: bool = True

    def __init__(self, values: Sequence[Scalar], default: Optional[Scalar] = None,
                 ordered: bool = True) -> None:
        values = tuple(values)
        if not values or len(set(values)) != len(values):
            raise OptionError(f"Choice values {values!r}: expected distinct values, at least one")
        default = values[0] if default is None else default
        if default not in values:
            raise OptionError(f"Choice default={default!r} not in {values!r}")
        object.__setattr__(self, "values_", values)
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "ordered", ordered)

    def values(self) -> tuple[Scalar, ...]:
        return self.values_

    def contains(self, value: object) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values_)

    def draw(self, rng: random.Random) -> Scalar:
        return rng.choice(self.values_)

    def neighbours(self, value: Scalar) -> tuple[Scalar, ...]:
        if not self.contains(value):
            return ()
        i = self.values_.index(value)
        if not self.ordered:
            return self.values_[:i] + self.values_[i + 1:]
        return tuple(self.values_[j] for j in (i - 1, i + 1) if 0 <= j < len(self.values_))


@dataclass(frozen=True)
class IntRange:
    """lo, lo + step, ..., up to hi (inclusive); neighbours are one step away."""

    lo: int
    hi: int
    default: int
    step: int = 1

    def __post_init__(self) -> None:
        if self.step < 1 or self.lo > self.hi:
            raise OptionError(f"IntRange({self.lo}, {self.hi}, step={self.step}) is empty")
        if not self.contains(self.default):
            raise OptionError(f"IntRange default={self.default!r} not in "
                              f"[{self.lo}, {self.hi}] step {self.step}")

    def values(self) -> tuple[int, ...]:
        return tuple(range(self.lo, self.hi + 1, self.step))

    def contains(self, value: object) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                and self.lo <= value <= self.hi and (value - self.lo) % self.step == 0)

    def draw(self, rng: random.Random) -> int:
        return rng.randrange(self.lo, self.hi + 1, self.step)

    def neighbours(self, value: Scalar) -> tuple[int, ...]:
        return tuple(v for v in (int(value) - self.step, int(value) + self.step)
                     if self.contains(v))


Knob = Union[PowerOfTwo, Choice, IntRange]


# -- rules and spaces ---------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """A validity rule: ``check(config, limits)`` is True for a valid config.
    ``knobs`` names what it reads (shown when a space prunes to nothing)."""

    why: str
    knobs: tuple[str, ...]
    check: Callable[[Config, DeviceLimits], bool] = field(compare=False)


@dataclass(frozen=True)
class Space:
    """Named knobs (in search order) plus validity rules."""

    knobs: Mapping[str, Knob]
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "knobs", dict(self.knobs))
        object.__setattr__(self, "rules", tuple(self.rules))
        for rule in self.rules:
            unknown = [k for k in rule.knobs if k not in self.knobs]
            if unknown:
                raise OptionError(f"rule {rule.why!r} reads unknown knobs {unknown}; "
                                  f"knobs: {', '.join(self.knobs)}")

    def default(self) -> Config:
        return Config({name: knob.default for name, knob in self.knobs.items()})

    def size(self) -> int:
        n = 1
        for knob in self.knobs.values():
            n *= len(knob.values())
        return n

    def contains(self, config: Mapping[str, Scalar]) -> bool:
        """Every knob present with an allowed value (rules not checked)."""
        return set(config) == set(self.knobs) and all(
            knob.contains(config[name]) for name, knob in self.knobs.items())

    def broken_rules(self, config: Config, limits: DeviceLimits) -> list[Rule]:
        return [rule for rule in self.rules if not rule.check(config, limits)]

    def is_valid(self, config: Config, limits: DeviceLimits) -> bool:
        return self.contains(config) and not self.broken_rules(config, limits)

    def enumerate(self) -> Iterator[Config]:
        names = list(self.knobs)
        for values in itertools.product(*(self.knobs[n].values() for n in names)):
            yield Config(dict(zip(names, values)))

    def draw(self, rng: random.Random) -> Config:
        return Config({name: knob.draw(rng) for name, knob in self.knobs.items()})

    def neighbours(self, config: Config) -> list[Config]:
        """Configs differing from ``config`` in one knob by one step."""
        return [config.replace(**{name: v})
                for name, knob in self.knobs.items() if name in config
                for v in knob.neighbours(config[name])]

    def fingerprint(self) -> str:
        """Stable hash of knob names and values (not of the rule functions)."""
        text = json.dumps({n: [type(k).__name__, list(k.values()), k.default]
                           for n, k in self.knobs.items()}, sort_keys=True)
        text += "|" + "|".join(r.why for r in self.rules)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def prune(self, limits: DeviceLimits, *, enumerate_max: int = ENUMERATE_MAX,
              samples: int = PRUNE_SAMPLES, seed: int = 0) -> "PrunedSpace":
        """Drop configs the device cannot run; raise if none is left.

        Spaces of at most ``enumerate_max`` configs are listed in full; larger
        ones are checked on ``samples`` random draws and stay lazy."""
        if self.size() <= enumerate_max:
            candidates: list[Config] = list(self.enumerate())
        else:
            rng = random.Random(seed)
            candidates = [self.default()] + [self.draw(rng) for _ in range(samples)]
        broken: dict[Rule, int] = {}
        valid = []
        for config in candidates:
            rules = self.broken_rules(config, limits)
            for rule in rules:
                broken[rule] = broken.get(rule, 0) + 1
            if not rules:
                valid.append(config)
        if not valid:
            raise EmptySpaceError(self._empty_message(limits, len(candidates), broken,
                                                      exhaustive=self.size() <= enumerate_max))
        if self.size() <= enumerate_max:
            return PrunedSpace(self, limits, tuple(valid))
        return PrunedSpace(self, limits, None)

    def _empty_message(self, limits: DeviceLimits, n: int, broken: dict[Rule, int],
                       exhaustive: bool) -> str:
        what = f"all {n} configs" if exhaustive else f"{n} random configs (space of {self.size()})"
        lines = [f"no valid config on {limits.name} (sm_{limits.capability[0]}"
                 f"{limits.capability[1]}): {what} break a validity rule"]
        for rule, count in sorted(broken.items(), key=lambda item: -item[1]):
            lines.append(f"  {rule.why} [knobs {', '.join(rule.knobs)}]: rejects {count} of {n}")
        knobs = sorted({k for rule in broken for k in rule.knobs})
        lines.append(f"try widening knobs {', '.join(knobs)} or a smaller problem (D, Dv, K)")
        return "\n".join(lines)


@dataclass(frozen=True)
class PrunedSpace:
    """A space restricted to configs valid on one device.

    ``configs`` lists them when the space was small enough to enumerate; else
    it is None and draws are rejection-sampled against the rules."""

    space: Space
    limits: DeviceLimits
    configs: Optional[tuple[Config, ...]]

    @property
    def enumerated(self) -> bool:
        return self.configs is not None

    def size(self) -> Optional[int]:
        """Number of valid configs, or None when not enumerated."""
        return None if self.configs is None else len(self.configs)

    def __iter__(self) -> Iterator[Config]:
        if self.configs is None:
            raise OptionError(f"space of {self.space.size()} configs is too large to enumerate")
        return iter(self.configs)

    def contains(self, config: Config) -> bool:
        return self.space.is_valid(config, self.limits)

    def default(self) -> Config:
        default = self.space.default()
        if self.contains(default):
            return default
        return next(iter(self.configs)) if self.configs else self.draw(random.Random(0))

    def draw(self, rng: random.Random, tries: int = 10000) -> Config:
        if self.configs is not None:
            return rng.choice(self.configs)
        for _ in range(tries):
            config = self.space.draw(rng)
            if self.contains(config):
                return config
        raise EmptySpaceError(f"no valid config in {tries} random draws from a space of "
                              f"{self.space.size()}")

    def neighbours(self, config: Config) -> list[Config]:
        return [c for c in self.space.neighbours(config) if self.contains(c)]
