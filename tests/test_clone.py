"""engine.copying.clone_model gives what copy.deepcopy gives, object for object.

assert_same_copy walks the original, its copy.deepcopy and its clone_model side by side:
same types, attributes, values and tensors; an object reached twice in the deepcopy is
reached twice in the clone (sharing kept, nothing extra shared); and the clone holds an
object of the original exactly where the deepcopy does (memo entries, functions).
"""
from __future__ import annotations

import copy
import copyreg
import types
from collections import OrderedDict

import pytest
import torch
from torch import fx, nn

from netslim.engine.compensate import _weights_memo
from netslim.engine.copying import clone_model
from netslim.wrappers import unwrap_model
from zoo import ZOO

_VALUES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device)


def assert_same_copy(original, deep, cloned) -> None:
    """`cloned` is `deep` (copy.deepcopy(original)) up to the identity of new objects.
    `original` is walked alongside where it has the same shape (None where deepcopy
    rebuilt an object another way)."""
    partner: dict[int, object] = {}  # id(object of deep) -> its object of cloned
    taken: set[int] = set()  # ids of cloned's objects already paired
    alive = []  # keeps the paired objects, and so their ids, alive while walking

    def walk(o, d, c, path):
        assert type(d) is type(c), path
        if type(d) in _VALUES:
            assert d == c or (d != d and c != c), path
            return
        if id(d) in partner:  # reached again: the clone must reach the same object again
            assert partner[id(d)] is c, f"{path}: sharing differs"
            return
        assert id(c) not in taken, f"{path}: the clone shares what the deepcopy does not"
        partner[id(d)] = c
        taken.add(id(c))
        alive.extend((d, c))
        assert (c is o) == (d is o), f"{path}: {'shares' if c is o else 'copies'} the original's object"
        if isinstance(d, torch.Tensor):
            assert torch.equal(d, c) and d.requires_grad == c.requires_grad, path
            if d is not o and isinstance(o, torch.Tensor) and o.numel():
                assert c.untyped_storage().data_ptr() != o.untyped_storage().data_ptr(), path
            walk(vars(o) if type(o) is type(d) else None, vars(d), vars(c), path + ".__dict__")
        elif isinstance(d, (dict, OrderedDict)):
            assert list(d) == list(c), path
            for k in d:
                walk(o.get(k) if isinstance(o, dict) else None, d[k], c[k], f"{path}[{k!r}]")
        elif isinstance(d, (list, tuple)):
            assert len(d) == len(c), path
            for i, (y, z) in enumerate(zip(d, c)):
                walk(o[i] if isinstance(o, (list, tuple)) and i < len(o) else None, y, z, f"{path}[{i}]")
        elif isinstance(d, (set, frozenset)):
            assert d == c, path
        elif isinstance(d, types.MethodType):
            assert d.__func__ is c.__func__, path
            walk(getattr(o, "__self__", None), d.__self__, c.__self__, path + ".__self__")
        elif isinstance(d, (types.FunctionType, types.BuiltinFunctionType, type)):
            assert d is c, path
        elif hasattr(d, "__dict__"):
            walk(getattr(o, "__dict__", None), vars(d), vars(c), path + ".__dict__")
        else:
            assert d == c, path

    walk(original, deep, cloned, "model")


def both_copies(model, memo_of=lambda m: None):
    return copy.deepcopy(model, memo_of(model)), clone_model(model, memo_of(model))


def assert_clone_is_deepcopy(model, memo_of=lambda m: None, x=None):
    deep, cloned = both_copies(model, memo_of)
    assert_same_copy(model, deep, cloned)
    assert [(n, type(m)) for n, m in deep.named_modules()] == [(n, type(m)) for n, m in cloned.named_modules()]
    state = deep.state_dict()
    assert state.keys() == cloned.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in cloned.state_dict().items())
    if x is not None:
        torch.manual_seed(0)
        with torch.no_grad():
            want = deep(x)
        torch.manual_seed(0)
        with torch.no_grad():
            got = cloned(x)
        assert_outputs_equal(want, got)
    return deep, cloned


