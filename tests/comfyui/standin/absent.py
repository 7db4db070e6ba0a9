"""A stand-in for NAME, for vramguard's ComfyUI test environment only.

PyPI's NAME wheels do not load beside this machine's CPU build of torch, and ComfyUI (>= 0.8)
imports NAME at start-up from modules the vramguard tests never run (video, audio and
detection models).  This package lets those imports succeed: every module and attribute
under NAME exists, subclassing works, and *using* anything raises NotImplementedError naming
it, so a test that really needs NAME fails loudly instead of running on a fake.
scripts/comfyui_env.sh installs it; it is never shipped.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+standin"
STANDIN = True


class _AbsentMeta(type):
    def __getattr__(cls, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _absent(f"{cls.__qualname__}.{attr}")

    def __call__(cls, *args, **kwargs):
        raise NotImplementedError(f"{cls.__qualname__} is not available: NAME is a stand-in in this "
                                  f"test environment (see scripts/comfyui_env.sh)")


def _absent(qualname):
    t = _AbsentMeta(qualname.rsplit(".", 1)[-1], (), {"__module__": "NAME"})
    t.__qualname__ = qualname
    return t


class _Module(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        full = f"{self.__name__}.{attr}"
        if full in sys.modules:
            return sys.modules[full]
        value = _absent(full)
        setattr(self, attr, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("NAME."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _Module(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        parent, _, child = module.__name__.rpartition(".")
        setattr(sys.modules[parent], child, module)


sys.meta_path.append(_Finder())
sys.modules[__name__].__class__ = _Module
