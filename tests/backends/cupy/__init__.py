"""Tests of the CuPy backend that need no GPU (NVRTC compiles for any sm_XX)."""
