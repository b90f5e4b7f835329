"""Step 1: trace the model with torch.fx and record every node's output shape.

Every BatchNorm is a leaf (the walk reads its factors), `list(x.chunk(2, 1))` is unpacked
when the part count is written in the code, and a submodule torch.fx cannot trace is traced
as one opaque call (its channels keep their width) instead of sinking the whole model.
Shapes come from each op's formula when every node is one of the usual CNN ops
(shapes_by_rule), else from a forward of the traced graph (record_shapes, on the meta
device when that is cheaper).
"""
from __future__ import annotations

import operator
import os
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.nn.modules.module as module_internals
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import PruneError
from ..meta_shapes import MetaShapes, prefer_meta
from . import rules


def example_input(input_size: Sequence[int] | None, model: nn.Module | None = None) -> torch.Tensor:
    """A zero batch of one example of shape [1, *input_size] (defaults from the model)."""
    if input_size is None:
        input_size = guess_input_size(model)
    return torch.zeros(1, *[int(s) for s in input_size])


def guess_input_size(model: nn.Module | None) -> list[int]:
    """[C, 32, 32] from the first conv, or [features] from the first Linear (an MLP)."""
    if model is not None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                return [m.in_channels, 32, 32]
            if isinstance(m, nn.Linear):
                return [m.in_features]
    return [3, 32, 32]


class Tracer(fx.Tracer):
    """Treats every BatchNorm (ours included), every excluded module and every module type
    registered with netslim.register_module as a leaf (one call in the graph)."""

    def __init__(self, opaque: set[str], stack_traces: bool = False):
        super().__init__()
        self.opaque = opaque
        # Source lines (node.meta["stack_trace"]) cost a Python traceback per node, a third of
        # the trace; only error messages read them, and `source_lines` traces again for those.
        self.record_stack_traces = stack_traces
        # fx copies the module stack into every node's meta and the scope at every module call
        # with copy.copy, which without a __copy__ goes through __reduce_ex__ (~2 us each, 370
        # per MobileNetV2 trace): the same copies, made directly. (Should fx rename these
        # attributes, ours are unused and its own copies run as before.)
        self.scope = _Scope(self.scope.module_path, self.scope.module_type)
        self.module_stack = _ModuleStack(self.module_stack)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, _BatchNorm) or qualname in self.opaque or rules.is_registered_leaf(m)
                or super().is_leaf_module(m, qualname))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _PartsProxy(node, self)

    def create_arg(self, a: Any) -> Any:
        """fx's create_arg, with the commonest arguments first: our proxies, plain tuples, no
        keyword arguments and Python scalars are what fx.Tracer.create_arg returns them as after
        ~10 type checks (a Parameter? a tensor constant? an opaque type?...), which none of them can pass."""
        kind = type(a)
        if kind is _PartsProxy:
            return a.node
        if kind is tuple:
            return tuple([self.create_arg(v) for v in a])
        if kind in _SCALARS:
            return a
        if kind is dict and not a:
            return {}  # a new one, as fx makes
        return super().create_arg(a)

    def iter(self, obj: fx.Proxy):
        """`list(x.chunk(2, 1))`, `for part in x.split([a, b], 1)`: fx cannot iterate a Proxy
        (it only unpacks `a, b = ...`), but the part count is known when written in the code."""
        parts = _literal_part_count(obj.node)
        if parts is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(parts)])


_SCALARS = {int, float, bool, str, type(None)}


class _Scope(fx.proxy.Scope):
    def __copy__(self) -> "_Scope":
        return _Scope(self.module_path, self.module_type)


class _ModuleStack(OrderedDict):
    def __copy__(self) -> OrderedDict:
        return OrderedDict(self)  # what copy.copy of the OrderedDict fx keeps would return


class _PartsProxy(fx.Proxy):
    """A Proxy whose len() is known for chunk/split results with a literal count (list()
    asks len() before iterating)."""

    def __len__(self) -> int:
        parts = _literal_part_count(self.node)
        return super().__len__() if parts is None else parts


