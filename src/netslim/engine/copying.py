"""`clone_model`: copy.deepcopy of a model, module by module.

copy.deepcopy of a module goes through the generic pickle protocol (__reduce_ex__, a
deepcopy of the whole state dict, value by value, through its dispatch) for each of the
~20 bookkeeping attributes every module has, most of them empty hook dicts: it was a
fifth of a 32x32 MobileNetV2 prune call. clone_model does what deepcopy does for a plain
nn.Module, with the common cases (numbers, strings, empty or flat containers) copied
directly, and hands everything else to copy.deepcopy with the same memo.
"""
from __future__ import annotations

import copy
import copyreg
import weakref
from collections import OrderedDict

import torch
from torch import nn

# Values copy.deepcopy returns as they are (immutable; a device is rebuilt equal by deepcopy,
# kept here: nothing tells the two apart but `is`).
_ATOMS = frozenset({int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device})
# Containers of atoms copied directly: deepcopy makes a new one with the same entries.
_FLAT_CONTAINERS = frozenset({dict, OrderedDict, list, set})
# What copy.deepcopy looks up on the object (or its class) to copy it some other way than
# nn.Module's. (__setstate__ is not here: deepcopy calls the class's on the new object with
# the copied state, and so does _clone; Conv2d, Upsample, Softmax... define one.)
_COPY_PROTOCOL = ("__deepcopy__", "__copy__", "__reduce_ex__", "__reduce__", "__getnewargs__",
                  "__getnewargs_ex__", "__getstate__")
_COPY_PROTOCOL_NAMES = frozenset(_COPY_PROTOCOL)
_MODULE_DEFAULTS = {name: getattr(nn.Module, name, None) for name in _COPY_PROTOCOL}
_MISSING = object()
_plain_classes: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def clone_model(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """copy.deepcopy(model, memo), faster: the same modules, tensors, attributes and sharing.

    Invariant: the result is what copy.deepcopy(model, memo) gives, object for object. A
    module, tensor or container reached twice is copied once (the memo, as deepcopy's,
    holds each copy before its contents are copied, so cycles and shared submodules
    resolve to it), and a `memo` entry the caller put there is used as is (compensate's
    weight sharing). A module whose class or instance copies itself its own way
    (_copies_plainly) is copied by copy.deepcopy, with the same memo.
    """
    return _clone(model, {} if memo is None else memo)


def _clone(module: nn.Module, memo: dict) -> nn.Module:
    copied = memo.get(id(module), _MISSING)
    if copied is not _MISSING:
        return copied
    if not _copies_plainly(module):
        return copy.deepcopy(module, memo)
    new = type(module).__new__(type(module))
    memo[id(module)] = new  # before the contents: a child that refers back finds it
    state = module.__getstate__()  # nn.Module's (checked): a copy of __dict__ less the compiled forward
    for key, value in state.items():
        kind = type(value)
        if kind in _ATOMS:
            continue  # deepcopy gives the value itself
        if key == "_modules":
            state[key] = _copy_entries(value, memo, _clone_child)
        elif key in ("_parameters", "_buffers"):
            state[key] = _copy_entries(value, memo, _copy_tensor)
        elif kind in _FLAT_CONTAINERS and not value:
            # the dozen empty hook dicts of every module (most of its attributes): inline, as
            # _copy_value would copy them, without its call and atom checks
            copied = memo.get(id(value), _MISSING)
            if copied is _MISSING:
                copied = memo[id(value)] = kind()
            state[key] = copied
        elif kind is not tuple or not _only_atoms(value):  # such a tuple deepcopy returns itself
            state[key] = _copy_value(value, memo)
    new.__setstate__(state)  # the class's own, as deepcopy calls it
    return new


def _copies_plainly(module: nn.Module) -> bool:
    """True if copy.deepcopy copies `module` as it copies a bare nn.Module: cls.__new__(cls),
    a deepcopy of nn.Module.__getstate__(), then the class's __setstate__. False for a class
    that customises another step (fx.GraphModule's __deepcopy__, RNNBase's __getstate__,
    __slots__, a copyreg reducer...) or an instance that carries one of those methods as
    an attribute."""
    if not _COPY_PROTOCOL_NAMES.isdisjoint(module.__dict__):
        return False
    cls = type(module)
    plain = _plain_classes.get(cls)
    if plain is None:
        plain = (all(getattr(cls, name, None) is default for name, default in _MODULE_DEFAULTS.items())
                 and not any("__slots__" in vars(k) for k in cls.__mro__)
                 and cls not in copyreg.dispatch_table)
        _plain_classes[cls] = plain
    return plain


def _clone_child(child: nn.Module | None, memo: dict) -> nn.Module | None:
    return None if child is None else _clone(child, memo)


def _copy_tensor(tensor: torch.Tensor | None, memo: dict) -> torch.Tensor | None:
    # deepcopy itself: Tensor / Parameter.__deepcopy__ decide what the copy keeps (subclass,
    # requires_grad, a buffer's attributes) and look the tensor up in the memo.
    return None if tensor is None else copy.deepcopy(tensor, memo)


def _copy_entries(entries, memo: dict, copy_entry):
    """A new dict of the same type as `entries` (_modules, _parameters, _buffers) with each
    value copied by copy_entry, registered in the memo as deepcopy does."""
    copied = memo.get(id(entries), _MISSING)
    if copied is not _MISSING:
        return copied
    if type(entries) not in (dict, OrderedDict):
        return copy.deepcopy(entries, memo)
    new = type(entries)()
    memo[id(entries)] = new
    for key, value in entries.items():
        new[key] = copy_entry(value, memo)
    return new


def _copy_value(value, memo: dict):
    """copy.deepcopy(value, memo) of a module attribute that is no atom: directly for tuples
    of atoms and for dicts, lists and sets of atoms (the empty hook dicts of every module)."""
    copied = memo.get(id(value), _MISSING)
    if copied is not _MISSING:
        return copied
    kind = type(value)
    if kind in _FLAT_CONTAINERS:
        if _only_atoms(value) and (kind is list or kind is set or _only_atoms(value.values())):
            new = kind(value)
            memo[id(value)] = new
            return new
    elif kind is tuple and _only_atoms(value):
        return value  # deepcopy returns such a tuple itself
    return copy.deepcopy(value, memo)


def _only_atoms(values) -> bool:
    return all(type(v) in _ATOMS for v in values)
