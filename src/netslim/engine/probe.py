"""The compensation probe: what each consumer of removed channels reads when every removed BN
channel outputs noise (compensate.py folds it).

`consumer_inputs` evaluates the traced graph on the removed channels only (`_RestrictedProbe`):
the class analysis guarantees a consumer's removed input channels carry only what removed BN
channels produced, and a removed BN channel's output is replaced by noise whatever its input
was, so no conv or linear output is ever needed; per node the probe keeps just its channels
that hold probe values, a few of them, and skips every other node (all the convs: the full
forward was the biggest step of a prune call). Same noise, drawn in the same order, and the
same float ops on the same values as the full forward (`_full_probe`, model hooks): the
recorded inputs are bit-identical. Where it cannot prove that for every consumer (an op it
does not know on a probed path, a shuffle, a channel it does not hold...), the full forward
runs instead.
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import rules
from .channels import long_tensor
from .trace import bound_args, node_shape

log = logging.getLogger(__name__)


def consumer_inputs(model: nn.Module, graph: fx.GraphModule | None, removed: dict[str, list[int]],
                    consumers: dict[str, list[int]], in_blocks: dict[str, int], example_input: torch.Tensor,
                    *, batch: int, modules: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Each consumer's removed input channels averaged over `batch` random inputs, with every
    removed BN channel's output replaced by beta + gamma * z, z standard normal (what a BN
    channel gives when its normalised input is standard normal); so the mean estimates
    E[act(gamma z + beta)] through the model's own ops (equal to act(beta) when gamma = 0).

    `removed`: {BN: its removed channels}; `consumers`: {conv/linear: its input channels in
    removed classes}; `graph`: the traced model (its node shapes), None: the full forward.
    Only what compensate._contribution reads is kept of each consumer's input (_summary).
    `modules`: dict(model.named_modules()) if the caller has it.
    """
    mods = dict(model.named_modules()) if modules is None else modules
    modes = {m: m.training for m in mods.values()}
    try:  # on `model` itself (a copy of the user's): modes are restored
        if any(modes.values()):  # else in eval mode already (as a model to prune often is)
            model.eval()
        if graph is not None:
            seen = _RestrictedProbe(mods, graph, removed, consumers, in_blocks).run(example_input, batch)
            if seen is not None:
                return seen
        return _full_probe(model, removed, consumers, in_blocks, example_input, batch, mods)
    finally:
        for m, training in modes.items():
            if m.training != training:  # only what eval() changed: each write is a Module.__setattr__
                m.training = training