def assert_outputs_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_outputs_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_outputs_equal(x, y)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_clones_as_deepcopy_does(name):
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    model.netslim_meta = {"input_size": [3, 32, 32], "plan": {"bn1": [0, 2]}}
    assert_clone_is_deepcopy(model, x=torch.randn(2, 3, 32, 32))
    # compensate's memo: conv / linear weights and BN running variances stay the model's own
    _, cloned = assert_clone_is_deepcopy(model, _weights_memo, x=torch.randn(2, 3, 32, 32))
    copies = dict(cloned.named_modules())
    assert all(copies[n].weight is m.weight for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


class Block(nn.Module):
    def __init__(self, shared: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.shared = shared  # the same module in several blocks
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.shared(self.conv(x)))


class Sharing(nn.Module):
    """Every way one object is reached twice: a shared submodule, tied weights, a module
    also kept as a plain attribute, modules in a plain list and dict, a back reference to
    the parent, one dict (and one empty dict) shared by two modules."""

    def __init__(self):
        super().__init__()
        shared = nn.Conv2d(4, 4, 1)
        self.a, self.b = Block(shared), Block(shared)
        self.b.conv.weight = self.a.conv.weight  # tied
        self.__dict__["alias"] = self.a  # plain attributes: nn.Module.__setattr__ would register them
        self.__dict__["stages"] = [self.a, self.b]
        self.__dict__["by_name"] = {"a": self.a, "extra": nn.ReLU()}
        self.a.__dict__["owner"] = self
        self.a.config = self.b.config = {"width": 4}
        self.a.registry = self.b.registry = {}  # empty: copied by _clone's own shortcut

    def forward(self, x):
        return self.by_name["extra"](self.b(self.alias(x)))


@pytest.mark.parametrize("memo_of", [lambda m: None, _weights_memo], ids=["no-memo", "weights-memo"])
def test_sharing_is_kept(memo_of):
    model = Sharing()
    _, cloned = assert_clone_is_deepcopy(model, memo_of, x=torch.randn(1, 4, 8, 8))
    assert cloned.a.shared is cloned.b.shared and cloned.alias is cloned.a and cloned.a.owner is cloned
    assert cloned.stages[1] is cloned.b and cloned.by_name["a"] is cloned.a
    assert cloned.a.conv.weight is cloned.b.conv.weight and cloned.a.config is cloned.b.config
    assert cloned.a.registry is cloned.b.registry and cloned.a.registry is not model.a.registry
    assert (cloned.a.conv.weight is model.a.conv.weight) == (memo_of is _weights_memo)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)


class Rebuilt(Inner):
    """What the reducers below rebuild: a module deepcopy made another way (marked)."""


def rebuilt(conv: nn.Module) -> Rebuilt:
    new = Rebuilt()
    new.conv, new.marker = conv, "rebuilt"
    return new


class OwnDeepcopy(Inner):
    def __deepcopy__(self, memo):
        return rebuilt(copy.deepcopy(self.conv, memo))


class OwnGetstate(Inner):
    def __getstate__(self):
        return super().__getstate__(), "own __getstate__"

    def __setstate__(self, state):
        attributes, self.marker = state
        super().__setstate__(attributes)


class OwnReduceEx(Inner):
    def __reduce_ex__(self, protocol):
        return rebuilt, (self.conv,)


class OwnReduce(Inner):
    def __reduce__(self):
        return rebuilt, (self.conv,)


class Slotted(Inner):
    __slots__ = ("marker",)  # deepcopy loses it (nn.Module.__getstate__ returns __dict__ only)

    def __init__(self):
        super().__init__()
        self.marker = "slot"


class Registered(Inner):
    pass


copyreg.pickle(Registered, lambda m: (rebuilt, (m.conv,)))


def instance_deepcopy() -> Inner:
    model = Inner()
    model.__dict__["__deepcopy__"] = lambda memo: rebuilt(copy.deepcopy(model.conv, memo))
    return model


@pytest.mark.parametrize("make", [OwnDeepcopy, OwnGetstate, OwnReduceEx, OwnReduce, Slotted, Registered,
                                  instance_deepcopy])