def _literal_part_count(node: fx.Node) -> int | None:
    """How many tensors a chunk/split node returns, if its arguments say so literally."""
    if node.target in (torch.chunk, "chunk"):
        n = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
        return n if isinstance(n, int) else None
    if node.target in (torch.split, "split"):
        sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections",
                                                                        node.kwargs.get("split_size"))
        return len(sizes) if isinstance(sizes, (list, tuple)) else None
    return None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


_TORCH_DIR = os.path.dirname(torch.__file__)


def _failing_submodule(model: nn.Module, e: BaseException, skip: set[str]) -> str | None:
    """The innermost submodule of `model` whose own forward code raised `e` while tracing."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        name = names.get(id(owner)) if isinstance(owner, nn.Module) else None
        if name and name not in skip and not frame.f_code.co_filename.startswith(_TORCH_DIR):
            found = name
        tb = tb.tb_next
    return found


def trace(model: nn.Module, example_input: torch.Tensor, opaque: Iterable[str] = (),
          modules: dict[str, nn.Module] | None = None) -> fx.GraphModule:
    """Symbolically trace `model` and record every node's output shape (eval mode, no grad).
    modules: dict(model.named_modules()) if the caller has it at hand.

    A submodule whose code torch.fx cannot trace (data-dependent sizes or control flow) is
    traced as one opaque call instead, and the rest of the model around it as usual; the
    GraphModule's `netslim_untraceable` says which ({module: why}).
    """
    opaque = set(opaque)
    untraceable: dict[str, str] = {}
    while True:
        try:
            graph = Tracer(opaque).trace(model)
            break
        except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... for untraceable code
            name = _failing_submodule(model, e, opaque)
            if name is None:  # the model's own forward: nothing smaller to leave out
                raise PruneError(
                    f"torch.fx cannot trace the forward of {type(model).__name__} ({_first_line(e)}); "
                    "netslim needs a forward without data-dependent control flow or sizes at the top "
                    "level (inside a submodule it is fine: that module keeps its channels)") from None
            untraceable[name] = _first_line(e)
            opaque.add(name)
    gm = _GraphModule(model, graph)
    gm.netslim_untraceable = untraceable
    gm.netslim_opaque = frozenset(opaque)  # what was traced as one call (source_lines traces the same)
    if shapes_by_rule(gm, example_input, modules):  # no forward at all (most CNNs)
        return gm
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if not (_meta_is_cheaper(model, gm, example_input) and _propagate_on_meta(gm, example_input)):
                record_shapes(gm, example_input)  # one real forward at the example's size
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PruneError(f"running {type(model).__name__} on an example input of shape "
                         f"{tuple(example_input.shape)} failed ({first}); pass a matching example_input") from None
    finally:
        for m, t in modes.items():
            m.training = t
    return gm


try:  # A GraphModule that writes and compiles its forward's code only when first called: the
    # analysis reads the graph and runs it through record_shapes (node by node), never calls it.
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # a torch without it (a private name): the same module, compiled up front
    _GraphModule = fx.GraphModule

# A pass on the meta device costs about the same per node whatever the input (~0.08 ms, 1
# thread), a real forward about its arithmetic. Shapes go on meta when every conv weight
# applied at every position of the input (an upper bound of the MACs, known before any
# shape) exceeds this many per node. Measured at 3x32x32, real vs meta (s): ResNet-50 0.024
# vs 0.013 (136M per node), MobileNetV2 0.014 vs 0.013 (15M), DenseNet-121 0.025 vs 0.034
# (17M), VGG-11 0.014 vs 0.003 (286M); at 3x64x64 DenseNet-121 0.032 vs 0.030 (66M).
_META_CONV_WORK_PER_NODE = 40e6


def _meta_is_cheaper(model: nn.Module, gm: fx.GraphModule, example_input: torch.Tensor) -> bool:
    """Are `gm`'s shapes cheaper from a meta pass than from a real forward on `example_input`?"""
    if prefer_meta(example_input):  # a large example: always
        return True
    positions = example_input[0, 0].numel() if example_input.dim() > 2 else 1
    conv_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, _ConvNd))
    return conv_weights * positions > _META_CONV_WORK_PER_NODE * len(gm.graph.nodes)


