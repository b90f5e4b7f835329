"""Export-time channel padding: odd pruned widths padded with zero channels in the ONNX graph.

onnxruntime's fast CPU convolutions run in a blocked layout (NCHWc) whose block is 16
channels with AVX-512 and 8 with AVX2; a conv whose widths are not multiples of the block
runs in plain NCHW with a reorder on each side (the profiles in BENCHMARKS.md,
"Deployment"). Pruning leaves such odd widths everywhere, so `pad_channels` widens them in
the exported graph, without touching the slim model:

- the op making the channels (a conv, or the Gather of a pre-activation BN) gets extra
  output channels: zero weights and bias (a gather repeats its first index);
- the per-channel ops on them (BN, ReLU, Clip, pooling, depthwise convs, adds of two padded
  tensors) get parameters that keep a padded channel harmless (BN: scale 0, shift 0,
  mean 0, var 1, so it outputs exactly 0; a depthwise conv: zero kernels);
- every op reading them (a conv, a Gemm behind a Flatten) gets zero input columns there,
  so the padded channels add exactly nothing: the outputs are the slim model's.

Channels are grouped into "classes": tensors that must keep one width because per-channel
ops connect them (a residual add joins both of its inputs). A class is padded only when
every op making it is a plain conv or a channel Gather and every op reading it is one of
the above; anything else (a Concat, which would shift the channels after it; a graph
output; a reshape) leaves the class as it is. DenseNet's concatenated streams therefore
keep their width; what reads them (the gathered BN of each layer) is padded.
A width under half a block keeps its count too: padding would more than double it, and
the zeros then cost more than the reorders they save (ResNet-164 pruned 88%: 1.71x dense
with such widths padded, 2.16x unpadded, 2.51x with this rule; BENCHMARKS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .errors import ConfigError

# ops that work on each channel alone: a padded input channel only reaches the same padded output channel
ELEMENTWISE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
               "Softplus", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
BINARY = {"Add", "Sub", "Mul"}
# BN parameters of a padded channel (scale, shift, mean, var): it outputs exactly 0
BN_FILL = (0.0, 0.0, 0.0, 1.0)

PadSetting = Union[str, int, None]


def nchwc_block() -> Optional[int]:
    """onnxruntime's NCHWc block on this CPU: 16 with AVX-512, 8 with AVX2, None without
    (then onnxruntime has no blocked convs and padding would only add work). The CPU's
    vector extensions as torch detects them (torch.backends.cpu.get_cpu_capability)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return 16 if capability.startswith("AVX512") else 8 if capability == "AVX2" else None


def resolve_block(setting: PadSetting) -> Optional[int]:
    """The channel block `setting` ("auto", "off", None or an int >= 2) pads to; None: no padding."""
    if setting in (None, "off", 0, 1):
        return None
    if setting == "auto":
        return nchwc_block()
    if isinstance(setting, str) and setting.isdigit():
        setting = int(setting)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ConfigError(f"pad_channels {setting!r} is not valid: use auto, off or a channel multiple (e.g. 16)")
    return setting if setting > 1 else None


