"""Channel-dependency analysis of a model: which channels can go, and what goes with them.

The model is traced with torch.fx and every tensor's channel dimension (dim 1) is given
one *slot* per channel. Ops then say how slots relate:

- channel-preserving ops (ReLU, pooling, dropout, depthwise conv, ...) pass slots through;
- `+`, `*`, `cat` on other dims tie the slots of their operands (union-find);
- `cat` on dim 1 concatenates slot lists, `flatten` turns C slots into C blocks of H*W
  features for the Linear behind it;
- `split` / `chunk` on dim 1 cut the slot list into equal parts and tie position j of
  every part, so each part keeps the same number of channels and the model's own
  `x.chunk(n, 1)` (or a split size computed from `x.size(1)`) cuts the slim tensor at
  the right places; parts of unequal or hard-coded size keep their width;
- conv / linear read slots (their input channels) and create fresh ones (their outputs).

A BatchNorm reads slots and creates fresh ones (its scaling factors, the candidates).
Then each BN is classified:

- owned: the BN is the only reader of its input (conv -> BN). Pruning its channel also
  removes the producer's output channel, so the input slots join the BN's class.
- tied: its input is read by others but is itself made only of other BN channels
  (depthwise chains, post-activation residual streams); the BN joins that class, so
  all of them are pruned together as one coupled group.
- gather: its input is a stream that must keep its width (a pre-activation residual
  stream, a DenseNet concatenation, the model input). The BN reads only its kept
  channels through an index and runs at the reduced width (`IndexedBatchNorm*`).

A *class* (a set of tied slots) is prunable when it holds BN channels of candidate BNs,
no pinned slot (model input/output, an op we cannot slice), and every value entering it
comes from a BN channel (so zeroing those factors zeroes the whole class: the slim model
then computes exactly what the masked model computes). Unknown ops on a BN's channel path
are an error that names the op and the way out (`exclude`), never a wrong model.
"""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .errors import PruneError
from .wrappers import unwrap_model


# ----------------------------------------------------------------------------------------
# The BatchNorm that reads a subset of its input's channels (the seed's channel selection,
# done without computing the BN at full width and without NumPy in forward).

def gather_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(1, index), in x's own memory layout ([N, C, ...] -> [N, len(index), ...]).

    On a channels-last tensor, index_select along dim 1 writes a contiguous (NCHW) result,
    a transposing copy that costs ~5x the gather, and the next conv has to transpose it back.
    Seen as its [N*H*W, C] matrix, the same gather is a row-wise index_select along the last
    dim, which stays channels-last (benchmarks/bench_inference.py measures both).
    """
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            n, c, *spatial = x.shape
            order = (0, *range(2, x.dim()), 1)                       # NCHW view -> NHWC (a view)
            rows = x.permute(order).reshape(-1, c)                   # [N*H*W, C], still a view
            y = rows.index_select(1, index).view(n, *spatial, index.numel())
            return y.permute(0, x.dim() - 1, *range(1, x.dim() - 1))  # NHWC -> NCHW view
    return x.index_select(1, index)


class _IndexedBatchNorm:
    """Mixin: gather `keep_index` channels of the input, then batch-normalise them."""

    keep_index: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(gather_channels(x, self.keep_index))  # [N, C_in, ...] -> [N, len(keep), ...]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reads {self.keep_index.numel()} input channels"


class IndexedBatchNorm1d(_IndexedBatchNorm, nn.BatchNorm1d):
    pass


class IndexedBatchNorm2d(_IndexedBatchNorm, nn.BatchNorm2d):
    pass


class IndexedBatchNorm3d(_IndexedBatchNorm, nn.BatchNorm3d):
    pass


INDEXED_BN = {nn.BatchNorm1d: IndexedBatchNorm1d, nn.BatchNorm2d: IndexedBatchNorm2d,
              nn.BatchNorm3d: IndexedBatchNorm3d}


class IndexedSyncBatchNorm(_IndexedBatchNorm, nn.SyncBatchNorm):
    pass


def is_indexed_bn(m: nn.Module) -> bool:
    return isinstance(m, _IndexedBatchNorm)


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm that keeps the channel gather of slim models.

    torch's conversion builds a plain SyncBatchNorm from every BN and so drops the
    `keep_index` of an IndexedBatchNorm (the model would then normalise the wrong
    channels); here an IndexedBatchNorm becomes an IndexedSyncBatchNorm with the same
    index. Parameters and buffers are shared with the original, as torch does.
    """
    if isinstance(model, _BatchNorm) and not isinstance(model, nn.SyncBatchNorm):
        cls = IndexedSyncBatchNorm if is_indexed_bn(model) else nn.SyncBatchNorm
        new = cls(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats,
                  process_group)
        if model.affine:
            new.weight, new.bias = model.weight, model.bias
        new.running_mean, new.running_var = model.running_mean, model.running_var
        new.num_batches_tracked = model.num_batches_tracked
        if is_indexed_bn(model):
            new.register_buffer("keep_index", model.keep_index)
        new.train(model.training)
        for key, hook in model._forward_pre_hooks.items():  # e.g. the mask's gradient guard
            new._forward_pre_hooks[key] = hook
        for key, buf in model._buffers.items():
            if key not in new._buffers:
                new._buffers[key] = buf
                if key in model._non_persistent_buffers_set:
                    new._non_persistent_buffers_set.add(key)
        model = new
    for name, child in list(model.named_children()):
        model.add_module(name, convert_sync_batchnorm(child, process_group))
    return model


# ----------------------------------------------------------------------------------------
# Op tables. "Zero-preserving" matters: a pruned (masked) channel is all zeros, and the
# slim model simply drops it, so every op between a BN and the next conv must map 0 to 0.

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.RReLU,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)
# AlphaDropout maps 0 to non-zero values in training only; the invariant (slim == masked)
# is about eval, where every dropout is the identity.
# Channel-preserving but f(0) != 0: a masked channel would not stay zero behind them.
_NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)

_PASS_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardtanh, torch.tanh, F.tanh, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
    torch.clone, torch.Tensor.contiguous,
}
_PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "detach", "float", "half", "bfloat16",
                 "double", "to", "tanh", "tanh_"}
# Norms whose statistics span several channels: their inputs and outputs keep their width.
_CHANNEL_MIXING_NORMS = (nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d)
_CHANNEL_MIXING_FUNCTIONS = {F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm,
                             F.local_response_norm, F.normalize}