def _probe_input(example_input: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """The probe's model input: drawn first from `gen`, before any BN noise."""
    x = torch.randn((batch, *example_input.shape[1:]), generator=gen)
    return x.to(example_input.device, example_input.dtype)


def _bn_noise(bn: nn.Module, channels: list[int], out_shape: Sequence[int], noise: _StratifiedNormal,
              like: torch.Tensor) -> torch.Tensor:
    """[batch, len(channels), *spatial]: beta + gamma * z of BN `bn`'s `channels` (in that order)
    on an output of shape `out_shape`, z the next draw of `noise`, dtype and device of `like`."""
    index = long_tensor(channels).to(bn.weight.device)
    beta = bn.bias.detach().index_select(0, index).view(1, -1, *([1] * (len(out_shape) - 2)))
    gamma = bn.weight.detach().index_select(0, index).view_as(beta)
    z = noise.draw(out_shape[0], len(channels), out_shape[2:]).to(like)
    # Into a contiguous buffer: addcmul would lay its result out like the strided z
    # (channels interleaved), which is slow to read (same values either way).
    return torch.addcmul(beta, gamma, z, out=like.new_empty((out_shape[0], len(channels), *out_shape[2:])))


def _full_probe(model: nn.Module, removed: dict[str, list[int]], consumers: dict[str, list[int]],
                in_blocks: dict[str, int], example_input: torch.Tensor, batch: int,
                modules: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """consumer_inputs by a forward of the whole model (in eval mode), hooks replacing the
    removed BN channels' outputs and recording the consumers' inputs. `modules`:
    dict(model.named_modules()) if the caller has it."""
    mods = dict(model.named_modules()) if modules is None else modules
    gen = torch.Generator().manual_seed(0)
    noise = _StratifiedNormal(gen)

    def replace(bn: nn.Module, channels: list[int]):
        index = long_tensor(channels)

        def hook(m, args, out):
            if out._base is not None or out.data_ptr() == args[0].data_ptr():
                out = out.clone()  # written in place below: never into a view of another tensor
            return out.index_copy_(1, index.to(out.device), _bn_noise(bn, channels, out.shape, noise, out))
        return hook

    def record(name: str, m: nn.Module, channels: list[int]):
        index = _input_positions(m, channels, in_blocks[name])
        return lambda _, args: seen.__setitem__(name, _summary(m, args[0].detach(), index))

    seen: dict[str, torch.Tensor] = {}
    hooks = [mods[n].register_forward_hook(replace(mods[n], ch)) for n, ch in removed.items()]
    hooks += [mods[n].register_forward_pre_hook(record(n, mods[n], ch)) for n, ch in consumers.items()]
    x = _probe_input(example_input, batch, gen)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@dataclass
class _Probed:
    """A node's values at the channels (dim 1) that hold probe values: `values` is the node's
    output restricted to channels `index` (ascending), in that order. After a flatten each
    channel is `block` consecutive features (dim 1 of `values` then has len(index) * block)."""
    index: list[int]
    values: torch.Tensor
    block: int = 1


class _Unsupported(Exception):
    """The restricted probe cannot prove a node exact: the full forward runs instead."""


# The passthrough ops of rules.py whose result does not depend on how many channels the
# tensor has: one correctly rounded float op per element, or a per-channel pooling. Not a
# transcendental activation (SiLU, GELU, tanh...): its vectorised and scalar code paths round
# differently, and which one an element takes depends on where it lies in the tensor. Each
# is run as it is on the probed channels; eval dropouts are the identity.
_EXACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.Softshrink, nn.Hardshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_EXACT_FUNCTIONS = {
    torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu_, torch.nn.functional.relu6,
    torch.nn.functional.hardtanh, torch.nn.functional.leaky_relu,
    torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d, torch.nn.functional.max_pool3d,
    torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d,
    torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_avg_pool3d, torch.nn.functional.adaptive_max_pool1d,
    torch.nn.functional.adaptive_max_pool2d, torch.nn.functional.adaptive_max_pool3d,
    torch.clone, torch.Tensor.contiguous,
}
_EXACT_METHODS = {"relu", "relu_", "contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "to"}
# Elementwise binary ops (rules.py kinds), exact on every element.
_BINARY_KINDS = ("add", "mul", "div")
# Ops whose output is a new tensor of new values, which the probe never needs (a consumer
# reading it misses channels and sends the whole probe to the full forward).
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, _BatchNorm)
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_,
                      torch.nn.functional.relu_}


class _RestrictedProbe:
    """consumer_inputs on the removed channels only (the module docstring)."""

    def __init__(self, mods: dict[str, nn.Module], graph: fx.GraphModule, removed: dict[str, list[int]],
                 consumers: dict[str, list[int]], in_blocks: dict[str, int]):
        self.mods = mods  # the model's named modules
        self.graph = graph
        self.removed = removed
        self.consumers = consumers
        self.in_blocks = in_blocks
        self.probed: dict[fx.Node, _Probed] = {}
        self.seen: dict[str, torch.Tensor] = {}

    def run(self, example_input: torch.Tensor, batch: int) -> dict[str, torch.Tensor] | None:
        """The recorded consumer inputs, or None where the full forward must run (logged)."""
        gen = torch.Generator().manual_seed(0)
        self.noise = _StratifiedNormal(gen)
        self.batch = batch
        # The model input, drawn first as the full forward does (the noise's draws stay in step);
        # only its dtype and device are used here.
        self.like = _probe_input(example_input, batch, gen)
        if not example_input.is_contiguous() or any(
                isinstance(m, nn.modules.conv._ConvNd) and not m.weight.is_contiguous() for m in self.mods.values()):
            # Channels-last activations: the full forward's means then sum in another order.
            log.debug("compensation probe: full forward, the model runs channels-last")
            return None
        nodes = list(self.graph.graph.nodes)
        called = {n.target for n in nodes if n.op == "call_module"}
        hidden = sorted((set(self.removed) | set(self.consumers)) - called)
        if hidden:  # called inside a module traced as one call: its draws and records are out of sight
            log.debug("compensation probe: full forward, %s is not in the traced graph", hidden[0])
            return None
        self.last_use = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
        try:
            with torch.no_grad():
                for i, node in enumerate(nodes):
                    self.visit(node, i)
        except _Unsupported as why:
            log.debug("compensation probe: full forward, %s", why)
            return None
        except Exception as error:  # an op that fails on the probed channels: the full forward decides
            log.debug("compensation probe: full forward, %s: %s", type(error).__name__, error)
            return None
        return self.seen

    def visit(self, node: fx.Node, position: int) -> None:
        """Node number `position` of the graph: its probed channels, if any; a consumer's record."""
        if node.op == "call_module" and node.target in self.removed:
            self.probed[node] = self.bn(node, self.mods[node.target], self.removed[node.target])
            return
        probed_inputs = [a for a in node.all_input_nodes if a in self.probed]
        if node.op == "call_module" and node.target in self.consumers:
            self.record(node)
        if not probed_inputs or node.op == "output":
            return
        where = f"node {node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"
        if _may_write_its_input(node, self.mods):
            self.check_sole_owner(node.args[0], position, where)
        out = self.step(node, where)
        if out is not None:
            self.probed[node] = out
        for a in probed_inputs:  # read for the last time: free it
            if self.last_use[a] == position:
                del self.probed[a]

    def check_sole_owner(self, written: Any, position: int, where: str) -> None:
        """An op writes `written`'s tensor in place: as in the model, every later reader of
        that node sees the write. A probed tensor another node still to be read shares (a view
        here, maybe a copy in the model: both are contiguous here) would see it only here."""
        x = self.probed.get(written) if isinstance(written, fx.Node) else None
        if x is None:
            return
        storage = x.values.untyped_storage().data_ptr()
        for other, p in self.probed.items():
            if other is not written and self.last_use.get(other, -1) > position \
                    and p.values.untyped_storage().data_ptr() == storage:
                raise _Unsupported(f"{where}: writes in place a tensor {other.name} shares")

    def bn(self, node: fx.Node, bn: nn.Module, channels: list[int]) -> _Probed:
        """A removed BN: its removed channels' noise, drawn as the full forward's hook does."""
        shape = node_shape(node)
        if shape is None or len(shape) < 2:
            raise _Unsupported(f"no shape for BN {node.target}")
        values = _bn_noise(bn, channels, (self.batch, *shape[1:]), self.noise, self.like)
        ascending = sorted(channels)  # the usual case: already so (a linear-time check)
        if ascending != channels:
            order = sorted(range(len(channels)), key=channels.__getitem__)
            values = values.index_select(1, long_tensor(order).to(values.device))
        return _Probed(ascending, values)

    def record(self, node: fx.Node) -> None:
        """A consumer's call: what the full forward's pre-hook records of its input."""
        name, channels = node.target, self.consumers[node.target]
        m = self.mods[name]
        x = self.probed.get(node.args[0]) if node.args else None
        if x is None or len(node.args) != 1 or node.kwargs:
            raise _Unsupported(f"consumer {name}'s input holds no probed channel")
        if channels != x.index:  # every channel the probe holds is in a removed class: some are missing
            raise _Unsupported(f"consumer {name} reads a channel the probe does not hold")
        if isinstance(m, nn.Linear):
            if x.values.dim() != 2 or x.block != self.in_blocks[name]:
                raise _Unsupported(f"linear {name} reads its features in another layout")
        elif x.block != 1:
            raise _Unsupported(f"conv {name} reads a flattened input")
        local = _input_positions(m, range(len(channels)), x.block)
        values = x.values
        if values.shape[1] == 1 and isinstance(m, nn.modules.conv._ConvNd):
            # One channel: _summary's mean over every other dim would then sum the batch and
            # space as one run, in another order than per channel (values differing in the
            # last bit); a second channel keeps the per-channel order.
            values = torch.cat([values, values], 1)
        self.seen[name] = _summary(m, values, local)

    def step(self, node: fx.Node, where: str) -> _Probed | None:
        """Node's probed channels (None: it holds none the probe needs), or _Unsupported."""
        if node.op == "call_module":
            m = self.mods[node.target]
            if isinstance(m, _FRESH_MODULES):
                return None
            if type(m) in _EXACT_MODULES:  # not a subclass: its forward may be another
                return self.unary(node, m, where)
            if isinstance(m, nn.Flatten):
                return self.flatten(node, m.start_dim, m.end_dim, where)
            raise _Unsupported(f"{where}: module {type(m).__name__} on a probed path")
        if node.op == "call_function":
            target, rule = node.target, rules.function_rule(node.target)
        elif node.op == "call_method":
            target, rule = node.target, rules.method_rule(node.target)
        else:
            raise _Unsupported(f"{where} on a probed path")
        kind = rule.kind if rule else None
        if (node.op == "call_function" and target in _EXACT_FUNCTIONS) or \
                (node.op == "call_method" and target in _EXACT_METHODS):
            return self.unary(node, target, where)
        if kind in _BINARY_KINDS:
            return self.binary(node, where)
        if kind == "cat":
            return self.cat(node, where)
        if kind == "flatten" and node.op == "call_function" or target == "flatten":
            args = _bind(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
            return self.flatten(node, args["start_dim"], args["end_dim"], where)
        raise _Unsupported(f"{where} on a probed path")

    def unary(self, node: fx.Node, op: Any, where: str) -> _Probed:
        """A channel-wise op with an exact result (_EXACT_*): run as it is on the probed
        channels. Its aliasing (in place, or returning its input) is the model's own, on the
        same tensors: only the channel count differs."""
        x = self._first_operand(node, where)
        args = [x.values, *node.args[1:]]
        if any(isinstance(a, fx.Node) for a in [*args[1:], *node.kwargs.values()]):
            raise _Unsupported(f"{where}: a tensor argument besides its input")
        if node.op == "call_method":
            out = getattr(x.values, op)(*args[1:], **node.kwargs)
        else:
            out = op(*args, **node.kwargs)
        if not isinstance(out, torch.Tensor) or out.shape[:2] != x.values.shape[:2]:
            raise _Unsupported(f"{where} changes the layout")
        return _Probed(x.index, out, x.block)

    def binary(self, node: fx.Node, where: str) -> _Probed | None:
        """+, -, * of two same-shaped tensors or of a tensor and a number, / by a number,
        elementwise (one rounding per element): on the channels both tensor operands hold.
        In place only where both hold the same channels: then it writes the probed tensor of
        the first operand, as the model writes its own. With an operand the probe does not
        hold (a gate computed by a conv), out of place: nothing."""
        if node.kwargs or len(node.args) != 2:  # alpha=, rounding_mode=: other arithmetic
            raise _Unsupported(f"{where}: extra arguments")
        operands = node.args
        if not all(isinstance(a, (fx.Node, int, float)) and not isinstance(a, bool) for a in operands):
            raise _Unsupported(f"{where}: an operand of another type")
        tensors = [a for a in operands if isinstance(a, fx.Node)]
        inplace = _may_write_its_input(node, self.mods)
        if not all(t in self.probed for t in tensors):
            if inplace and operands[0] in self.probed:
                raise _Unsupported(f"{where}: writes values the probe does not have into a probed tensor")
            return None
        kind = (rules.function_rule if node.op == "call_function" else rules.method_rule)(node.target).kind
        if kind == "div" and not isinstance(operands[1], (int, float)):
            raise _Unsupported(f"{where}: divides by a tensor")
        shape = node_shape(node)
        if shape is None or any(node_shape(t) != shape for t in tensors):
            raise _Unsupported(f"{where}: broadcasts its operands")
        probed = [self.probed[t] for t in tensors]
        if any(p.block != probed[0].block for p in probed):
            raise _Unsupported(f"{where}: operands flattened differently")
        common = sorted(set(probed[0].index).intersection(*(p.index for p in probed[1:])))
        if inplace and any(p.index != common for p in probed):
            raise _Unsupported(f"{where}: in place on channels the other operand lacks")
        values = [self._select(self.probed[a], common) if isinstance(a, fx.Node) else a for a in operands]
        if node.op == "call_method":
            out = getattr(values[0], node.target)(values[1])
        else:
            out = node.target(*values)
        return _Probed(common, out, probed[0].block) if common else None

    def cat(self, node: fx.Node, where: str) -> _Probed:
        """torch.cat along the channels: the probed channels of every part, offset."""
        args = _bind(node, ("tensors", "dim"), {"dim": 0})
        parts, shape = args["tensors"], node_shape(node)
        if shape is None or not isinstance(parts, (list, tuple)) or args["dim"] % len(shape) != 1 \
                or not all(isinstance(p, fx.Node) and node_shape(p) is not None for p in parts):
            raise _Unsupported(f"{where}: not a cat of tensors along the channels")
        index, values, offset = [], [], 0
        for p in parts:
            if p in self.probed:
                if self.probed[p].block != 1:
                    raise _Unsupported(f"{where}: a flattened part")
                index += [offset + c for c in self.probed[p].index]
                values.append(self.probed[p].values)
            offset += node_shape(p)[1]
        return _Probed(index, torch.cat(values, 1))

    def flatten(self, node: fx.Node, start_dim: int, end_dim: int, where: str) -> _Probed:
        """Flattening all but the batch: channel c becomes `block` consecutive features."""
        x = self._first_operand(node, where)
        shape = node_shape(node.args[0])
        if shape is None or start_dim % len(shape) != 1 or end_dim % len(shape) != len(shape) - 1 or x.block != 1:
            raise _Unsupported(f"{where}: not a flatten of all but the batch")
        return _Probed(x.index, x.values.flatten(1), math.prod(shape[2:]))

    def _first_operand(self, node: fx.Node, where: str) -> _Probed:
        """The probed channels of node's input (its first argument; no other is probed)."""
        first = node.args[0] if node.args else None
        others = [a for a in node.all_input_nodes if a is not first and a in self.probed]
        if not isinstance(first, fx.Node) or first not in self.probed or others:
            raise _Unsupported(f"{where}: probed channels in an argument besides its input")
        return self.probed[first]

    @staticmethod
    def _select(x: _Probed, channels: list[int]) -> torch.Tensor:
        """x's values at `channels` (a subset of x.index, ascending)."""
        if channels == x.index:
            return x.values
        position = {c: r for r, c in enumerate(x.index)}
        rows = torch.tensor([position[c] * x.block + t for c in channels for t in range(x.block)],
                            dtype=torch.long, device=x.values.device)
        return x.values.index_select(1, rows)


def _may_write_its_input(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Might `node` write its first argument in place? (A `True` passed positionally to a
    function counts: `F.relu(x, True)`; a pool's `ceil_mode` only costs a check.)"""
    if node.op == "call_module":
        return bool(getattr(mods[node.target], "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True \
        or any(a is True for a in node.args[1:])


def _bind(node: fx.Node, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """node's arguments by name (trace.bound_args), or _Unsupported where they do not fit."""
    args = bound_args(node, names, defaults)
    if args is None:
        raise _Unsupported(f"node {node.name}: arguments that do not fit {list(names)}")
    return args


def _input_positions(m: nn.Module, channels: Sequence[int], in_block: int) -> torch.Tensor:
    """Where input `channels` lie in m's input: along dim 1 of a conv's, among a linear's
    input features (in_block consecutive features per channel)."""
    index = long_tensor(channels)
    if isinstance(m, nn.Linear):
        return (index[:, None] * in_block + torch.arange(in_block)).flatten()
    return index


def _summary(m: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """What _contribution needs of consumer m's input `x` at `index` (_input_positions),
    averaged over the probe's examples: of a 1x1 stride-1 conv, the spatial means [C]; of
    another conv, the maps [C, *spatial]; of a linear, the features averaged over every
    leading dim [C * in_block]."""
    index = index.to(x.device)
    if isinstance(m, nn.Linear):
        return x.index_select(-1, index).reshape(-1, len(index)).mean(0, dtype=torch.float32)
    if m.groups == 1 and _pointwise(m):  # reading the whole input once beats copying the channels out
        return x.mean(dim=[0, *range(2, x.dim())], dtype=torch.float32).index_select(0, index)
    return x.index_select(1, index).mean(0, dtype=torch.float32)


class _StratifiedNormal:
    """Standard normal samples for the probe, stratified per channel (Latin hypercube sampling).

    Every channel of a draw holds the same n = batch x positions values, the midpoint
    quantiles Phi^-1((i + 1/2) / n), spread over its positions by a random permutation
    (one per draw, i.e. per BN), each channel starting at its own offset in it. So the
    channel's spatial mean of any function of z alone (act(gamma z + beta)) is the
    midpoint-rule integral over N(0, 1) (error O(1/n^2) for smooth act, O(1/n^1.5) at the kink
    of ReLU, vs O(1/sqrt(n)) for n independent draws); where positions are combined
    (pooling, k x k convs) or one channel index of several BNs is added (residual streams),
    the values at distinct positions, channels and BNs are distinct strata of independent
    permutations, so they mix as independent draws. Drawing costs one permutation of n per BN
    instead of n normal samples per removed channel (the draw was as costly as the forward).
    """

    def __init__(self, gen: torch.Generator):
        self.gen = gen
        self.quantiles: dict[int, torch.Tensor] = {}

    def draw(self, batch: int, channels: int, spatial: Sequence[int]) -> torch.Tensor:
        """[batch, channels, *spatial]: a strided view, not to be written."""
        positions = math.prod(spatial)
        n = batch * positions
        if n not in self.quantiles:
            probs = (torch.arange(n, dtype=torch.float64) + 0.5) / n
            self.quantiles[n] = torch.special.ndtri(probs).float()
        step = max(n // channels, 1)  # channel c starts at offset c * step of the permuted quantiles
        ring = self.quantiles[n].index_select(0, torch.randperm(n, generator=self.gen))
        # cyclic: every channel reads n values (cat: Tensor.repeat costs 5x as much on these sizes)
        ring = torch.cat((ring,) * math.ceil(((channels - 1) * step + n) / n))
        inner = [math.prod(spatial[d + 1:]) for d in range(len(spatial))]  # contiguous within a channel
        return ring.as_strided((batch, channels, *spatial), (positions, step, *inner))


def _pointwise(m: nn.Module) -> bool:
    """A 1x1 conv with stride 1 and no padding: every input position maps to one output position."""
    padding = m.padding if isinstance(m.padding, str) else ("valid" if not any(m.padding) else "")
    return all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride) and padding in ("valid", "same")
