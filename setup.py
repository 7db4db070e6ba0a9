"""Build vramguard._native with the system compiler.

No CUDA toolkit is needed: NVML and the CUDA driver are loaded at run time (csrc/gpulibs.c).
Environment switches (used by .ci/run):
  VRAMGUARD_WERROR=1                    add -Werror
  VRAMGUARD_SANITIZE=address,undefined  build with those sanitizers (preload libasan to run);
                                        signed overflow is checked too (-fno-wrapv undoes the
                                        -fwrapv CPython's flags carry, which silences it)
  VRAMGUARD_DEBUG=1                     -O0 -g
"""
import glob
import os

import numpy
from setuptools import Extension, setup

# Every C file in csrc/ is part of the module (the layers are listed in csrc/vg.h); globbing
# keeps a file split from needing a setup.py edit.
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.c")))
HEADERS = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.h")))

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
    cflags += [f"-fsanitize={san}", "-fsanitize=signed-integer-overflow", "-fno-wrapv",
               "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g"]
    # linking with the UBSan flag pulls in its runtime (libubsan) as a dependency of the module
    ldflags += [f"-fsanitize={san}", "-fsanitize=signed-integer-overflow"]

# Objects of differently-flagged builds never mix: a sanitized build's objects left in build/
# were picked up by the next plain `pip install .` (an ASan .so that cannot be imported).
flavour = "-".join(x for x in (("san-" + san.replace(",", "+")) if san else "plain",
                               "debug" if os.environ.get("VRAMGUARD_DEBUG") else "") if x)

setup(
    options={"build": {"build_base": os.path.join("build", flavour)}},
    ext_modules=[
        Extension(
            "vramguard._native",
            sources=SOURCES,
            depends=HEADERS,
            include_dirs=[numpy.get_include()],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            libraries=["dl", "m"],
        )
    ],
)