_NONZERO_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp}
_NONZERO_METHODS = {"sigmoid", "sigmoid_", "exp"}

_ADD_OPS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_OPS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_DIV_OPS = {operator.truediv, operator.itruediv, torch.div}
_DIV_METHODS = {"div", "div_"}
_CAT_OPS = {torch.cat, torch.concat}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk}
_SPLIT_METHODS = {"split", "chunk"}


# ----------------------------------------------------------------------------------------
# Analysis result

def _find(parent: list[int], s: int) -> int:
    """Union-find root of slot `s`, halving the path on the way."""
    while parent[s] != s:
        parent[s] = parent[parent[s]]
        s = parent[s]
    return s


@dataclass
class ChannelInfo:
    """Slots of a tensor's channel dim; `block` consecutive features per slot after flatten."""
    slots: list[int]
    block: int = 1


@dataclass
class _Grid:
    """The channels of x.view(N, g, C // g, ...) as a g x (C // g) grid of slots (dims 1, 2);
    a channel shuffle transposes it and flattens it back (torchvision's ShuffleNet)."""
    rows: list[list[int]]

    def slots(self) -> list[int]:
        return [s for row in self.rows for s in row]

    def transposed(self) -> "_Grid":
        return _Grid([list(col) for col in zip(*self.rows)])


@dataclass
class ModuleUse:
    """How one parametrised module touches slots; what the surgery needs to slice it."""
    name: str
    kind: str                      # conv | gconv (grouped) | dwconv | linear | bn | bn_passive
    in_slots: list[int] = field(default_factory=list)
    out_slots: list[int] = field(default_factory=list)
    in_block: int = 1
    bn_mode: str = ""              # owned | tied | gather (BN only)
    gather_index: list[int] | None = None   # BN: input position read by channel j
    input_slots: list[int] = field(default_factory=list)  # BN: slots of its whole input tensor


@dataclass
class AttrUse:
    """A per-channel tensor attribute (layer scale...) multiplied into a channel path."""
    target: str                    # its path on the model, e.g. "blocks.0.gamma"
    dim: int                       # the tensor's dimension that holds the channels
    slots: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _AttrRef:
    """A get_attr value (or a view of it) that is a vector in disguise: one dim of size > 1."""
    target: str
    dim: int


@dataclass
class Unit:
    """One prunable class: BN channels that live or die together, scored as a group."""
    root: int
    bn_channels: list[tuple[str, int]]       # (bn name, channel index)
    layer: tuple[str, ...]                   # the BN modules involved: the "layer" for guards


@dataclass
class Analysis:
    modules: dict[str, ModuleUse]
    units: list[Unit]
    unprunable: dict[str, str]               # bn name -> why its channels stay
    bn_names: list[str]                      # every affine BN, in graph order
    parent: list[int]                        # union-find over slots (resolved)
    # (follower slot, leader slot): the follower's class goes when the leader's does (a gate
    # and its producer, whose values only ever reach a product with the leader's channels)
    follows: list[tuple[int, int]] = field(default_factory=list)
    attrs: dict[str, AttrUse] = field(default_factory=dict)  # per-channel tensors to slice
    untraceable: dict[str, str] = field(default_factory=dict)  # module traced as one call -> why

    def find(self, s: int) -> int:
        return _find(self.parent, s)

    def coupled_layers(self) -> list[tuple[str, ...]]:
        return sorted({u.layer for u in self.units if len(u.layer) > 1})


# ----------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """Treats every BatchNorm (ours included) and every excluded module as a leaf."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque = opaque
        self.record_stack_traces = True  # source lines for the errors (node.meta["stack_trace"])

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or qualname in self.opaque or super().is_leaf_module(m, qualname)

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
            graph = _Tracer(opaque).trace(model)
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
    gm = fx.GraphModule(model, graph)
    gm.netslim_untraceable = untraceable
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            # One real forward at the example's size. Measured (1 thread): faster than fake
            # or meta tensors, whose per-op Python overhead and model copy dominate, on every
            # model tried: 0.04 s vs 1.4 s (fake) for a 24-block CIFAR ResNet, 1.0 s vs 1.3 s
            # for ResNet-50 at 224 (BENCHMARKS.md, analysis time).
            ShapeProp(gm).propagate(example_input)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PruneError(f"running {type(model).__name__} on an example input of shape "
                         f"{tuple(example_input.shape)} failed ({first}); pass a matching example_input") from None
    finally:
        for m, t in modes.items():
            m.training = t
    return gm


def _keeps_channel_dim(idx: Any, shape: tuple | None) -> bool:
    """Does tensor indexing `x[idx]` leave dim 1 whole and in place?"""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if shape is None or any(isinstance(i, fx.Node) or i is None for i in idx) \
            or sum(i is Ellipsis for i in idx) > 1:
        return False
    if any(i is Ellipsis for i in idx):
        k = next(n for n, i in enumerate(idx) if i is Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(shape) - len(idx) + 1) + idx[k + 1:]
    idx = idx + (slice(None),) * (len(shape) - len(idx))
    return len(idx) >= 2 and isinstance(idx[0], slice) and idx[1] == slice(None)


def _show_index(idx: Any) -> str:
    def one(i):
        if isinstance(i, slice):
            return ":".join("" if v is None else str(v) for v in (i.start, i.stop)) + \
                (f":{i.step}" if i.step is not None else "")
        return "..." if i is Ellipsis else str(i)
    return "x[" + ", ".join(one(i) for i in (idx if isinstance(idx, tuple) else (idx,))) + "]"


_RESHAPE_ONLY = {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "to", "float", "half",
                 "double", "contiguous", "clone", torch.reshape, torch.unsqueeze, torch.squeeze}


def _only_reshapes(node: fx.Node) -> bool:
    """Does `node` only change the shape of its first argument (a view, an index of None/:)?"""
    if node.target is operator.getitem and len(node.args) > 1:
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in idx)
    return node.op in ("call_method", "call_function") and node.target in _RESHAPE_ONLY


