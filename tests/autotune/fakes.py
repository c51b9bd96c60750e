"""A fake GPU for the search tests: a synthetic timing landscape with seeded
noise, a clock that advances by what compiling and timing would cost, and
configs that fail to compile or give wrong output on demand."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from typing import Optional

from gmagen.autotune import Choice, DeviceLimits, IntRange, PowerOfTwo, Rule, Space
from gmagen.config import Config


class OutOfResources(RuntimeError):
    """Named like Triton's, so the Session classifies it."""


def tile_space(block_d: bool = False) -> Space:
    knobs = {"block_n": PowerOfTwo(16, 256, 64), "num_warps": Choice((2, 4, 8), 4),
             "num_stages": IntRange(1, 4, 2)}
    if block_d:
        knobs["block_d"] = PowerOfTwo(16, 128, 32)
    rules = (Rule("shared memory: 2 B * block_n * 64 * num_stages <= per-block limit",
                  ("block_n", "num_stages"),
                  lambda c, lim: 2 * c["block_n"] * 64 * c["num_stages"]
                  <= lim.shared_memory_per_block),)
    return Space(knobs, rules)


def bowl(config: Config) -> float:
    """Unique minimum 1.0 ms at block_n 128, 8 warps, 3 stages (block_d 64)."""
    t = (1.0 + 0.3 * (math.log2(config["block_n"]) - 7) ** 2
         + 0.2 * abs(math.log2(config["num_warps"]) - 3) + 0.15 * abs(config["num_stages"] - 3))
    if "block_d" in config:
        t += 0.1 * abs(math.log2(config["block_d"]) - 6)
    return t


BOWL_BEST = Config(block_n=128, num_warps=8, num_stages=3)


class FakeRunner:
    def __init__(self, landscape: Callable[[Config], float] = bowl, *,
                 default: Optional[Config] = None, noise: float = 0.01, seed: int = 0,
                 wrong: Iterable[Config] = (), fail: Iterable[Config] = (),
                 compile_s: float = 0.2, limits: Optional[DeviceLimits] = None):
        self.landscape = landscape
        self.default = default or Config(block_n=64, num_warps=4, num_stages=2)
        self.limits = limits or DeviceLimits.fake()
        self.noise, self.rng = noise, random.Random(seed)
        self.wrong, self.fail = set(wrong), set(fail)
        self.compile_s = compile_s
        self.clock = 0.0
        self.compiled: list[Config] = []
        self.samples = 0

    def now(self) -> float:
        return self.clock

    def compile(self, config: Config) -> Config:
        self.clock += self.compile_s
        self.compiled.append(config)
        if config in self.fail:
            raise OutOfResources("shared memory: required 300000, hardware limit 232448")
        return config

    def run(self, handle: Config) -> str:
        self.clock += self.landscape(handle) / 1000
        return "wrong" if handle in self.wrong else "right"

    def check(self, output: str, reference: str) -> Optional[str]:
        return None if output == reference else "relative error 0.7 > 2e-2"

    def sample(self, handle: Config) -> float:
        t = self.landscape(handle) * (1 + self.noise * self.rng.gauss(0, 1))
        self.clock += t / 1000 + 1e-4
        self.samples += 1
        return t