def test_a_module_that_copies_itself_its_own_way_is_deepcopied(make):
    """The fallback: copy.deepcopy(module, memo) for that module, wherever it sits."""
    inner = make()
    model = nn.Sequential(nn.Conv2d(3, 3, 1), inner, nn.ReLU())
    model.__dict__["again"] = inner  # reached twice: copied once, shared
    deep, cloned = assert_clone_is_deepcopy(model, x=torch.randn(1, 3, 4, 4))
    assert type(cloned[1]) is type(deep[1]) and cloned.again is cloned[1]
    assert getattr(cloned[1], "marker", None) == getattr(deep[1], "marker", None)
    if make is not Slotted:
        assert cloned[1].marker


def test_a_graph_module_is_deepcopied():
    """fx.GraphModule has its own __deepcopy__ (and a class per instance: not walked)."""
    inner = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), inner)
    model.__dict__["again"] = inner
    deep, cloned = both_copies(model)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(deep(x), cloned(x))
    assert cloned[1].code == deep[1].code and cloned[1].graph is not inner.graph and cloned.again is cloned[1]
    assert type(cloned[1]) is not type(inner) and type(cloned[1]).__bases__ == type(deep[1]).__bases__
    assert getattr(cloned[1], "0").weight is not getattr(inner, "0").weight


class Tagged(nn.Parameter):
    pass


def test_tensors_keep_their_class_grad_flag_and_attributes():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[0].weight = Tagged(model[0].weight.detach())
    model[0].bias.requires_grad_(False)
    model[0].weight.group = "conv"
    model[1].running_mean.note = ["stat"]
    model.register_buffer("scratch", torch.arange(3.0), persistent=False)
    model.__dict__["plain_tensor"] = model[1].running_var
    deep, cloned = assert_clone_is_deepcopy(model, x=torch.randn(1, 3, 4, 4))
    # (Parameter.__deepcopy__ drops a parameter's attributes, Tensor.__deepcopy__ keeps a buffer's)
    assert type(cloned[0].weight) is Tagged and not hasattr(deep[0].weight, "group")
    assert not cloned[0].bias.requires_grad and cloned[1].running_mean.note == ["stat"]
    assert cloned.plain_tensor is cloned[1].running_var and "scratch" in cloned._non_persistent_buffers_set


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.calls = []

    def forward(self, x):
        return self.conv(x)

    def count(self, module, inputs, output):
        self.calls.append(type(module).__name__)


def test_hooks_are_copied_as_deepcopy_copies_them():
    model = Hooked()
    model.register_forward_hook(model.count)  # a bound method: deepcopy binds it to the copy
    model.conv.register_forward_pre_hook(lambda m, inputs: None)
    model.register_full_backward_hook(lambda m, gi, go: None)
    model.conv.register_state_dict_pre_hook(lambda m, prefix, keep_vars: None)
    _, cloned = assert_clone_is_deepcopy(model, x=torch.randn(1, 3, 2, 2))
    assert cloned._forward_hooks is not model._forward_hooks and model.calls == []
    cloned(torch.randn(1, 3, 2, 2))
    assert model.calls == [] and cloned.calls[-1] == "Hooked"
    cloned.conv.register_forward_hook(lambda m, i, o: None)  # an empty hook dict made new too
    assert not model.conv._forward_hooks


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_training_flags_are_kept(mode):
    model = ZOO["resnet18-basic"]().train(mode != "eval")
    if mode == "mixed":
        next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()
    _, cloned = assert_clone_is_deepcopy(model)
    assert [m.training for m in cloned.modules()] == [m.training for m in model.modules()]


def test_user_attributes_and_a_data_parallel_wrapped_model():
    model = ZOO["mobilenet-v2"]().eval()
    model.netslim_meta = {"plan": {"features.1.conv.1": [0, 3]}, "biases": ["classifier.1"], "input_size": [3, 32, 32]}
    model.note, model.sizes = "trained 3 epochs", (32, 64)
    wrapped = nn.DataParallel(model)
    assert_clone_is_deepcopy(wrapped)
    _, cloned = assert_clone_is_deepcopy(unwrap_model(wrapped), x=torch.randn(1, 3, 32, 32))
    assert cloned.netslim_meta == model.netslim_meta and cloned.netslim_meta is not model.netslim_meta


def test_a_module_compiled_in_place_drops_its_compiled_forward_as_deepcopy_does():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    model.compile()
    deep, cloned = assert_clone_is_deepcopy(model)
    assert "_compiled_call_impl" not in vars(cloned)