def _shape(node: Any):
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Analyzer:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, exclude: set[str]):
        self.model = model
        self.gm = gm
        self.exclude = exclude
        # modules traced as one opaque call: {name: why}; their channels keep their width
        self.opaque = {n: f"excluded module {n}" for n in exclude}
        self.opaque.update({n: f"module {n}, which torch.fx cannot trace ({why})"
                            for n, why in getattr(gm, "netslim_untraceable", {}).items()})
        self.blockers: dict[str, fx.Node] = {}  # fatal pin reason -> the node that raised it
        self.mods = dict(model.named_modules())
        self.parent: list[int] = []
        self.origin: dict[int, list[tuple]] = {}   # slot -> [(kind, name, j)], kind: bn | free
        self.readers: dict[int, list[tuple]] = {}  # slot -> [(kind, name, j)]
        self.pins: dict[int, list[tuple[bool, str]]] = {}  # slot -> [(fatal, reason)]
        self.chans: dict[fx.Node, Any] = {}
        self.uses: dict[str, ModuleUse] = {}
        self.bn_order: list[str] = []
        self.calls: dict[str, int] = {}
        # x * g where only x holds BN channels: (g's slots, x's slots, node), resolved later
        self.gates: list[tuple[list[int], list[int], str]] = []
        # sigmoid-like outputs: (their slots, their input's slots, why they are not zero)
        self.derived: list[tuple[list[int], list[int], str]] = []
        self.attr_refs: dict[fx.Node, _AttrRef] = {}
        self.attr_uses: dict[str, AttrUse] = {}

    # union-find -------------------------------------------------------------------------
    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, s: int) -> int:
        return _find(self.parent, s)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def pin(self, slots: Iterable[int], reason: str, fatal: bool = False) -> None:
        for s in slots:
            self.pins.setdefault(s, []).append((fatal, reason))

    def fresh(self, node: fx.Node, reason: str | None = None, fatal: bool = False) -> Any:
        """New slots for every channel-carrying tensor `node` returns (pinned if reason)."""
        def one(shape):
            if shape is None or len(shape) < 2:
                return None
            slots = self.new(int(shape[1]))
            if reason:
                self.pin(slots, reason, fatal)
            for s in slots:  # values from outside any BatchNorm
                self.origin.setdefault(s, []).append(("free", str(node.name), 0))
            return ChannelInfo(slots)
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # several outputs
            return tuple(one(tuple(m.shape)) if hasattr(m, "shape") else None for m in meta)
        return one(_shape(node))

    # ------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.chans[node] = self.visit(node)
            self.track_attr(node)

    def track_attr(self, node: fx.Node) -> None:
        """Follow a tensor attribute with one non-trivial dim through views of it."""
        if node.op == "get_attr":
            # A parameter or buffer of the model. fx also stores tensors the code creates as
            # plain attributes (_tensor_constant0): the slim model would create them unchanged.
            owner_name, _, attr = str(node.target).rpartition(".")
            owner = self.mods.get(owner_name)
            t = None
            if owner is not None and (attr in owner._parameters or attr in owner._buffers):
                t = getattr(owner, attr)
            if torch.is_tensor(t):
                big = [d for d, n in enumerate(t.shape) if n > 1]
                if len(big) == 1:
                    self.attr_refs[node] = _AttrRef(str(node.target), big[0])
        elif node.args and node.args[0] in self.attr_refs and _only_reshapes(node):
            self.attr_refs[node] = self.attr_refs[node.args[0]]

    def info(self, arg) -> ChannelInfo | None:
        if isinstance(arg, fx.Node):
            c = self.chans.get(arg)
            return c if isinstance(c, ChannelInfo) else None
        return None

    def tensor_inputs(self, node: fx.Node) -> list[ChannelInfo]:
        out = []
        for a in node.all_input_nodes:
            c = self.chans.get(a)
            if isinstance(c, ChannelInfo):
                out.append(c)
            elif isinstance(c, tuple):
                out.extend(x for x in c if isinstance(x, ChannelInfo))
            elif isinstance(c, _Grid):
                out.append(ChannelInfo(c.slots()))
        return out

    def unknown(self, node: fx.Node, what: str, fatal: bool = True) -> Any:
        """An op whose channel semantics we do not know: its inputs and outputs keep their width."""
        reason = f"{what} (node {node.name})"
        if fatal:
            self.blockers[reason] = node
        for c in self.tensor_inputs(node):
            self.pin(c.slots, reason, fatal)
        return self.fresh(node, reason, fatal)

    def visit(self, node: fx.Node) -> Any:
        op = node.op
        if op == "placeholder":
            return self.fresh(node, "model input")
        if op == "get_attr":
            return self.fresh(node, f"tensor attribute {node.target}")
        if op == "output":
            for c in self.tensor_inputs(node):
                self.pin(c.slots, "model output")
            return None
        if op == "call_module":
            return self.visit_module(node, self.mods[node.target])
        if op in ("call_function", "call_method") and node.args and \
                isinstance(self.chans.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None, _Grid):
            return self.grid_op(node, self.chans[node.args[0]])
        if op == "call_function":
            return self.visit_function(node)
        if op == "call_method":
            return self.visit_method(node)
        return self.unknown(node, f"op {op}")

    # modules ----------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, m: nn.Module) -> Any:
        name = node.target
        x = self.info(node.args[0]) if node.args else None
        if name in self.opaque and not isinstance(m, _BatchNorm):
            return self.unknown(node, self.opaque[name], fatal=False)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, _BatchNorm, _InstanceNorm)):
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1 or name in self.uses:
                # A weight-shared module called twice: its two call sites would have to agree.
                use = self.uses.pop(name, None)
                if use:
                    self.pin(use.in_slots + use.out_slots, f"module {name} is called more than once")
                return self.unknown(node, f"module {name} is called more than once", fatal=False)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.conv(node, name, m, x)
        if isinstance(m, nn.Linear):
            return self.linear(node, name, m, x)
        if isinstance(m, _BatchNorm):
            return self.batchnorm(node, name, m, x)
        if isinstance(m, _InstanceNorm):
            return self.instancenorm(node, name, m, x)
        if isinstance(m, _CHANNEL_MIXING_NORMS):
            return self.unknown(node, f"{type(m).__name__} {name} normalises across channels", fatal=False)
        if isinstance(m, nn.LayerNorm):
            return self.layernorm(node, name, m, x)
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, _PASS_MODULES):
            return self.passthrough(node, x)
        if isinstance(m, _NONZERO_MODULES):
            return self.nonzero(node, x, f"{type(m).__name__} {name} maps 0 to a non-zero value")
        return self.unknown(node, f"module {name} ({type(m).__name__})")

    def passthrough(self, node: fx.Node, x: ChannelInfo | None) -> Any:
        """An op that keeps every channel where it is (activation, pooling, dropout...)."""
        if x is None:
            return self.fresh(node)
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            if x.block == 1 and shape[1] == len(x.slots):
                return x
            if x.block > 1 and len(shape) == 2 and shape[1] == len(x.slots) * x.block:
                return x  # e.g. dropout between flatten and the classifier
        return self.unknown(node, f"op {node.target} changes the channel layout")

    def conv(self, node, name, m, x: ChannelInfo | None):
        if x is None or x.block != 1 or len(x.slots) != m.in_channels:
            return self.unknown(node, f"conv {name} input")
        if m.groups == 1:
            out = self.new(m.out_channels)
            for j, s in enumerate(x.slots):
                self.readers.setdefault(s, []).append(("conv", name, j))
            for j, s in enumerate(out):
                self.origin.setdefault(s, []).append(("free", name, j))
            self.uses[name] = ModuleUse(name, "conv", list(x.slots), out)
            return ChannelInfo(out)
        if m.groups == m.in_channels == m.out_channels:
            # Depthwise: output channel j is input channel j scaled; they live and die together.
            if m.bias is not None:
                for j, s in enumerate(x.slots):  # a bias makes a zeroed input channel non-zero
                    self.origin.setdefault(s, []).append(("free", name, j))
            self.uses[name] = ModuleUse(name, "dwconv", list(x.slots), list(x.slots))
            return ChannelInfo(list(x.slots))
        # Grouped: every group must keep as many input (and output) channels as the others,
        # so the conv stays a valid grouped conv with the same `groups`. Position j of every
        # group is tied into one slot class: they are kept or removed together.
        g = m.groups
        out = self.new(m.out_channels)
        for slots in (x.slots, out):
            per = len(slots) // g
            for i in range(1, g):
                for j in range(per):
                    self.union(slots[j], slots[i * per + j])
        for j, s in enumerate(x.slots):
            self.readers.setdefault(s, []).append(("conv", name, j))
        for j, s in enumerate(out):
            self.origin.setdefault(s, []).append(("free", name, j))
        self.uses[name] = ModuleUse(name, "gconv", list(x.slots), out)
        return ChannelInfo(out)

    def linear(self, node, name, m, x: ChannelInfo | None):
        in_shape = _shape(node.args[0])
        if x is None or in_shape is None or len(in_shape) != 2 or len(x.slots) * x.block != m.in_features:
            if x is not None:
                self.pin(x.slots, f"linear {name} reads a tensor whose features are not its channels")
            return self.fresh(node, f"linear {name} output on a non-channel layout")
        out = self.new(m.out_features)
        for j, s in enumerate(x.slots):
            self.readers.setdefault(s, []).append(("linear", name, j))
        for j, s in enumerate(out):
            self.origin.setdefault(s, []).append(("free", name, j))
        self.uses[name] = ModuleUse(name, "linear", list(x.slots), out, in_block=x.block)
        return ChannelInfo(out)

    def batchnorm(self, node, name, m, x: ChannelInfo | None):
        if x is None or x.block != 1:
            return self.unknown(node, f"batchnorm {name} input")
        if m.weight is None:
            # Non-affine BN: no scaling factor to judge by; it only follows its input. In eval
            # it maps a zeroed channel to -running_mean / sqrt(running_var + eps), not to 0.
            if m.running_mean is not None:
                self.pin(x.slots, f"non-affine BatchNorm {name} maps 0 to -running_mean/sqrt(running_var+eps), "
                                  "not to 0")
            return self.passive_norm(name, x)
        index = m.keep_index.tolist() if is_indexed_bn(m) else list(range(len(x.slots)))
        if len(index) != m.num_features or (not is_indexed_bn(m) and len(x.slots) != m.num_features):
            return self.unknown(node, f"batchnorm {name} input")
        out = self.new(m.num_features)
        for j, s in enumerate(out):
            self.origin.setdefault(s, []).append(("bn", name, j))
        for j, i in enumerate(index):
            self.readers.setdefault(x.slots[i], []).append(("bn", name, j))
        self.uses[name] = ModuleUse(name, "bn", [x.slots[i] for i in index], out,
                                    bn_mode="gather" if is_indexed_bn(m) else "", gather_index=index,
                                    input_slots=list(x.slots))
        self.bn_order.append(name)
        return ChannelInfo(out)

    def passive_norm(self, name: str, x: ChannelInfo) -> ChannelInfo:
        """A per-channel norm without scaling factors: follows its input, sliced with it."""
        self.uses[name] = ModuleUse(name, "bn_passive", list(x.slots), list(x.slots))
        return ChannelInfo(list(x.slots))

    def instancenorm(self, node, name, m, x: ChannelInfo | None):
        """Per-sample, per-channel statistics: a zero channel stays 0 unless an affine shift
        or running statistics (used in eval) move it."""
        if x is None or x.block != 1 or len(x.slots) != m.num_features:
            return self.unknown(node, f"{type(m).__name__} {name} input")
        if m.affine or m.track_running_stats:
            self.pin(x.slots, f"{type(m).__name__} {name} maps 0 to a non-zero value "
                              "(affine shift or running statistics)")
        return self.passive_norm(name, x)

    def layernorm(self, node, name, m, x: ChannelInfo | None):
        shape = _shape(node.args[0]) if node.args else None
        if x is None:
            return self.fresh(node)
        if shape is None or len(shape) - len(m.normalized_shape) <= 1:
            return self.unknown(node, f"LayerNorm {name} normalises across channels", fatal=False)
        if m.bias is not None:  # normalises within a channel, then shifts: 0 -> bias
            self.pin(x.slots, f"LayerNorm {name} adds a bias: it maps 0 to a non-zero value")
        return self.passthrough(node, x)

    def flatten(self, node, x: ChannelInfo | None, start: int, end: int):
        shape_in = _shape(node.args[0] if node.args else None)
        if x is None:
            return self.fresh(node)
        if shape_in is None or x.block != 1:
            return self.unknown(node, "flatten")
        nd = len(shape_in)
        start = start % nd
        end = end % nd
        if start >= 2:
            return self.passthrough(node, x)
        if start == 1 and end == nd - 1:
            block = 1
            for d in shape_in[2:]:
                block *= int(d)
            return ChannelInfo(x.slots, block)
        return self.unknown(node, f"flatten({start}, {end}) mixes the channel dimension")

    # functions / methods ----------------------------------------------------------------
    def visit_function(self, node: fx.Node) -> Any:
        t = node.target
        args = node.args
        if t in _PASS_FUNCTIONS:
            return self.passthrough(node, self.info(args[0]))
        if t in _NONZERO_FUNCTIONS:
            return self.nonzero(node, self.info(args[0]), f"{getattr(t, '__name__', t)} maps 0 to a non-zero value")
        if t in _CHANNEL_MIXING_FUNCTIONS:  # functional norms: weights come as tensors we do not slice
            return self.unknown(node, f"{t.__name__} normalises with tensors netslim does not slice", fatal=False)
        if t in _ADD_OPS:
            return self.binary(node, args[:2], additive=True)
        if t in _MUL_OPS:
            return self.product(node, args[:2])
        if t in _DIV_OPS:
            if not isinstance(args[1], fx.Node):
                return self.passthrough(node, self.info(args[0]))
            return self.unknown(node, "division by a tensor")
        if t in _CAT_OPS:
            tensors = args[0] if args else node.kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return self.cat(node, tensors, dim)
        if t is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, self.info(args[0]), start, end)
        if t in _REDUCE_FUNCTIONS:
            return self.reduce(node)
        if t is operator.getitem:
            return self.getitem(node)
        if t in _SPLIT_FUNCTIONS:
            return self.split(node)
        if t is getattr or _shape(node) is None and not self.tensor_inputs(node):
            return self.fresh(node)
        if _shape(node) is None and node.meta.get("tensor_meta") is None:
            return None  # a size, a shape, a python value
        return self.unknown(node, f"function {getattr(t, '__name__', t)}")

    def visit_method(self, node: fx.Node) -> Any:
        t = node.target
        x = self.info(node.args[0]) if node.args else None
        if t in ("size", "dim", "numel") or (node.meta.get("tensor_meta") is None and x is None):
            return None
        if t in _PASS_METHODS:
            return self.passthrough(node, x)
        if t in _NONZERO_METHODS:
            return self.nonzero(node, x, f"{t} maps 0 to a non-zero value")
        if t in _ADD_METHODS:
            return self.binary(node, node.args[:2], additive=True)
        if t in _MUL_METHODS:
            return self.product(node, node.args[:2])
        if t in _DIV_METHODS and len(node.args) > 1 and not isinstance(node.args[1], fx.Node):
            return self.passthrough(node, x)
        if t in _REDUCE_METHODS:
            return self.reduce(node)
        if t in _RESHAPE_METHODS:
            return self.reshape(node, x)
        if t in _SPLIT_METHODS:
            return self.split(node)
        return self.unknown(node, f"method .{t}()")

    def binary(self, node, operands, additive: bool):
        out_shape = _shape(node)
        if out_shape is None:
            return None
        infos = []
        for a in operands:
            if isinstance(a, fx.Node):
                c = self.info(a)
                s = _shape(a)
                if c is not None and s is not None and len(s) == len(out_shape) and len(s) >= 2 \
                        and s[1] == out_shape[1]:
                    infos.append(c)
                elif additive and s is not None and len(s) > 0:
                    # adding a tensor broadcast over channels: zero channels become non-zero
                    infos.append(None)
                    for c2 in self.tensor_inputs(node):
                        self.pin(c2.slots, f"{node.name} adds a tensor broadcast over channels")
            elif additive and a not in (0, 0.0):
                for c2 in self.tensor_inputs(node):
                    self.pin(c2.slots, f"{node.name} adds the constant {a}")
        infos = [c for c in infos if c is not None]
        if not infos:
            return self.fresh(node)
        first = infos[0]
        for c in infos[1:]:
            if len(c.slots) != len(first.slots) or c.block != first.block:
                return self.unknown(node, f"{node.name} combines tensors of different channel layouts")
            for a, b in zip(first.slots, c.slots):
                self.union(a, b)
        return first

    def nonzero(self, node: fx.Node, x: ChannelInfo | None, reason: str) -> Any:
        """A channel-wise op with f(0) != 0 (sigmoid...). Its output gets slots of its own: if
        it only ever gates a product with BN channels, those channels stay prunable; if anything
        else reads it, resolve_gates ties it back to its input, which then keeps its channels."""
        out = self.passthrough(node, x)
        if x is None or out is not x:
            return out
        slots = self.new(len(x.slots))
        for j, s in enumerate(slots):
            self.origin[s] = [("derived", str(node.name), j)]
        self.derived.append((slots, list(x.slots), f"{reason} ({node.name})"))
        return ChannelInfo(slots, x.block)

    def product(self, node: fx.Node, operands) -> Any:
        """x * y honouring broadcasting. A product is zero wherever one factor is: when exactly
        one operand holds BN channels, the other is a gate that follows those channels (its
        producer is sliced with them), and a per-channel tensor attribute (layer scale) is
        sliced with them too."""
        out_shape = _shape(node)
        if out_shape is None or len(out_shape) < 2:
            return self.binary(node, operands, additive=False)
        width = int(out_shape[1])
        infos: list[ChannelInfo] = []
        attrs: list[_AttrRef] = []
        for a in operands:
            shape = _shape(a) if isinstance(a, fx.Node) else None
            if shape is None:
                continue  # a Python number or a non-tensor: scales every channel alike
            d = len(shape) - len(out_shape) + 1  # the operand's dim broadcast onto the channels
            per_channel = width > 1 and 0 <= d < len(shape) and int(shape[d]) == width
            c = self.info(a)
            if per_channel and a in self.attr_refs:
                attrs.append(self.attr_refs[a])
            elif per_channel and c is not None and len(shape) == len(out_shape):
                infos.append(c)
            elif per_channel:
                return self.unknown(node, f"{node.name} multiplies by a per-channel tensor netslim cannot slice")
            # else: broadcast over the channels; a zero channel stays zero
        if not infos:
            return self.fresh(node, f"{node.name}: a product of per-channel tensors netslim does not follow"
                              if attrs else None)
        first = infos[0]
        if any(c.block != first.block or len(c.slots) != len(first.slots) for c in infos):
            return self.unknown(node, f"{node.name} combines tensors of different channel layouts")
        carriers = [c for c in infos if self.from_bn(c)]
        if len(carriers) == 1 and len(infos) > 1:
            out = carriers[0]
            for c in infos:
                if c is not out:
                    self.gates.append((list(c.slots), list(out.slots), str(node.name)))
        else:
            out = first
            for c in infos[1:]:
                for a, b in zip(first.slots, c.slots):
                    self.union(a, b)
        for ref in attrs:
            self.attr_use(ref, out.slots)
        return out

    def from_bn(self, c: ChannelInfo) -> bool:
        return any(o[0] == "bn" for s in c.slots for o in self.origin.get(s, ()))

    def attr_use(self, ref: _AttrRef, slots: list[int]) -> None:
        prev = self.attr_uses.get(ref.target)
        if prev is None:
            self.attr_uses[ref.target] = AttrUse(ref.target, ref.dim, list(slots))
        else:  # one tensor scaling two paths: their channels go together
            for a, b in zip(prev.slots, slots):
                self.union(a, b)

    def cat(self, node, tensors, dim):
        infos = [self.info(t) for t in tensors]
        out_shape = _shape(node)
        if out_shape is None or any(c is None for c in infos):
            return self.unknown(node, "torch.cat of non-tensors")
        dim = dim % len(out_shape)
        if dim == 1:
            if any(c.block != 1 for c in infos):
                return self.unknown(node, "torch.cat of flattened features")
            return ChannelInfo([s for c in infos for s in c.slots])
        first = infos[0]
        for c in infos[1:]:
            for a, b in zip(first.slots, c.slots):
                self.union(a, b)
        return first

    def split(self, node):
        """torch.split / torch.chunk / x.split / x.chunk: a tuple of parts of the input's slots."""
        x = self.info(node.args[0]) if node.args else None
        shape_in = _shape(node.args[0]) if node.args else None
        meta = node.meta.get("tensor_meta")
        if x is None or shape_in is None or not isinstance(meta, (tuple, list)) or hasattr(meta, "shape"):
            return self.unknown(node, f"{node.name}: a split netslim cannot follow")
        shapes = [tuple(m.shape) for m in meta]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int):
            return self.unknown(node, f"{node.name}: split along a computed dimension")
        dim %= len(shape_in)
        if dim != 1:  # along batch or space: every part has all the channels
            return tuple(x for _ in shapes)
        if x.block != 1:
            return self.unknown(node, f"{node.name}: split of flattened features")
        sizes = [int(sh[1]) for sh in shapes]
        parts, start = [], 0
        for n in sizes:
            parts.append(x.slots[start:start + n])
            start += n
        how = node.args[1] if len(node.args) > 1 else (node.kwargs.get("chunks") or
                                                        node.kwargs.get("split_size_or_sections") or
                                                        node.kwargs.get("split_size"))
        is_chunk = node.target in (torch.chunk, "chunk")
        # The slim model runs the same forward code on a narrower tensor. chunk(n) cuts it into
        # equal parts, and so does a split size computed from the tensor (an fx node); a size
        # written in the code (an int or a list) would cut the slim tensor in the wrong places.
        follows_width = is_chunk or isinstance(how, fx.Node)
        if follows_width and len(set(sizes)) == 1:
            for part in parts[1:]:
                for a, b in zip(parts[0], part):
                    self.union(a, b)
        else:
            why = "unequal parts" if len(set(sizes)) > 1 else "a size written in the code"
            self.pin(x.slots, f"{node.name} splits the channels into {why} {sizes}; they keep their width")
        return tuple(ChannelInfo(part) for part in parts)

    def reduce(self, node):
        x = self.info(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        shape_in = _shape(node.args[0])
        if x is None:
            return self.fresh(node)
        if dims is None or shape_in is None:
            return self.unknown(node, f"{node.name} reduces over the channel dimension")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % len(shape_in) for d in dims]
        if 1 in dims or 0 in dims:
            return self.unknown(node, f"{node.name} reduces over the channel dimension")
        return self.passthrough(node, x)

    def getitem(self, node):
        src = self.chans.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        idx = node.args[1]
        if isinstance(src, tuple) and isinstance(idx, int):
            return src[idx]
        if isinstance(src, ChannelInfo):
            if _keeps_channel_dim(idx, _shape(node.args[0])):  # batch / spatial indexing only
                return self.passthrough(node, src)
            # x[:, :d] (DPN) cuts at a position the slim model would not move: like a split
            # with written sizes, those channels keep their width; the rest is still pruned.
            return self.unknown(node, f"{node.name} indexes the channels ({_show_index(idx)}); "
                                      "they keep their width", fatal=False)
        return self.fresh(node) if node.meta.get("tensor_meta") is not None else None

    def grid_op(self, node: fx.Node, grid: _Grid) -> Any:
        """transpose(1, 2) / permute(0, 2, 1, ...) / contiguous / flatten back of a channel grid."""
        t, nd = node.target, len(_shape(node.args[0]) or ())
        rest = list(node.args[1:])
        if t in ("contiguous", "clone", torch.clone):
            return grid
        if t in ("transpose", torch.transpose) and len(rest) == 2 and sorted(d % nd for d in rest) == [1, 2]:
            return grid.transposed()
        if t in ("permute", torch.permute):
            dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            if [d % nd for d in dims] == [0, 2, 1, *range(3, nd)]:
                return grid.transposed()
        if t in ("view", "reshape", torch.reshape, "flatten", torch.flatten):
            shape_in, shape_out = _shape(node.args[0]), _shape(node)
            if t in ("flatten", torch.flatten):
                merges = rest[:2] == [1, 2]
            else:
                sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
                merges = len(sizes) >= 2 and not (isinstance(sizes[1], int) and sizes[1] != -1)
            if merges and shape_in and shape_out and len(shape_out) == len(shape_in) - 1 \
                    and shape_out[1] == shape_in[1] * shape_in[2] and shape_out[2:] == shape_in[3:]:
                return ChannelInfo(grid.slots())
        return self.unknown(node, f"{node.name} uses the channel grid of a shuffle in a way netslim cannot follow",
                            fatal=False)

    def grid(self, node: fx.Node, x: ChannelInfo, sizes: list) -> Any:
        """x.view(N, g, C // g, ...) with g written in the code: every group keeps the same
        positions (tied, like a grouped conv), so the slim model's own view still cuts right."""
        shape_out = _shape(node)
        g, m = int(shape_out[1]), int(shape_out[2])
        if not isinstance(sizes[1], int) or sizes[1] == -1 or (isinstance(sizes[2], int) and sizes[2] != -1):
            return self.unknown(node, f"{node.name} views the channels as a grid of sizes netslim cannot follow "
                                      "(write the group count, compute the rest from x.size(1)); they keep "
                                      "their width", fatal=False)
        rows = [x.slots[i * m:(i + 1) * m] for i in range(g)]
        for row in rows[1:]:
            for a, b in zip(rows[0], row):
                self.union(a, b)
        return _Grid(rows)

    def reshape(self, node, x):
        shape_in, shape_out = _shape(node.args[0]), _shape(node)
        if x is None or shape_out is None:
            return self.fresh(node)
        if node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, x, start, end)
        sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
            else list(node.args[1:])
        if (x.block == 1 and len(sizes) >= 3 and len(shape_in) >= 2 and len(shape_out) == len(shape_in) + 1
                and shape_out[0] == shape_in[0] and shape_out[1] * shape_out[2] == shape_in[1]
                and shape_out[3:] == shape_in[2:]):
            return self.grid(node, x, sizes)
        if (x.block == 1 and len(sizes) >= 2 and len(shape_in) >= 2 and len(shape_out) >= 2
                and shape_out[:2] == shape_in[:2] and not (isinstance(sizes[1], int) and sizes[1] != -1)):
            # batch and channel dims unchanged, the channel size follows the tensor: x.view(n, c, 1, 1)
            # stays right at any width (the other sizes describe one channel's elements)
            return x
        literal = [a for a in node.args[1:] if isinstance(a, int) and a != -1]
        literal += [a for a in node.args[1:] if isinstance(a, (tuple, list))
                    for a in a if isinstance(a, int) and a != -1]
        if literal:
            return self.unknown(node, f"x.{node.target}() with a hard-coded size {tuple(literal)}; "
                                      "use torch.flatten(x, 1) or sizes from x.size()")
        if x.block == 1 and len(shape_in) >= 2 and len(shape_out) == 2 and shape_out[0] == shape_in[0]:
            block = 1
            for d in shape_in[2:]:
                block *= int(d)
            return ChannelInfo(x.slots, block)
        if len(shape_out) >= 2 and shape_out[:2] == shape_in[:2]:
            return x
        return self.unknown(node, f"x.{node.target}() moves the channel dimension")

    # phase 2: gates, then how each BN relates to its input ------------------------------
    def resolve_gates(self, cs: "_Classes") -> list[tuple[int, int]]:
        """Decide every gate and every sigmoid-like value; returns [(follower, leader slot)].

        A gate class may follow its product's BN channels (go when they go) only if nothing
        but such products ever reads its values: no module reads it, nothing pins it, no BN
        channel is in it, and every value in it comes from a conv/linear output (sliced with
        it) or a sigmoid-like op on such. Otherwise it is tied to the product as before, and
        its non-zero values keep those channels (slim == masked either way).
        """
        gated = {self.find(g) for gs, _, _ in self.gates for g in gs}

        def dont_care(r: int) -> bool:
            return (r in gated and not cs.readers(r) and not cs.pinned(r)
                    and all(self.sliceable_origin(o) for o in cs.origin.get(r, [])))

        leader: dict[int, int] = {}

        def follow(slot: int, lead: int) -> None:
            r = self.find(slot)
            if r in leader and self.find(leader[r]) != self.find(lead):
                cs.merge(leader[r], lead)  # one gate for two paths: their channels go together
            leader.setdefault(r, lead)

        for out, src, reason in reversed(self.derived):  # consumers before producers
            if all(dont_care(self.find(s)) for s in out):
                for s, x in zip(out, src):
                    if cs.has_bn_origin(self.find(x)):
                        follow(s, x)   # computed from the BN channel itself: x * x.sigmoid()
                    else:
                        cs.merge(s, x)  # the gate's producer (fc2 of squeeze-excitation)
                        gated.add(self.find(s))
            else:
                for s, x in zip(out, src):
                    cs.merge(s, x)
                for s in out:
                    cs.pin(self.find(s), reason)
        for gs, xs, _ in self.gates:
            for g, x in zip(gs, xs):
                if dont_care(self.find(g)):
                    follow(g, x)
                else:
                    cs.merge(g, x)
        return [(r, lead) for r, lead in leader.items()]

    def sliceable_origin(self, o: tuple) -> bool:
        kind, name, j = o
        if kind == "derived":
            return True
        use = self.uses.get(name)
        return kind == "free" and use is not None and use.kind in ("conv", "gconv", "linear") \
            and j < len(use.out_slots)

    def classify_bns(self, classes: "_Classes") -> "_Classes":
        """Decide owned / tied / gather for every BN; returns the final per-class aggregates."""
        for name in self.bn_order:
            use = self.uses.get(name)
            if use is None or use.kind != "bn":
                continue
            if use.bn_mode == "gather":      # an IndexedBatchNorm stays a gather
                continue
            in_roots = [self.find(s) for s in use.in_slots]
            # Owned: this BN alone reads its input classes. A class may cover several of its
            # channels (a grouped conv ties position j of every group): then all of them.
            own_readers: dict[int, set] = {}
            for j, root in enumerate(in_roots):
                own_readers.setdefault(root, set()).add(("bn", name, j))
            owned = all(
                classes.readers(root) and set(classes.readers(root)) == mine
                and len(classes.readers(root)) == len(mine) and not classes.pinned(root)
                for root, mine in own_readers.items())
            if owned:
                for j, (s_in, s_out) in enumerate(zip(use.in_slots, use.out_slots)):
                    classes.absorb(self.find(s_in))
                    classes.drop_reader(self.find(s_in), ("bn", name, j))
                    classes.merge(s_in, s_out)
                use.bn_mode = "owned"
                continue
            # Not the sole reader. Per channel: an input made only of other BN channels is
            # tied to them (if they go, this channel must go too, or it would read a removed
            # channel); anything else is a stream that keeps its width, read through a gather.
            modes = set()
            for j, (s_in, s_out) in enumerate(zip(use.in_slots, use.out_slots)):
                root = self.find(s_in)
                if classes.removable(root) and classes.has_bn_origin(root):
                    classes.drop_reader(root, ("bn", name, j))
                    classes.merge(s_in, s_out)
                    modes.add("tied")
                else:
                    modes.add("gather")
            use.bn_mode = modes.pop() if len(modes) == 1 else "mixed"
        return classes