class _ShapesOf(nn.Module):
    """Holds the traced model as a submodule, so functional_call can swap its weights for
    meta stand-ins (the user's model is not touched) while record_shapes walks it."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, x: torch.Tensor) -> Any:
        return record_shapes(self.gm, x)


def _propagate_on_meta(gm: fx.GraphModule, example_input: torch.Tensor) -> bool:
    """Record every node's output shape from a pass on the meta device (no arithmetic).
    False if the model needs real data there (`.item()`, a tensor made on the CPU in
    forward, NumPy...): the caller then runs the real forward."""
    holder = _ShapesOf(gm)
    state = {n: t.to("meta") for n, t in [*holder.named_parameters(), *holder.named_buffers()]}
    try:
        with MetaShapes():
            torch.func.functional_call(holder, state, (example_input.to("meta"),))
        return True
    except Exception:  # any failure on meta: the real forward decides (and reports errors)
        for node in gm.graph.nodes:  # what the pass recorded before it stopped
            node.meta.pop("tensor_meta", None)
        return False


_NO_INPUT = object()  # a placeholder past the example input (record_shapes)


def record_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> Any:
    """Run `gm` node by node on `example_input` and record every node's output in
    node.meta["tensor_meta"] as torch.fx's ShapeProp does (a TensorMetadata per tensor, in
    the structure of the result; no entry for a node that returns no tensor). Returns gm's output.

    The same calls as fx.Interpreter, without its per-node machinery (current-node context,
    argument checks, a memory-format search per tensor; memory_format is left None, as
    include_contiguity=False documents: only shapes are read). Measured, 1 thread, at 3x32x32:
    MobileNetV2 0.024 s vs ShapeProp's 0.037, DenseNet-121 0.039 vs 0.046. An error is the
    failing op's own (ShapeProp wraps it in a line naming the node, and prints it).
    """
    env: dict[fx.Node, Any] = {}
    inputs = iter((example_input,))
    for node, done_with in _steps(gm.graph):
        op, target = node.op, node.target
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if op == "placeholder":  # as fx.Interpreter: the next input, else the parameter's default
            value = list(inputs) if target.startswith("*") else next(inputs, _NO_INPUT)
            if value is _NO_INPUT:
                if not args:
                    raise RuntimeError(f"forward takes an argument {target} besides the example input")
                value = args[0]
        elif op == "get_attr":
            value = _attribute(gm, target)
        elif op == "call_module":
            value = _attribute(gm, target)(*args, **kwargs)
        elif op == "call_function":
            value = target(*args, **kwargs)
        elif op == "call_method":
            value = getattr(args[0], target)(*args[1:], **kwargs)
        else:  # output
            value = args[0]
        meta = _tensor_meta(value)
        if meta is not None:
            node.meta["tensor_meta"] = meta
        if op == "output":
            return value
        env[node] = value
        for gone in done_with:  # free what no later node reads (fx.Interpreter does too)
            del env[gone]


def _tensor_meta(value: Any) -> Any:
    """What ShapeProp records for a node that returns `value`: its TensorMetadata, or the
    structure of a tuple / list / dict with a TensorMetadata for each tensor in it; None if
    `value` holds no tensor."""
    if isinstance(value, torch.Tensor):
        return _extract_tensor_metadata(value, include_contiguity=False)
    if not isinstance(value, (tuple, list, dict, slice)):
        return None
    tensors = 0

    def one(v: Any) -> Any:
        nonlocal tensors
        if not isinstance(v, torch.Tensor):
            return v
        tensors += 1
        return _extract_tensor_metadata(v, include_contiguity=False)

    meta = fx.node.map_aggregate(value, one)
    return meta if tensors else None


def _steps(graph: fx.Graph) -> list[tuple[fx.Node, list[fx.Node]]]:
    """Every node of `graph` in order, with the inputs it is the last to read."""
    seen: set[fx.Node] = set()
    steps = []
    for node in reversed(graph.nodes):
        last = [a for a in node.all_input_nodes if a not in seen]
        seen.update(last)
        steps.append((node, last))
    steps.reverse()
    return steps


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    """gm's attribute at dotted path `target` (a submodule, parameter or buffer)."""
    value: Any = gm
    for name in target.split("."):
        value = getattr(value, name)
    return value


