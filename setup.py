"""Build vramguard._native with the system compiler.

No CUDA toolkit is needed: NVML and the CUDA driver are loaded at run time (csrc/gpulibs.c).
Environment switches (used by .ci/run):
  VRAMGUARD_WERROR=1                    add -Werror
  VRAMGUARD_SANITIZE=address,undefined  build with those sanitizers (preload libasan to run)
  VRAMGUARD_DEBUG=1                     -O0 -g
"""
import os

import numpy
from setuptools import Extension, setup

SOURCES = ["module.c", "gpulibs.c", "accounting.c", "sampler.c", "gcpolicy.c", "tiler.c"]

cflags = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
          "-fvisibility=hidden", "-pthread"]
ldflags = ["-pthread"]
if os.environ.get("VRAMGUARD_DEBUG"):
    cflags += ["-O0", "-g"]
else:
    cflags += ["-O3"]
if os.environ.get("VRAMGUARD_WERROR"):
    cflags.append("-Werror")
san = os.environ.get("VRAMGUARD_SANITIZE", "").strip()
if san:
    # -fno-wrapv: CPython's CFLAGS carry -fwrapv, which defines signed overflow and so turns
    # UBSan's signed-integer-overflow check off; the sanitized build must see overflows.
    cflags += [f"-fsanitize={san}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g",
               "-fno-wrapv"]
    ldflags += [f"-fsanitize={san}"]

setup(
    ext_modules=[
        Extension(
            "vramguard._native",
            sources=[os.path.join("csrc", s) for s in SOURCES],
            depends=[os.path.join("csrc", h) for h in ("vg.h", "vg_numpy.h", "gpusyms.h")],
            include_dirs=[numpy.get_include()],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            libraries=["dl", "m"],
        )
    ],
)