class _Classes:
    """Per-class aggregates (origins, readers, pins) kept up to date through BN merges."""

    def __init__(self, a: _Analyzer):
        self.a = a
        self.origin: dict[int, list[tuple]] = {}
        self.readers_: dict[int, list[tuple]] = {}
        self.pins: dict[int, list[tuple[bool, str]]] = {}
        self.free: dict[int, int] = {}        # root -> count of free (non-BN, unabsorbed) origins
        for s in range(len(a.parent)):
            r = a.find(s)
            self.origin.setdefault(r, []).extend(a.origin.get(s, []))
            self.readers_.setdefault(r, []).extend(a.readers.get(s, []))
            self.pins.setdefault(r, []).extend(a.pins.get(s, []))
        for r, origins in self.origin.items():
            self.free[r] = sum(1 for o in origins if o[0] != "bn")

    def readers(self, r: int) -> list[tuple]:
        return self.readers_.get(r, [])

    def pinned(self, r: int) -> bool:
        return bool(self.pins.get(r))

    def has_bn_origin(self, r: int) -> bool:
        return any(o[0] == "bn" for o in self.origin.get(r, []))

    def removable(self, r: int) -> bool:
        return not self.pinned(r) and self.free.get(r, 0) == 0

    def pin(self, r: int | None, reason: str) -> None:
        if r is not None:
            self.pins.setdefault(r, []).append((False, reason))

    def absorb(self, r: int) -> None:
        self.free[r] = 0

    def drop_reader(self, r: int, reader: tuple) -> None:
        lst = self.readers_.get(r, [])
        if reader in lst:
            lst.remove(reader)

    def merge(self, s_a: int, s_b: int) -> None:
        ra, rb = self.a.find(s_a), self.a.find(s_b)
        if ra == rb:
            return
        self.a.union(ra, rb)
        r = self.a.find(ra)
        other = rb if r == ra else ra
        self.origin.setdefault(r, []).extend(self.origin.pop(other, []))
        self.readers_.setdefault(r, []).extend(self.readers_.pop(other, []))
        self.pins.setdefault(r, []).extend(self.pins.pop(other, []))
        self.free[r] = self.free.get(r, 0) + self.free.pop(other, 0)