# Shapes by rule ----------------------------------------------------------------------------
# Most CNNs are made of a handful of ops whose output shape is a formula of their input's:
# conv, BatchNorm, activations, pooling, linear, sums, flatten, cat. For a graph of those
# alone the shapes come from the formulas, with no forward at all: MobileNetV2 at 3x32x32
# ~1 ms instead of a real forward's ~14 (ResNet-50: ~1 ms instead of the meta pass's ~17).
# Each rule checks what its op would check and answers None where it is not sure (an op or
# an argument it does not model, a mismatch the op would report): shapes_by_rule then
# records nothing and trace runs the forward as before, which records them or says what is wrong.

Shape = torch.Size


def shapes_by_rule(gm: fx.GraphModule, example_input: torch.Tensor,
                   modules: dict[str, nn.Module] | None = None) -> bool:
    """Record every node's tensor_meta from the shape rules, as record_shapes would (stride:
    a contiguous tensor's, which is what every listed op returns for a contiguous input).
    False, with nothing recorded, unless every node has a rule that answers: a float,
    contiguous CPU example, one placeholder, and no forward hook that could change a result.
    modules: the traced model's named_modules, if at hand (gm's submodules are the same)."""
    x = example_input
    if not (x.is_cpu and x.is_floating_point() and x.layout == torch.strided and x.is_contiguous()
            and not x.requires_grad and x.numel() > 0) or any(h is None or h for h in _GLOBAL_HOOKS):
        return False
    dtype = x.dtype  # every listed op keeps it (their weights must have it too)
    shapes: dict[fx.Node, Shape] = {}
    recorded = []
    for node in gm.graph.nodes:
        op = node.op
        if op == "placeholder":  # the example; not a second input, nor *args (a list of the example)
            shape = x.shape if not shapes and not node.target.startswith("*") else None
        elif op == "call_module":
            m = modules.get(node.target) if modules is not None else _attribute(gm, node.target)
            rule = _MODULE_SHAPES.get(type(m))
            x_node = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            shape = rule(m, shapes[x_node], dtype) if rule is not None and isinstance(x_node, fx.Node) \
                and x_node in shapes and _runs_its_class_forward(m) else None
        elif op == "call_function":
            rule = _FUNCTION_SHAPES.get(node.target) if isinstance(node.target, Hashable) else None
            shape = rule(node, shapes) if rule is not None else None
        elif op == "call_method":
            rule = _METHOD_SHAPES.get(node.target)
            shape = rule(node, shapes) if rule is not None else None
        elif op == "output":
            shape = shapes.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        else:  # get_attr
            shape = None
        if not shape or min(shape) < 1:  # no rule; a 0-d or an empty tensor (ops check those apart)
            return False
        shapes[node] = shape
        recorded.append(node)
    for node in recorded:
        shape = shapes[node]
        node.meta["tensor_meta"] = TensorMetadata(shape, dtype, False, _contiguous_stride(shape), None, False, {})
    return True


def _contiguous_stride(shape: Shape) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= n
    return tuple(reversed(stride))


