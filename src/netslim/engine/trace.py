"""Step 1: trace the model with torch.fx and record every node's output shape.

Every BatchNorm is a leaf (the walk reads its factors), `list(x.chunk(2, 1))` is unpacked
when the part count is written in the code, and a submodule torch.fx cannot trace is traced
as one opaque call (its channels keep their width) instead of sinking the whole model.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
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

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, _BatchNorm) or qualname in self.opaque or rules.is_registered_leaf(m)
                or super().is_leaf_module(m, qualname))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _PartsProxy(node, self)

    def iter(self, obj: fx.Proxy):
        """`list(x.chunk(2, 1))`, `for part in x.split([a, b], 1)`: fx cannot iterate a Proxy
        (it only unpacks `a, b = ...`), but the part count is known when written in the code."""
        parts = _literal_part_count(obj.node)
        if parts is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(parts)])


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


def trace(model: nn.Module, example_input: torch.Tensor, opaque: Iterable[str] = ()) -> fx.GraphModule:
    """Symbolically trace `model` and record every node's output shape (eval mode, no grad).

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

