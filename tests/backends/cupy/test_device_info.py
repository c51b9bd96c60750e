"""The CuPy backend's description of a GPU (the autotune cache key of every call),
with the device faked: asked of the driver once per device, not once per call."""

from __future__ import annotations

import pytest

cupy = pytest.importorskip("cupy", reason="cupy is not installed")

from gmagen.backends import cupy as cupy_backend  # noqa: E402  (after the skip)


def test_device_properties_are_asked_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def fake_properties(index: int) -> dict:
        asked.append(index)
        return {"name": b"NVIDIA Fake", "major": 9, "minor": 0, "multiProcessorCount": 132}

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceProperties", fake_properties)
    cupy_backend._device_info.cache_clear()
    try:
        infos = [cupy_backend._device_info(i) for i in (0, 0, 1, 0, 1)]
    finally:
        cupy_backend._device_info.cache_clear()  # nothing fake stays for other tests
    assert asked == [0, 1]
    assert infos[0] == {"gpu": "NVIDIA Fake", "capability": (9, 0), "sm_count": 132,
                        "backend_version": cupy.__version__}