# Hooks registered for every module (private dicts of torch.nn): any of them, or a name that
# moved (None), and the rules step aside, since a hook may change what a module returns.
_GLOBAL_HOOKS = [getattr(module_internals, name, None) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs")]


def _runs_its_class_forward(m: nn.Module) -> bool:
    """Does calling m run its class's forward alone: no forward of its own set on the instance,
    no hook that could change what it returns? (False if torch.nn renamed where hooks live.)"""
    return "forward" not in m.__dict__ and not (getattr(m, "_forward_hooks", True)
                                                or getattr(m, "_forward_pre_hooks", True))


_NOT_A_TENSOR = object()


def _tensor(m: nn.Module, name: str) -> Any:
    """m's parameter or buffer `name` (None if registered as None), without Module.__getattr__
    (1 us a read); _NOT_A_TENSOR if it is neither (a plain attribute: no rule)."""
    t = m._parameters.get(name, _NOT_A_TENSOR)
    return m._buffers.get(name, _NOT_A_TENSOR) if t is _NOT_A_TENSOR else t


def _fits(t: Any, dtype: torch.dtype, numel: int | None = None) -> bool:
    """Is `t` a tensor an op can use with a CPU input of `dtype` (and 1-D of `numel` entries)?"""
    return isinstance(t, torch.Tensor) and t.is_cpu and t.dtype == dtype and (
        numel is None or t.shape == (numel,))


def _ints(v: Any, n: int) -> tuple[int, ...] | None:
    """A kernel / stride / padding argument as n ints (one int, or a sequence of 1 or n)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    if isinstance(v, (tuple, list)) and len(v) in (1, n) and all(type(i) is int for i in v):
        return tuple(v) * (n // len(v))
    return None


def _conv_shape(m: nn.Module, x: Shape, dtype: torch.dtype) -> Shape | None:
    w, b = _tensor(m, "weight"), _tensor(m, "bias")
    if m.padding_mode != "zeros" or not _fits(w, dtype) or len(x) != w.dim() or x[1] != w.shape[1] * m.groups \
            or w.shape[0] % m.groups or (b is not None and not _fits(b, dtype, w.shape[0])):
        return None
    spatial = len(x) - 2
    stride, padding, dilation = _ints(m.stride, spatial), _ints(m.padding, spatial), _ints(m.dilation, spatial)
    if stride is None or padding is None or dilation is None \
            or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        return None
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1
           for n, k, s, p, d in zip(x[2:], w.shape[2:], stride, padding, dilation)]
    return Shape((x[0], w.shape[0], *out)) if min(out) >= 1 else None


def _linear_shape(m: nn.Module, x: Shape, dtype: torch.dtype) -> Shape | None:
    w, b = _tensor(m, "weight"), _tensor(m, "bias")
    if not _fits(w, dtype) or w.dim() != 2 or x[-1] != w.shape[1] \
            or (b is not None and not _fits(b, dtype, w.shape[0])):
        return None
    return Shape((*x[:-1], w.shape[0]))


_BN_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def _batchnorm_shape(m: nn.Module, x: Shape, dtype: torch.dtype) -> Shape | None:
    """In eval mode (as the forward trace runs): running statistics, which must be there."""
    if len(x) not in _BN_RANKS[type(m)]:
        return None
    c = x[1]
    w, b = _tensor(m, "weight"), _tensor(m, "bias")
    if not (_fits(_tensor(m, "running_mean"), dtype, c) and _fits(_tensor(m, "running_var"), dtype, c)
            and (w is None or _fits(w, dtype, c)) and (b is None or _fits(b, dtype, c))):
        return None
    return x


def _same_shape(m: nn.Module, x: Shape, dtype: torch.dtype) -> Shape | None:
    return x


def _gelu_shape(m: nn.Module, x: Shape, dtype: torch.dtype) -> Shape | None:
    return x if m.approximate in ("none", "tanh") else None


def _pooled(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """ATen's pooling_output_shape, or 0 where the pooling op refuses the arguments."""
    if k < 1 or s < 1 or d < 1 or p < 0 or p > k // 2 or p > ((k - 1) * d + 1) // 2:
        return 0
    out = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= n + p:  # the last window would start in the right padding
        out -= 1
    return max(out, 0)


def _pool2d_shape(x: Shape, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil: Any) -> Shape | None:
    kernel, padding, dilation = _ints(kernel, 2), _ints(padding, 2), _ints(dilation, 2)
    stride = kernel if stride is None or stride == [] or stride == () else _ints(stride, 2)
    if len(x) not in (3, 4) or None in (kernel, stride, padding, dilation) or type(ceil) is not bool:
        return None
    out = [_pooled(*a, ceil) for a in zip(x[-2:], kernel, stride, padding, dilation)]
    return Shape((*x[:-2], *out))  # a 0 in it: refused (shapes_by_rule)


def _max_pool_shape(m: nn.Module, x: Shape, dtype: torch.dtype) -> Shape | None:
    if m.return_indices:
        return None
    return _pool2d_shape(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


def _avg_pool_shape(m: nn.Module, x: Shape, dtype: torch.dtype) -> Shape | None:
    if m.divisor_override == 0:
        return None
    return _pool2d_shape(x, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)


def _adaptive_shape(x: Shape, size: Any) -> Shape | None:
    size = (size, size) if isinstance(size, int) else size
    if len(x) not in (3, 4) or not isinstance(size, (tuple, list)) or len(size) != 2 \
            or not all(s is None or type(s) is int and s > 0 for s in size):
        return None
    return Shape((*x[:-2], *(n if s is None else s for n, s in zip(x[-2:], size))))


def _flattened(x: Shape, start: Any, end: Any) -> Shape | None:
    rank = len(x)
    if type(start) is not int or type(end) is not int or not (-rank <= start < rank and -rank <= end < rank):
        return None  # a 0-d tensor too (no rule makes one)
    start, end = start % rank, end % rank
    if start > end:
        return None
    size = 1
    for n in x[start:end + 1]:
        size *= n
    return Shape((*x[:start], size, *x[end + 1:]))


_MODULE_SHAPES: dict[type, Callable[[nn.Module, Shape, torch.dtype], Shape | None]] = {
    nn.Conv1d: _conv_shape, nn.Conv2d: _conv_shape, nn.Conv3d: _conv_shape, nn.Linear: _linear_shape,
    **{bn: _batchnorm_shape for bn in _BN_RANKS},
    **{act: _same_shape for act in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                                    nn.LeakyReLU, nn.Identity, nn.Dropout)},
    nn.GELU: _gelu_shape, nn.MaxPool2d: _max_pool_shape, nn.AvgPool2d: _avg_pool_shape,
    nn.AdaptiveAvgPool2d: lambda m, x, dtype: _adaptive_shape(x, m.output_size),
    nn.Flatten: lambda m, x, dtype: _flattened(x, m.start_dim, m.end_dim),
}


def bound_args(node: fx.Node, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """node's arguments by parameter name (`names`, in order; `defaults` for those not given),
    or None if they do not fit (too many, or a keyword that is no parameter or repeats one)."""
    if len(node.args) > len(names) or not set(node.kwargs) <= set(names[len(node.args):]):
        return None
    return {**defaults, **dict(zip(names, node.args)), **node.kwargs}


def _tensor_then(names: Sequence[str], defaults: dict[str, Any], rule: Callable[..., Shape | None]) -> Callable:
    """A rule for a call whose first argument is the one tensor and the rest are constants."""
    def shape(node: fx.Node, shapes: dict[fx.Node, Shape]) -> Shape | None:
        args = bound_args(node, names, defaults)
        if args is None or not isinstance(args[names[0]], fx.Node) or args[names[0]] not in shapes \
                or not _constant([args[n] for n in names[1:]]):
            return None
        return rule(shapes[args[names[0]]], *(args[n] for n in names[1:]))
    return shape


def _constant(value: Any) -> bool:
    """Does `value` (an argument, nested or not) hold no graph node?"""
    nodes: list[fx.Node] = []
    fx.node.map_arg(value, nodes.append)
    return not nodes


def _elementwise(node: fx.Node, shapes: dict[fx.Node, Shape]) -> Shape | None:
    """relu(x), relu(x, inplace=True), sigmoid(x)...: one tensor, at most a bool flag."""
    flags = [*node.args[1:], *node.kwargs.values()]
    if not node.args or not isinstance(node.args[0], fx.Node) or len(flags) > 1 or set(node.kwargs) - {"inplace"} \
            or any(type(f) is not bool for f in flags):
        return None
    return shapes.get(node.args[0])


def _binary(node: fx.Node, shapes: dict[fx.Node, Shape]) -> Shape | None:
    """a + b, a * b, a - b: tensors (broadcast) and Python numbers (which keep a float dtype)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    operands = []
    for a in node.args:
        if isinstance(a, fx.Node):
            if a not in shapes:
                return None
            operands.append(shapes[a])
        elif type(a) not in (int, float):
            return None
    if not operands:
        return None
    if all(o == operands[0] for o in operands):  # a residual sum
        return operands[0]
    try:
        return Shape(torch.broadcast_shapes(*operands))
    except RuntimeError:  # shapes that do not broadcast: the op says so
        return None


def _cat(node: fx.Node, shapes: dict[fx.Node, Shape]) -> Shape | None:
    args = bound_args(node, ("tensors", "dim"), {"dim": 0})
    parts = args and args["tensors"]
    if not isinstance(parts, (tuple, list)) or not parts or type(args["dim"]) is not int \
            or not all(isinstance(p, fx.Node) and p in shapes for p in parts):
        return None
    first = shapes[parts[0]]
    if not -len(first) <= args["dim"] < len(first):
        return None
    dim = args["dim"] % len(first)
    if any(len(shapes[p]) != len(first) or shapes[p][:dim] != first[:dim] or shapes[p][dim + 1:] != first[dim + 1:]
           for p in parts):
        return None
    return Shape((*first[:dim], sum(shapes[p][dim] for p in parts), *first[dim + 1:]))


_FUNCTION_SHAPES: dict[Any, Callable[[fx.Node, dict[fx.Node, Shape]], Shape | None]] = {
    **{f: _binary for f in (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul)},
    **{f: _elementwise for f in (F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid,
                                 torch.tanh)},
    torch.cat: _cat,
    torch.flatten: _tensor_then(("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1}, _flattened),
    F.adaptive_avg_pool2d: _tensor_then(("input", "output_size"), {}, _adaptive_shape),
    F.avg_pool2d: _tensor_then(("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                "divisor_override"),
                               {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                                "divisor_override": None},
                               lambda x, k, s, p, ceil, include_pad, divisor:
                               None if divisor == 0 or type(include_pad) is not bool
                               else _pool2d_shape(x, k, s, p, 1, ceil)),
}
_METHOD_SHAPES: dict[str, Callable[[fx.Node, dict[fx.Node, Shape]], Shape | None]] = {
    "flatten": _tensor_then(("self", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1}, _flattened),
    "relu": _elementwise, "sigmoid": _elementwise,
}


def node_shape(node: Any):
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None



def source_lines(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """{node name: the Python stack that made it} for `gm`, the trace of `model`: traced again,
    recording them (the trace skips them for speed; an error message needs them)."""
    graph = Tracer(set(gm.netslim_opaque), stack_traces=True).trace(model)
    return {node.name: node.meta.get("stack_trace") or "" for node in graph.nodes}


def where(node: fx.Node | None, stack_trace: str | None = None) -> str:
    """' in module a.b at file.py:12 `code`' from what fx recorded about `node` (and its
    `stack_trace`, see source_lines), or ''."""
    if node is None:
        return ""
    out = ""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        out += f" in module {list(stack)[-1]}"
    lines = (stack_trace or node.meta.get("stack_trace") or "").splitlines()
    for k in range(len(lines) - 1, -1, -1):  # the innermost frame outside torch
        line = lines[k].strip()
        if line.startswith("File ") and _TORCH_DIR not in line:
            try:
                path = line.split('"')[1]
                lineno = line.split(", line ")[1].split(",")[0]
            except IndexError:
                break
            code = lines[k + 1].strip() if k + 1 < len(lines) else ""
            out += f" at {os.path.basename(path)}:{lineno}" + (f" `{code}`" if code else "")
            break
    return out