class _Classes:
    """Union-find over tensor names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass
class _Class:
    tensors: list[str] = field(default_factory=list)
    makers: list[Any] = field(default_factory=list)     # (node, kind) making the channels
    inside: list[Any] = field(default_factory=list)     # per-channel nodes within
    readers: list[Any] = field(default_factory=list)    # (node, kind) reading the channels
    blocked: Optional[str] = None


class _Graph:
    """An ONNX model with the lookups padding needs: initializers (through the exporter's
    Identity aliases), channel widths (shape inference), producers and readers."""

    def __init__(self, data: bytes) -> None:
        import onnx

        self.onnx = onnx
        self.model = onnx.shape_inference.infer_shapes(onnx.load_from_string(data))
        graph = self.model.graph
        self.inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Identity" and node.input[0] in self.inits:
                self.inits[node.output[0]] = self.inits[node.input[0]]
        self.shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                       for v in [*graph.value_info, *graph.input, *graph.output]}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.edited: dict[tuple[int, int], Any] = {}   # (id(node), input slot) -> new array

    def attrs(self, node: Any) -> dict:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def array(self, node: Any, slot: int) -> Any:
        from onnx import numpy_helper

        key = (id(node), slot)
        if key not in self.edited:
            self.edited[key] = numpy_helper.to_array(self.inits[node.input[slot]]).copy()
        return self.edited[key]

    def set_array(self, node: Any, slot: int, values: Any) -> None:
        self.edited[(id(node), slot)] = values

    def is_const(self, node: Any, slot: int) -> bool:
        return len(node.input) > slot and node.input[slot] in self.inits

    def width(self, name: str) -> int:
        shape = self.shapes.get(name) or []
        return shape[1] if len(shape) >= 2 else 0

    def is_activation(self, name: str) -> bool:
        return name not in self.inits and len(self.shapes.get(name) or []) == 4 and self.width(name) > 0

    def finish(self) -> bytes:
        """Write the edited arrays as new initializers, drop unused ones, re-serialise."""
        from onnx import numpy_helper

        position = {id(n): (i, n) for i, n in enumerate(self.model.graph.node)}
        for (node_id, slot), values in self.edited.items():
            i, node = position[node_id]
            name = f"{node.input[slot]}.padded.{i}.{slot}"  # one per node and slot: shared ones differ
            self.model.graph.initializer.append(numpy_helper.from_array(values, name))
            node.input[slot] = name
        graph = self.model.graph
        used = {n for node in graph.node for n in node.input} | self.outputs
        for stale in [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in used]:
            graph.node.remove(stale)
        used = {n for node in graph.node for n in node.input}
        for stale in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(stale)
        del graph.value_info[:]  # widths changed: onnxruntime infers them again
        return self.model.SerializeToString()


def _is_depthwise(g: _Graph, node: Any) -> bool:
    if node.op_type != "Conv" or not g.is_const(node, 1):
        return False
    shape = g.inits[node.input[1]].dims
    groups = g.attrs(node).get("group", 1)
    return groups > 1 and shape[1] == 1 and shape[0] == groups == g.width(node.input[0])


def _per_channel(g: _Graph, node: Any) -> bool:
    """Whether `node` maps each channel of its one activation input to the same output channel."""
    op = node.op_type
    if not node.output or not g.is_activation(node.output[0]):
        return False
    if op in ELEMENTWISE:
        return len(node.output) == 1 or not any(g.readers.get(o) for o in node.output[1:])
    if op == "BatchNormalization":
        return len(node.output) == 1 and all(g.is_const(node, s) for s in range(1, 5))
    if op in BINARY:  # two activations of one width (or [N, C, 1, 1]), e.g. a residual add
        return len(node.input) == 2 and all(g.is_activation(i) for i in node.input) \
            and g.width(node.input[0]) == g.width(node.input[1])
    return _is_depthwise(g, node)


def _classes(g: _Graph) -> dict[str, _Class]:
    """The channel classes of `g`, each with its makers, per-channel ops and readers."""
    uf = _Classes()
    inside = [n for n in g.model.graph.node if _per_channel(g, n)]
    for node in inside:
        for name in node.input:
            if g.is_activation(name):
                uf.union(name, node.output[0])
    inside_ids = {id(n) for n in inside}
    classes: dict[str, _Class] = {}
    tensors = {name for node in g.model.graph.node for name in (*node.input, *node.output) if g.is_activation(name)}
    for name in sorted(tensors):
        c = classes.setdefault(uf.find(name), _Class())
        c.tensors.append(name)
        made_by = g.producer.get(name)
        if made_by is None or name in g.outputs:
            c.blocked = f"{name} is a graph input or output"
        elif id(made_by) in inside_ids:
            c.inside.append(made_by)
        else:
            kind = _maker_kind(g, made_by)
            if kind is None:
                c.blocked = f"{name} is made by a {made_by.op_type}"
            c.makers.append((made_by, kind))
        for reader in g.readers.get(name, []):
            if id(reader) in inside_ids:
                continue
            kind = _reader_kind(g, reader, name)
            if kind is None:
                c.blocked = f"{name} is read by a {reader.op_type}"
            c.readers.append((reader, kind))
    return classes


def _maker_kind(g: _Graph, node: Any) -> Optional[str]:
    if node.op_type == "Conv" and g.is_const(node, 1) and g.attrs(node).get("group", 1) == 1:
        return "conv"
    if node.op_type == "Gather" and g.attrs(node).get("axis") == 1 and g.is_const(node, 1) \
            and len(g.inits[node.input[1]].dims) == 1 and g.is_activation(node.input[0]):
        return "gather"
    return None


def _reader_kind(g: _Graph, node: Any, name: str) -> Optional[str]:
    if node.op_type == "Conv" and node.input[0] == name and g.is_const(node, 1) \
            and g.attrs(node).get("group", 1) == 1:
        return "conv"
    if node.op_type == "Gather" and node.input[0] == name and _maker_kind(g, node) == "gather":
        return "gather"   # reads its listed channels, which stay where they are
    if node.op_type == "Flatten" and g.attrs(node).get("axis", 1) == 1 and node.output[0] not in g.outputs \
            and all(d > 0 for d in g.shapes[name][2:]):
        gemms = g.readers.get(node.output[0], [])
        if gemms and all(r.op_type == "Gemm" and r.input[0] == node.output[0] and g.is_const(r, 1)
                         and not g.attrs(r).get("transA", 0) for r in gemms):
            return "flatten"
    return None


def _pad_axis(values: Any, axis: int, size: int, fill: float = 0.0) -> Any:
    import numpy as np

    widths = [(0, 0)] * values.ndim
    widths[axis] = (0, size - values.shape[axis])
    return np.pad(values, widths, constant_values=fill)


def _pad_class(g: _Graph, c: _Class, width: int, padded: int) -> None:
    import numpy as np

    for node, kind in c.makers:
        if kind == "conv":
            g.set_array(node, 1, _pad_axis(g.array(node, 1), 0, padded))
            if g.is_const(node, 2):
                g.set_array(node, 2, _pad_axis(g.array(node, 2), 0, padded))
        else:  # gather: repeat the first channel; the BN behind it zeroes the copies
            index = g.array(node, 1) % g.width(node.input[0])
            g.set_array(node, 1, np.concatenate([index, np.full(padded - width, index[0], index.dtype)]))
    for node in c.inside:
        if node.op_type == "BatchNormalization":
            for slot, fill in zip(range(1, 5), BN_FILL):
                g.set_array(node, slot, _pad_axis(g.array(node, slot), 0, padded, fill))
        elif node.op_type == "Conv":  # depthwise: zero kernels, one group per channel
            g.set_array(node, 1, _pad_axis(g.array(node, 1), 0, padded))
            if g.is_const(node, 2):
                g.set_array(node, 2, _pad_axis(g.array(node, 2), 0, padded))
            for a in node.attribute:
                if a.name == "group":
                    a.i = padded
    for node, kind in c.readers:
        if kind == "conv":
            g.set_array(node, 1, _pad_axis(g.array(node, 1), 1, padded))
        elif kind == "gather":   # negative indices counted from the end would move: make them absolute
            g.set_array(node, 1, g.array(node, 1) % width)
        else:  # flatten -> gemm: channel is the outer index, so the padded ones are the last columns
            spatial = math.prod(g.shapes[node.input[0]][2:])
            for gemm in g.readers[node.output[0]]:
                axis = 1 if g.attrs(gemm).get("transB", 0) else 0
                g.set_array(gemm, 1, _pad_axis(g.array(gemm, 1), axis, padded * spatial))


def padded_width(width: int, block: int) -> int:
    """The width padding to `block` gives `width` channels: the next multiple of `block`, or
    `width` itself where that would more than double it (a few channels of a block: the zeros
    would cost more than the reorders they save)."""
    padded = block * math.ceil(width / block)
    return width if padded > 2 * width else padded


def _paddable(g: _Graph, block: int) -> tuple[list[tuple[_Class, int, int]], list[dict]]:
    """The classes of `g` padding to `block` would widen, in graph order: [(class, width, padded)],
    and the odd classes that stay as they are, with why."""
    paddable, kept = [], []
    for c in _classes(g).values():
        widths = {g.width(t) for t in c.tensors}
        width = widths.pop()
        if widths or width % block == 0:
            continue
        if c.blocked or not c.makers:
            kept.append({"width": width, "kept_because": c.blocked or "nothing makes it"})
            continue
        padded = padded_width(width, block)
        if padded == width:
            kept.append({"width": width, "kept_because": f"padding to {block * math.ceil(width / block)} "
                                                         "would more than double it"})
            continue
        paddable.append((c, width, padded))
    return paddable, kept


def paddable_classes(data: bytes, block: int) -> list[dict]:
    """What pad_channels(data, block) would pad, one {"width", "padded", "tensors"} per class, in
    the order its `only` indices refer to."""
    return [{"width": w, "padded": p, "tensors": sorted(c.tensors)} for c, w, p in _paddable(_Graph(data), block)[0]]


def pad_channels(data: bytes, block: int, only: Optional[set[int]] = None) -> tuple[bytes, list[dict]]:
    """`data` (an ONNX model) with every paddable channel class widened to a multiple of
    `block` (with `only`: the classes of paddable_classes(data, block) at those indices), and
    what was done: [{"width", "padded"} or {"width", "kept_because"}] per odd class."""
    g = _Graph(data)
    paddable, done = _paddable(g, block)
    for i, (c, width, padded) in enumerate(paddable):
        if only is not None and i not in only:
            done.append({"width": width, "kept_because": "measured faster unpadded"})
            continue
        _pad_class(g, c, width, padded)
        done.append({"width": width, "padded": padded})
    return g.finish(), done