def analyze(model: nn.Module, example_input: torch.Tensor, *, exclude: Sequence[str] = (),
            skip_coupled: bool = False, strict: bool = True) -> Analysis:
    """Trace `model` and find its prunable channel units (see the module docstring).

    strict: a BN whose channels reach an op netslim cannot slice is an error (PruneError,
    naming the op and the way out); with strict=False it is just left unpruned.
    """
    model = unwrap_model(model)
    exclude = set(exclude)
    mods = dict(model.named_modules())
    unknown_names = [n for n in exclude if n not in mods]
    if unknown_names:
        raise PruneError(f"exclude names no module of the model: {', '.join(sorted(unknown_names))}")
    opaque = {n for n in exclude if not isinstance(mods[n], _BatchNorm)}
    gm = trace(model, example_input, opaque)
    an = _Analyzer(model, gm, exclude)
    an.run()
    cs = _Classes(an)
    follows = an.resolve_gates(cs)
    an.classify_bns(cs)

    candidates = {n for n in an.bn_order if n not in exclude and an.uses.get(n) is not None
                  and an.uses[n].kind == "bn"}
    by_root: dict[int, list[tuple[str, int]]] = {}
    for name in an.bn_order:
        use = an.uses.get(name)
        if use is None or use.kind != "bn":
            continue
        for j, s in enumerate(use.out_slots):
            by_root.setdefault(an.find(s), []).append((name, j))

    units: list[Unit] = []
    unprunable: dict[str, str] = {}
    blocked: dict[str, list[str]] = {}  # op it cannot slice -> the BNs whose channels reach it
    for root, members in by_root.items():
        layer = tuple(sorted({n for n, _ in members}, key=an.bn_order.index))
        why = None
        fatal = [r for f, r in cs.pins.get(root, []) if f]
        soft = [r for f, r in cs.pins.get(root, []) if not f]
        if any(n not in candidates for n, _ in members):
            why = "excluded" if any(n in exclude for n, _ in members) else "not a candidate"
        elif soft:
            why = soft[0]
        elif cs.free.get(root, 0):
            why = "its channels are also produced outside BatchNorm (a shared stream)"
        elif fatal and not strict:
            why = fatal[0]
        elif fatal:
            blocked.setdefault(fatal[0], []).extend(layer)
            continue
        elif skip_coupled and len(layer) > 1:
            why = "coupled with " + ", ".join(layer) + " (skip_coupled)"
        if why:
            for n in layer:
                unprunable.setdefault(n, why)
            continue
        units.append(Unit(root, members, layer))
    if blocked:
        raise PruneError(_blocked_message(blocked, an.blockers))
    # A BN is reported unprunable only if none of its channels ended in a unit.
    in_units = {n for u in units for n, _ in u.bn_channels}
    unprunable = {n: w for n, w in unprunable.items() if n not in in_units}
    untraceable = dict(getattr(gm, "netslim_untraceable", {}))
    for inner, m in mods.items():  # BNs inside a module traced as one call keep their channels
        owner = next((u for u in untraceable if inner.startswith(u + ".")), None)
        if owner and isinstance(m, _BatchNorm):
            unprunable.setdefault(inner, f"inside {owner}, which torch.fx cannot trace")
    return Analysis(an.uses, units, unprunable, list(an.bn_order), an.parent, follows, an.attr_uses,
                    untraceable)


def _where(node: fx.Node | None) -> str:
    """' in module a.b at file.py:12 `code`' from what fx recorded about `node`, or ''."""
    if node is None:
        return ""
    out = ""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        out += f" in module {list(stack)[-1]}"
    lines = (node.meta.get("stack_trace") or "").splitlines()
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


def _blocked_message(blocked: dict[str, list[str]], blockers: dict[str, fx.Node]) -> str:
    """One line naming every op that blocks pruning, where it is, and which BNs reach it."""
    places = []
    every_bn: list[str] = []
    for k, (reason, bns) in enumerate(blocked.items(), 1):
        bns = list(dict.fromkeys(bns))
        every_bn.extend(b for b in bns if b not in every_bn)
        places.append(f"[{k}] {reason}{_where(blockers.get(reason))}, reached by BatchNorm {', '.join(bns)}")
    names = ", ".join(f"'{n}'" for n in every_bn)
    return (f"cannot prune: BatchNorm channels reach {len(places)} op(s) whose channel handling netslim "
            f"does not know: {'; '.join(places)}. Leave those BatchNorms out with exclude=[{names}] "
            f"(--exclude {' '.join(every_bn)}), or make each op's module opaque the same way")
