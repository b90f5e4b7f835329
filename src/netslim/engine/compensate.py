"""Compensation: fold what the removed channels still contributed into the layers that read them.

A channel Network Slimming removes has a small factor gamma, so its BatchNorm outputs
about beta, a constant; through ReLU, pooling and the like it reaches the next conv or
linear as the constant act(beta). Dropping the channel drops that constant, a large part
of the collapse right after pruning (quick preset at 50%: 49.84% top-1 plain, 89.23%
compensated; README).
Adding the constant back as a bias loses nothing:

    consumer(x_kept, c_removed) = consumer(x_kept, 0) + consumer_without_bias(c_removed)

The second term goes into the consumer's bias, or, when the consumer feeds one plain
BatchNorm and nothing else, into that BN's running mean (BN(y + k) with mean m equals
BN(y) with mean m - k), so no parameter is added.

How the constant is found (probe.py): the model is run once (eval mode, on random inputs) with every
removed BN channel replaced by beta + gamma * z, z ~ N(0, 1) (stratified: _StratifiedNormal),
what it outputs when its normalised input is standard normal, and each consumer's input
is averaged over the batch and space (on the removed channels only where the traced graph
allows, the same numbers):
the expected constant E[act(gamma z + beta)] through the model's own ops (exactly act(beta)
when gamma = 0). The class analysis (classes.py) guarantees those channels carry only what
removed BN channels produced, and it records where such a channel is multiplied by something
that varies with the input (a gate computed from kept channels, an attention map: not a
constant, classes.varying_inputs): those positions are skipped (left as plain pruning, still
correct) and counted.

Exact for gamma = 0 with 1x1 convs and linears. For a k x k conv with zero padding the
contribution differs at the borders; the bias takes its spatial mean (the best constant).
The removed channels are zeroed (gamma = beta = 0) in the returned dense copy, so the slim
model (apply_plan) and the masked model (apply_mask) of it compute exactly the same thing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import is_indexed_bn
from .analysis import Analysis
from .channels import long_tensor
from .copying import clone_model
from .probe import _input_positions, _pointwise, consumer_inputs
from .slim import removed_slots
from .trace import trace

_CONSUMER_KINDS = ("conv", "gconv", "linear")
_NOISE_BATCH = 4    # examples of the noise probe: the folded value averages over them (and over space)
_NOISE_POSITIONS = 32 * 32  # ... at this input size; a larger input has as many samples in fewer examples


def noise_batch(example_input: torch.Tensor) -> int:
    """Examples in the noise probe: 4 at 32x32 or smaller, fewer on larger inputs, whose every
    position draws its own noise (so the spatial mean has at least as many samples): one from
    64x64 on.

    Four, not sixteen as with independent draws: the stratified noise (_StratifiedNormal)
    estimates as well with a quarter of the samples. Measured against a 256-example
    estimate (relative error of the folded constants, all consumers; 32x32, 50%):
    ResNet-50 0.20 with 16 independent examples, 0.20 stratified with 4; DenseNet-121 0.076
    vs 0.021; MobileNetV2 0.071 vs 0.0019 (no nonlinearity after its residual sums, so each
    channel's mean is the midpoint integral)."""
    positions = math.prod(example_input.shape[2:])
    return min(_NOISE_BATCH, max(1, math.ceil(_NOISE_BATCH * _NOISE_POSITIONS / positions)))


@dataclass
class Compensation:
    """What compensate() did: counts for the prune report, and convs/linears given a bias."""
    removed_channels: int = 0       # removed BN channels
    folded: int = 0                 # (consumer, input channel) pairs whose constant was folded
    skipped: int = 0                # pairs whose value was not a constant: left uncompensated
    into_bias: list[str] = field(default_factory=list)
    into_bn: list[str] = field(default_factory=list)
    added_biases: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"removed_channels": self.removed_channels, "folded": self.folded, "skipped": self.skipped,
                "into_bias": self.into_bias, "into_bn_running_mean": self.into_bn,
                "added_biases": self.added_biases}


def removed_bn_channels(analysis: Analysis, removed_roots: set[int]) -> dict[str, list[int]]:
    """{bn name: [channel indices]} of every BN channel in a removed unit: the BNs in order of
    their first removed member, each BN's channels in table order (units in order, then each
    unit's members). The probe draws its noise in this order."""
    table = analysis.table
    removed_root = torch.zeros(len(analysis.parent), dtype=torch.bool)  # per slot: a removed class's root?
    removed_root[long_tensor(removed_roots)] = True
    removed_unit = removed_root[table.unit_root]
    flat = table.member_flat[removed_unit[table.member_unit]]
    bn, channel = table.bn_and_channel(flat)
    by_bn = torch.argsort(bn, stable=True)  # each BN's channels together, in table order
    bns, counts = torch.unique_consecutive(bn[by_bn], return_counts=True)
    channels = channel[by_bn].split(counts.tolist())
    first = by_bn[counts.cumsum(0) - counts]  # where each BN's first channel is in table order
    names = list(map(analysis.bn_names.__getitem__, bns.tolist()))
    return {names[k]: channels[k].tolist() for k in torch.argsort(first).tolist()}


