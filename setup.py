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
import importlib.util
import os

import numpy
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

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



class BuildPyWithHash(build_py):
    """Also writes vramguard/_source_hash: what install.py compares to skip a rebuild only when
    the installed build came from the same sources (install.py's source_hash)."""

    def run(self):
        super().run()
        spec = importlib.util.spec_from_file_location("vramguard_install", os.path.join(HERE, "install.py"))
        if spec is None or not os.path.isfile(spec.origin):
            return  # an sdist without install.py: no hash, install.py then always rebuilds
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        with open(os.path.join(self.build_lib, "vramguard", mod.HASH_FILE), "w", encoding="ascii") as f:
            f.write(mod.source_hash(HERE) + "\n")


setup(
    cmdclass={"build_py": BuildPyWithHash},
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
