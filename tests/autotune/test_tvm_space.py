"""The TVM backend's cuda tuning space: its knobs around the cuda defaults, pruned
by space.validate and the device's threads per block, without a GPU; and the
backend's tuning hooks where there is no GPU to tune on."""

from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from gmagen.autotune import DeviceLimits  # noqa: E402
from gmagen.backends.tvm import CUDA_BACKEND, space, tune  # noqa: E402
from gmagen.config import Config  # noqa: E402
from gmagen.errors import OptionError  # noqa: E402

H100 = DeviceLimits.fake()


@pytest.mark.parametrize("kind", ["write", "read", "scan", "responsibility"])
def test_every_pruned_config_validates(kind):
    default = space.default_config(kind, "cuda")
    pruned = tune.tuning_space(kind, default, 64, 64, 64, "bf16").prune(H100)
    configs = list(pruned)
    assert Config({k: default[k] for k in pruned.space.knobs}) in configs
    for c in configs:
        space.validate(default.replace(**dict(c)), "cuda", kind)  # raises if not
    tile = "chunk" if kind == "scan" else "block_n"
    assert tile in pruned.space.knobs and ("write_tiles" in pruned.space.knobs) == (kind == "write")
    # the knob the schedule ignores for this kind is not searched
    assert ("block_n" if kind == "scan" else "chunk") not in pruned.space.knobs


def test_mma_is_searched_for_16_bit_tokens_only():
    """mma (and wide_tiles) are no-ops on float32 tokens; with 16-bit tokens mma=1
    appears only with tiles of a multiple of 16 tokens (the 16 x 16 tensor-core tiles)."""
    default = space.default_config("read", "cuda")
    assert "mma" not in tune.tuning_space("read", default, 64, 64, 64, "f32").knobs
    pruned = tune.tuning_space("read", default, 64, 64, 64, "bf16").prune(H100)
    with_mma = [c for c in pruned if c["mma"] == 1]
    assert with_mma and all(c["block_n"] % 16 == 0 for c in with_mma)
    assert any(c["mma"] == 0 for c in pruned)


def test_threads_pruned_by_the_device():
    default = space.default_config("read", "cuda")
    small = DeviceLimits.fake(max_threads_per_block=128)
    few = list(tune.tuning_space("read", default.replace(num_threads=128), 64, 64, 64).prune(small))
    assert few and all(c["num_threads"] <= 128 for c in few)
    assert len(few) < len(list(tune.tuning_space("read", default, 64, 64, 64).prune(H100)))


def test_a_default_off_the_grid_is_kept():
    """A user's default outside the candidate values stays a candidate (the incumbent)."""
    default = space.default_config("write", "cuda").replace(block_n=48, write_tiles=5)
    knobs = tune.tuning_space("write", default, 64, 64, 64).knobs
    assert 48 in knobs["block_n"].values() and 5 in knobs["write_tiles"].values()
    assert knobs["block_n"].default == 48


def test_validate_config_names_the_knob():
    from gmagen.ir.passes.plan import plan_program

    import gmagen

    kp = next(k for k in plan_program(gmagen.gma(causal=True)).kernels if k.kind == "scan")
    with pytest.raises(OptionError, match="chunk=1"):
        CUDA_BACKEND.validate_config(kp, Config(chunk=1))
    assert CUDA_BACKEND.validate_config(kp, Config(chunk=32))["chunk"] == 32


def test_no_tuning_device_without_a_gpu():
    """Configs are tuned per GPU: a binding on the CPU (or a machine without a CUDA
    driver) has no tuning device, so autotune="cached" falls back to the defaults."""
    class B:
        device = ("cpu", 0)

    assert CUDA_BACKEND.tuning_device(B()) is None


def test_tune_takes_the_cuda_target():
    """gmagen.tune(..., "tvm") tunes the cuda target (its default would be llvm); on a
    machine without a GPU that is a clear error naming the target, before any build,
    and an explicit llvm target is refused as a CPU one."""
    import gmagen
    from gmagen.errors import UnsupportedFeature

    if CUDA_BACKEND.tuning_device(type("B", (), {"device": ("cuda", 0)})()) is not None:
        pytest.skip("a GPU is here: this checks the refusal without one")
    shape = {"B": 1, "N": 64, "H": 1, "D": 8, "Dv": 8, "K": 4}
    with pytest.raises(OptionError, match="target='cuda'.*arch"):
        gmagen.tune(gmagen.gma(), [shape], "tvm")
    with pytest.raises(UnsupportedFeature, match="no tuner for cpu .*'llvm'"):
        gmagen.tune(gmagen.gma(), [shape], "tvm", options={"target": "llvm"})