def compensate(model: nn.Module, analysis: Analysis, removed_roots: set[int],
               example_input: torch.Tensor, skip: Collection[str] = (), *,
               share_weights: bool = False, modules: dict[str, nn.Module] | None = None
               ) -> tuple[nn.Module, Compensation]:
    """A copy of `model` whose removed channels are zeroed and whose consumers carry their constant.

    `removed_roots`: the slot classes the plan removes (plan.removed_roots). The copy
    still has every channel; apply_plan / apply_mask on it give the compensated slim /
    masked model. `skip`: the modules of residual branches removed whole (blocks.py): they
    get nothing, and their BNs are silenced (gamma = beta = 0) before the probes, so each
    branch outputs exactly 0 there, as it does in the masked model.
    share_weights: the copy's conv and linear weights (and BN running variances) are `model`'s own tensors (nothing
    here writes them; copying them was a tenth of a prune call), for a caller that slices
    the copy and then owns what is still shared (slim.own_tensors).
    `modules`: dict(model.named_modules()) if the caller has it.
    """
    new = clone_model(model, _weights_memo(model, modules) if share_weights else None)
    mods = dict(new.named_modules())  # of the copy: read by every step below
    with torch.no_grad():
        for name in skip:
            if isinstance(mods[name], _BatchNorm) and mods[name].affine:
                mods[name].weight.zero_()
                mods[name].bias.zero_()
    removed = removed_bn_channels(analysis, removed_roots)
    report = Compensation(removed_channels=sum(len(v) for v in removed.values()))
    consumers = {n: c for n, c in _consumers(analysis, removed_roots).items() if n not in skip}
    if consumers:
        in_blocks = {n: analysis.modules[n].in_block for n in consumers}
        expected = consumer_inputs(new, analysis.graph, removed, consumers, in_blocks, example_input,
                                   batch=noise_batch(example_input), modules=mods)
        feeds_bn = _single_bn_reader(new, analysis.graph or trace(model, example_input), list(consumers), mods)
        for name, channels in consumers.items():
            varying = analysis.varying_inputs.get(name, frozenset())
            constant = [c for c in channels if c not in varying]
            report.folded += len(constant)
            report.skipped += len(channels) - len(constant)
            if constant:
                shift = _contribution(mods[name], in_blocks[name], expected[name], channels, constant)
                if bool(shift.abs().max() > 0):
                    _fold(mods, name, shift, feeds_bn.get(name), report)
    with torch.no_grad():
        for bn_name, channels in removed.items():
            bn = mods[bn_name]
            idx = long_tensor(channels).to(bn.weight.device)
            bn.weight.index_fill_(0, idx, 0.0)
            bn.bias.index_fill_(0, idx, 0.0)
    return new, report


