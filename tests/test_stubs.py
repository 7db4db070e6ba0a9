"""python/vramguard/_native.pyi against the live module: every function, class, method and
attribute present in both, with the same parameter names, kinds and defaulted-ness.

Generic: it iterates the module, so functions another file adds are checked too."""
from __future__ import annotations

import ast
import inspect
import types
from pathlib import Path

import pytest

from vramguard import _native

STUB = Path(__file__).resolve().parent.parent / "python" / "vramguard" / "_native.pyi"

# Owned by csrc/tiler.c (being split into planner.c / canvas.c on another branch, which adds
# the signatures): their presence is checked, their parameters only once they have a
# __text_signature__.  Remove on merge.
PENDING_SIGNATURES: set[str] = set()  # every function and method has a __text_signature__

P = inspect.Parameter
KINDS = {"posonly": P.POSITIONAL_ONLY, "args": P.POSITIONAL_OR_KEYWORD, "vararg": P.VAR_POSITIONAL,
         "kwonly": P.KEYWORD_ONLY, "kwarg": P.VAR_KEYWORD}


def stub_params(fn: ast.FunctionDef, drop_first: bool) -> list[tuple[str, object, bool]]:
    a = fn.args
    out: list[tuple[str, object, bool]] = []
    pos = a.posonlyargs + a.args
    first_default = len(pos) - len(a.defaults)
    for i, arg in enumerate(pos):
        kind = KINDS["posonly"] if i < len(a.posonlyargs) else KINDS["args"]
        out.append((arg.arg, kind, i >= first_default))
    if a.vararg:
        out.append((a.vararg.arg, KINDS["vararg"], False))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, KINDS["kwonly"], d is not None))
    if a.kwarg:
        out.append((a.kwarg.arg, KINDS["kwarg"], False))
    return out[1:] if drop_first else out


def live_params(obj, drop_first: bool) -> list[tuple[str, object, bool]] | None:
    try:
        sig = inspect.signature(obj)
    except (ValueError, TypeError):
        return None
    out = [(p.name, p.kind, p.default is not P.empty) for p in sig.parameters.values()]
    return out[1:] if drop_first else out


def load_stub():
    tree = ast.parse(STUB.read_text())
    funcs, classes = {}, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            funcs[node.name] = node
        elif isinstance(node, ast.ClassDef):
            members, attrs = {}, set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members[item.name] = item
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    attrs.add(item.target.id)
            bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
            classes[node.name] = (node, members, attrs, bases)
    return funcs, classes


FUNCS, CLASSES = load_stub()
LIVE_FUNCS = {n: o for n, o in vars(_native).items()
              if isinstance(o, types.BuiltinFunctionType) and not n.startswith("_")}
LIVE_CLASSES = {n: o for n, o in vars(_native).items() if isinstance(o, type) and not n.startswith("_")}


def test_the_same_names_in_both():
    assert sorted(set(LIVE_FUNCS) - set(FUNCS)) == [], "functions missing from _native.pyi"
    assert sorted(set(FUNCS) - set(LIVE_FUNCS)) == [], "stubbed functions the module lacks"
    assert sorted(set(LIVE_CLASSES) - set(CLASSES)) == [], "classes missing from _native.pyi"
    assert sorted(set(CLASSES) - set(LIVE_CLASSES)) == [], "stubbed classes the module lacks"


def test_every_callable_has_a_text_signature():
    missing = [n for n, f in LIVE_FUNCS.items() if live_params(f, False) is None]
    for cname, cls in LIVE_CLASSES.items():
        if issubclass(cls, tuple) or issubclass(cls, BaseException):
            continue
        if live_params(cls, False) is None:
            missing.append(cname)
        for mname, m in _methods(cls).items():
            if live_params(getattr(cls, mname), not isinstance(m, staticmethod)) is None:
                missing.append(f"{cname}.{mname}")
    assert sorted(set(missing) - PENDING_SIGNATURES) == []


@pytest.mark.parametrize("name", sorted(set(LIVE_FUNCS) & set(FUNCS)))
def test_function_parameters(name):
    live = live_params(LIVE_FUNCS[name], False)
    if live is None and name in PENDING_SIGNATURES:
        pytest.skip(f"{name} has no __text_signature__ yet (owned by the tiler files)")
    assert live == stub_params(FUNCS[name], False)


def _methods(cls) -> dict:
    return {n: m for n, m in vars(cls).items() if not n.startswith("_") and
            isinstance(m, (types.MethodDescriptorType, staticmethod, classmethod,
                           types.BuiltinFunctionType))}


def _attrs(cls) -> set[str]:
    return {n for n, m in vars(cls).items() if not n.startswith("_") and
            isinstance(m, (types.GetSetDescriptorType, types.MemberDescriptorType))}


@pytest.mark.parametrize("cname", sorted(set(LIVE_CLASSES) & set(CLASSES)))
def test_class_members(cname):
    cls = LIVE_CLASSES[cname]
    node, members, attrs, bases = CLASSES[cname]
    if issubclass(cls, tuple):  # struct sequences: the fields, in order
        assert "tuple" in bases
        assert set(cls.__match_args__) == attrs - {"__match_args__"}
        stub_order = [i.target.id for i in node.body if isinstance(i, ast.AnnAssign)
                      and isinstance(i.target, ast.Name) and i.target.id != "__match_args__"]
        assert tuple(stub_order) == cls.__match_args__
        return
    live_methods = _methods(cls)
    assert sorted(set(live_methods) - set(members)) == [], f"{cname}: methods missing from the stub"
    assert sorted(set(members) - set(live_methods) - {"__init__"}) == [], f"{cname}: stubbed methods it lacks"
    assert sorted(_attrs(cls) ^ attrs) == [], f"{cname}: attributes differ"
    checked = 0
    init = live_params(cls, False)
    if init is None:
        assert cname in PENDING_SIGNATURES, f"{cname} has no __text_signature__"
    else:
        assert "__init__" in members
        assert init == stub_params(members["__init__"], True), f"{cname}()"
        checked += 1
    for mname, m in live_methods.items():
        static = isinstance(m, staticmethod)
        live = live_params(getattr(cls, mname), not static)
        if live is None:
            assert f"{cname}.{mname}" in PENDING_SIGNATURES, f"{cname}.{mname} has no __text_signature__"
            continue
        assert live == stub_params(members[mname], not static), f"{cname}.{mname}"
        checked += 1
    assert checked > 0 or cname in PENDING_SIGNATURES


def test_the_checker_can_fail():
    """The comparison notices a renamed, re-kinded or undefaulted parameter."""
    fn = ast.parse("def snapshot(dev: int | None = None, *, reserve=None, card=None): ...").body[0]
    assert live_params(_native.snapshot, False) != stub_params(fn, False)
    fn = ast.parse("def snapshot(device=None, reserve=None, card=None): ...").body[0]
    assert live_params(_native.snapshot, False) != stub_params(fn, False)
    fn = ast.parse("def snapshot(device=None, *, reserve=None, card=None): ...").body[0]
    assert live_params(_native.snapshot, False) == stub_params(fn, False)
