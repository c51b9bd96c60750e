"""Snapshots of generated Triton source: a refactor of the emitters must
reproduce these texts exactly (tinygrad's process replay, helion's .expected).

Each kernel's header opens with a line naming the gmagen and Triton versions;
those lines are left out of the snapshot and of the comparison, so upgrading
either does not break it.  To accept a deliberate change of the generated code:

    GMAGEN_UPDATE_GOLDEN=1 python -m pytest tests/backends/triton/test_golden.py

and review the diff of tests/backends/triton/golden/.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import pytest

import gmagen
from gmagen.dsl import responsibilities_program

_TRITON = gmagen.available_backends()["triton"]
if not _TRITON:
    pytest.skip(f"triton backend unavailable: {_TRITON.reason}", allow_module_level=True)

import torch  # noqa: E402  (after the backend's probe, see conftest)

GOLDEN = Path(__file__).parent / "golden"
D = DV = K = 64  # the sizes of every snapshot, float32
B, N, H = 1, 5, 1
_VERSION_LINE = re.compile(r"^# gmagen \S+ / triton \S+: .*\n", re.MULTILINE)


def _update() -> bool:
    return os.environ.get("GMAGEN_UPDATE_GOLDEN", "") == "1"


def _inputs(covariance: str, mask: bool, init: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    lv_shape = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[covariance]
    inputs = {"q": torch.randn(B, N, H, D, generator=gen),
              "k": torch.randn(B, N, H, D, generator=gen),
              "v": torch.randn(B, N, H, DV, generator=gen),
              "mean": 0.5 * torch.randn(H, K, D, generator=gen),
              "log_var": 0.1 * torch.randn(lv_shape, generator=gen),
              "logit": 0.1 * torch.randn(H, K, generator=gen)}
    if mask:
        inputs["key_mask"] = torch.tensor([[True, False, True, True, False]])
    if init:
        inputs["initial_state"] = (torch.randn(B, H, K, DV, generator=gen),
                                   torch.rand(B, H, K, generator=gen) + 1)
    return inputs


def _called(causal: bool, norm: str, covariance: str, mask: bool, init: bool) -> str:
    """kernel.source after a call: every generated kernel of the plan."""
    kern = gmagen.compile(gmagen.gma(causal, norm, covariance), backend="triton")
    kern(**_inputs(covariance, mask, init))
    return kern.source


def _responsibility() -> str:
    kern = gmagen.compile(responsibilities_program("diag"), backend="triton")
    inputs = _inputs("diag", False, False)
    kern(inputs["q"], inputs["mean"], inputs["log_var"], inputs["logit"])
    return kern.source


def _decode() -> str:
    """gma_decode_fwd straight from its emitter, for a variant of its own."""
    from gmagen.backends.triton import emit_decode, space
    from gmagen.backends.triton.prelude import Shape
    from gmagen.backends.triton.variant import Variant

    config = dict(space.default_config("scan", D, DV, K, "f32"))
    shape = Shape(D, DV, K, config["block_d"], config["block_dv"], K)
    variant = Variant("decode", shape, "f32", q_covariance="shared", k_covariance="shared",
                      norm="row", mask=True, init=True)
    return emit_decode.emit(variant, config)


SNAPSHOTS = {
    "bidirectional_row_diag_mask": lambda: _called(False, "row", "diag", True, False),
    "causal_slot_spherical_init": lambda: _called(True, "slot", "spherical", False, True),
    "decode_row_shared_mask_init": _decode,
    "responsibility_diag": _responsibility,
}


def normalize(source: str) -> str:
    """The source without its version lines (one per kernel header)."""
    return _VERSION_LINE.sub("", source)


@pytest.mark.parametrize("name", list(SNAPSHOTS))
def test_golden_source(name):
    source = SNAPSHOTS[name]()
    assert _VERSION_LINE.match(source), "the source should open with its version line"
    got = normalize(source)
    path = GOLDEN / f"{name}.py"
    if _update():
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(got)
    assert path.exists(), (f"no snapshot {path}; create it with GMAGEN_UPDATE_GOLDEN=1 "
                           f"python -m pytest {Path(__file__).name}")
    want = path.read_text()
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                            f"golden/{name}.py", "generated", n=2))
        pytest.fail(f"generated source differs from golden/{name}.py (regenerate with "
                    f"GMAGEN_UPDATE_GOLDEN=1 if the change is meant):\n{diff[:6000]}")


def test_golden_snapshots_compile():
    """Every snapshot is valid Python: what was reviewed could run."""
    for name in SNAPSHOTS:
        path = GOLDEN / f"{name}.py"
        if path.exists():
            compile(path.read_text(), str(path), "exec")


def test_normalize_keeps_everything_but_versions():
    source = _decode()
    lines = source.splitlines()
    assert lines[0].startswith(f"# gmagen {gmagen.__version__} / triton ")
    assert normalize(source).splitlines() == lines[1:]
