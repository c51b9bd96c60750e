"""CuPy raw-CUDA backend (in progress): ``nvrtc.py`` compiles CUDA C++ for any
``sm_XX`` through NVRTC, without a GPU, with an in-memory and on-disk cache.  The
emitters that generate the GMA kernels from the plans are not written yet, so the
backend registers as unavailable and says why."""

UNAVAILABLE = ("backend 'cupy' is not implemented in this version of gmagen (its NVRTC "
               "compile layer, gmagen.backends.cupy.nvrtc, is; the kernel emitters are not)")