def _weights_memo(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> dict[int, torch.Tensor]:
    """A deepcopy memo that maps to itself every tensor compensate() never writes: conv and
    linear weights, BN running variances and batch counters (it writes BN factors, shifts
    and running means, and conv and linear biases). The copy shares them. `modules`:
    dict(model.named_modules()) if the caller has it."""
    shared: list[torch.Tensor] = []
    for m in model.modules() if modules is None else modules.values():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(m.weight, nn.Parameter):
            shared.append(m.weight)
        elif isinstance(m, _BatchNorm):
            shared += [t for t in (m.running_var, m.num_batches_tracked) if t is not None]
    return {id(t): t for t in shared}


def _consumers(analysis: Analysis, removed_roots: set[int]) -> dict[str, list[int]]:
    """{conv/linear name: [its input channels that lie in a removed class]}."""
    out = {}
    gone = removed_slots(analysis, removed_roots)
    for name, use in analysis.modules.items():
        if use.kind in _CONSUMER_KINDS:
            chans = np.flatnonzero(gone[analysis.slot_array(use.in_slots)]).tolist()
            if chans:
                out[name] = chans
    return out


def _contribution(m: nn.Module, in_block: int, summary: torch.Tensor, channels: Sequence[int],
                  constant: Sequence[int]) -> torch.Tensor:
    """The per-output-channel constant the removed input `constant` channels add to m's output.

    `summary`: what _consumer_inputs recorded of m's removed input `channels` (_summary),
    of which `constant` are folded. A conv's output is averaged over space (with
    zero padding the border differs: its mean is the best constant); only the removed
    channels' slice of the weight is applied.
    """
    if len(constant) == len(channels):  # nothing varying, the usual case: all of the summary, no gather
        maps = summary
    else:
        position = {c: r for r, c in enumerate(channels)}
        rows = torch.tensor([position[c] for c in constant], dtype=torch.long, device=summary.device)
        maps = summary.reshape(-1, in_block)[rows] if isinstance(m, nn.Linear) else summary[rows]
    index = long_tensor(constant).to(summary.device)
    weight = m.weight.detach().float()
    with torch.no_grad():
        # The weight times a zero-filled input: reads the weight once instead of copying its columns.
        if isinstance(m, nn.Linear):
            z = summary.new_zeros(weight.shape[1])
            z[_input_positions(m, constant, in_block).to(z.device)] = maps.flatten()
            return weight @ z
        if m.groups == 1 and _pointwise(m):  # the spatial mean commutes with a 1x1, stride-1 conv
            z = summary.new_zeros(m.in_channels)
            z[index] = maps
            return weight.reshape(weight.shape[0], -1) @ z
        reads = _mean_reads(m, maps)
        if reads is None:  # padding other than zeros: run the conv itself on the maps
            return _conv_output_mean(m, maps, index)
        full = reads.new_zeros((m.in_channels, *reads.shape[1:]))
        full[index] = reads  # the other input channels read 0; each group's outputs read their own
        w = weight.reshape(m.groups, weight.shape[0] // m.groups, -1)  # [group, its outputs, its inputs x kernel]
        return torch.bmm(w, full.reshape(m.groups, -1, 1)).flatten()


def _mean_reads(m: nn.Module, maps: torch.Tensor) -> torch.Tensor | None:
    """[C, *kernel_size]: for each channel of `maps` ([C, *spatial], conv m's input) and each
    kernel position, the mean over m's output positions of the input value that position
    reads (zero padding included). m's output mean is then the weight times these: exact,
    without running the conv (the conv cost half of ResNet-50's compensation). None when m
    pads with anything but zeros.

    Summed one spatial dim at a time: along it, kernel tap t reads the positions
    t * dilation + stride * o of the padded map, o over the output positions.
    """
    if m.padding_mode != "zeros":
        return None
    sums = F.pad(maps, m._reversed_padding_repeated_twice)  # what the conv pads, 'same' included
    outs = []
    for dim, (k, d, s) in enumerate(zip(m.kernel_size, m.dilation, m.stride), start=1):
        out = (sums.shape[dim] - d * (k - 1) - 1) // s + 1
        lead = (slice(None),) * dim
        sums = torch.stack([sums[(*lead, slice(t * d, t * d + s * (out - 1) + 1, s))].sum(dim) for t in range(k)], dim)
        outs.append(out)
    return sums / math.prod(outs)


def _conv_output_mean(m: nn.Module, maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """m's output mean over space on input `maps` in channels `index`, zeros elsewhere."""
    z = maps.new_zeros((1, m.in_channels, *maps.shape[1:]))
    z[0, index] = maps
    out = m._conv_forward(z, m.weight.detach().float(), None)
    return out[0].reshape(out.shape[1], -1).mean(dim=1)


def _single_bn_reader(model: nn.Module, gm: fx.GraphModule, names: list[str],
                      modules: dict[str, nn.Module] | None = None) -> dict[str, str]:
    """{consumer: BN} for consumers whose output is read by one plain BN and nothing else
    (`gm`: the traced model, or a copy of it: only module names are read from it).
    `modules`: dict(model.named_modules()) if the caller has it."""
    mods = dict(model.named_modules()) if modules is None else modules
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in names or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = mods.get(user.target) if user.op == "call_module" else None
        if isinstance(bn, _BatchNorm) and not is_indexed_bn(bn) and bn.running_mean is not None \
                and user.args and user.args[0] is node:
            out[node.target] = user.target
    return out


def _fold(mods: dict[str, nn.Module], name: str, shift: torch.Tensor, bn_name: str | None,
          report: Compensation) -> None:
    """Add `shift` to `name`'s output: into the BN reading it (`bn_name`) or its bias."""
    m = mods[name]
    with torch.no_grad():
        if bn_name is not None:
            bn = mods[bn_name]
            bn.running_mean.sub_(shift.to(bn.running_mean.dtype))
            report.into_bn.append(bn_name)
            return
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(shift.numel(), dtype=m.weight.dtype, device=m.weight.device))
            report.added_biases.append(name)
        m.bias.add_(shift.to(m.bias.dtype))
        report.into_bias.append(name)


def add_biases(model: nn.Module, names: Sequence[str]) -> None:
    """Give the named convs/linears a zero bias (so a compensated checkpoint's state dict fits)."""
    mods = dict(model.named_modules())
    for name in names:
        m = mods[name]
        if m.bias is None:
            out = m.out_channels if hasattr(m, "out_channels") else m.out_features
            m.bias = nn.Parameter(torch.zeros(out, dtype=m.weight.dtype, device=m.weight.device))
