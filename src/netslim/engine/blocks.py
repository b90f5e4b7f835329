"""Removing whole residual branches: `y = shortcut + f(x)` becomes `y = shortcut`.

When every BatchNorm factor of a residual branch is under the global threshold, keeping
`min_channels` channels of each of its layers would leave a branch that costs a layer's
launch and memory traffic for next to nothing. Fewer layers is where GPUs and deployment
runtimes gain the most, so netslim removes the branch instead.

What makes it exact: the branch is the part of the graph that only feeds one operand of an
add (its *exclusive region*). In mask mode every BatchNorm of the branch is masked whole
(gamma = beta = 0), so it outputs exactly 0. The branch is removable only if that provably
makes the operand exactly 0: walking the region in graph order, a masked BN outputs 0 and
an op keeps 0 only where it must (activations, pooling, dropout, views, bias-free convs and
linears, sums of zeros, products with a zero). A conv with a bias, a non-affine BN or any
other op after the last masked BN keeps the branch. The slim model then drops the add's
operand: the module whose forward holds the add (the *block*) is replaced by a torch.fx
GraphModule of the same code without the branch, so its modules, parameters and compute
are gone, state-dict keys of everything else stay as they were, and user-written
`out += identity` still works.

The plan carries a removal as data: every BN of a removed branch maps to no kept channel
(`{"layer1.0.bn1": [], ...}`). Applying a plan (apply_plan, a checkpoint's load) finds the
branch those BNs form and removes it again; a BN emptied outside a removable branch is an
error. Compensation (compensate.py) folds nothing into a removed branch and sees it output
0, so the branch's own output (its last BN's beta, say) is dropped like the seed drops a
removed channel; folding it into the stream instead would make the stream's channels
unprunable for the next pass (a constant not produced by a BN).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import PruneError
from .analysis import Analysis
from .rules import Rule, function_rule, method_rule, module_rule
from .trace import Tracer, node_shape, trace
from .trace import example_input as make_example


@dataclass(frozen=True)
class Branch:
    """One operand of an add that becomes exactly 0 when its BatchNorms are masked whole."""
    block: str                   # the module whose forward holds the add ("" = the model itself)
    add: str                     # the add's node name in the trace, e.g. "add_3"
    bns: tuple[str, ...]         # every BatchNorm the branch calls
    modules: tuple[str, ...]     # every module the branch calls: all go with it

    def as_dict(self) -> dict:
        return {"block": self.block, "add": self.add, "bns": list(self.bns), "modules": list(self.modules)}


# ----------------------------------------------------------------------------------------
# Finding branches in a traced graph

# Rule kinds (rules.py) whose op maps an all-zero first argument to all zeros whatever the
# others are; plus the views fx records that the channel analysis handles as layout ops.
_ZERO_KEEPING_KINDS = {"passthrough", "flatten", "reduce", "getitem", "split", "reshape"}
_ZERO_KEEPING_VIEWS = {torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                       "permute", "transpose", "squeeze", "unsqueeze", "expand", "expand_as"}
_SUB_TARGETS = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}


def _rule(node: fx.Node, mods: dict[str, nn.Module]) -> Rule | None:
    if node.op == "call_module":
        return module_rule(mods[node.target])
    if node.op == "call_function":
        return function_rule(node.target)
    if node.op == "call_method":
        return method_rule(node.target)
    return None


def _exclusive_region(nodes: list[fx.Node], position: dict[fx.Node, int], operand: fx.Node,
                      add: fx.Node) -> set[fx.Node]:
    """The nodes whose values reach nothing but `operand`'s use in `add` (operand included)."""
    if set(operand.users) != {add} or operand.op in ("placeholder", "get_attr"):
        return set()
    region = {operand}
    for n in reversed(nodes[:position[operand]]):  # users come later in graph order
        if n.op not in ("placeholder", "output") and n.users and all(u in region for u in n.users):
            region.add(n)
    return region


def _zero_after_masking(region: set[fx.Node], nodes: list[fx.Node], operand: fx.Node,
                        mods: dict[str, nn.Module]) -> bool:
    """Is `operand` exactly 0 (eval mode) once every BatchNorm in `region` is masked whole?"""
    zero: set[fx.Node] = set()

    def is_zero(a) -> bool:
        return isinstance(a, fx.Node) and a in zero

    for n in nodes:
        if n not in region:
            continue
        args = n.args
        first = args[0] if args else None
        rule = _rule(n, mods)
        kind = rule.kind if rule is not None else None
        m = mods.get(n.target) if n.op == "call_module" else None
        if kind == "batchnorm":
            ok = m.weight is not None                    # masked whole: gamma = beta = 0
        elif kind in ("conv", "linear"):
            ok = m.bias is None and is_zero(first)       # a bias would make 0 non-zero
        elif kind == "add":
            ok = all(is_zero(a) if isinstance(a, fx.Node) else a in (0, 0.0) for a in args[:2])
        elif kind == "mul":
            ok = any(is_zero(a) for a in args[:2])       # 0 * finite = 0
        elif kind == "cat":
            parts = first if isinstance(first, (list, tuple)) else n.kwargs.get("tensors", ())
            ok = bool(parts) and all(is_zero(a) for a in parts)
        elif kind == "div":
            ok = is_zero(first) and len(args) > 1 and isinstance(args[1], (int, float)) and args[1] != 0
        elif kind in _ZERO_KEEPING_KINDS or n.op != "call_module" and n.target in _ZERO_KEEPING_VIEWS:
            ok = is_zero(first)
        else:
            ok = False
        if ok:
            zero.add(n)
    return operand in zero


def _scope(node: fx.Node) -> list[str]:
    """The module paths whose forward `node` was made in, outermost first."""
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _block_of(add: fx.Node, region: set[fx.Node]) -> str:
    """The innermost module whose forward made the add and every node of the branch."""
    common = _scope(add)
    for n in region:
        scope = _scope(n)
        k = 0
        while k < len(common) and k < len(scope) and common[k] == scope[k]:
            k += 1
        common = common[:k]
    return common[-1] if common else ""


def _has_state(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None or next(m.buffers(), None) is not None


def _branches_in(graph: fx.Graph, mods: dict[str, nn.Module], untouchable: set[str]
                 ) -> list[tuple[Branch, fx.Node, fx.Node, list[fx.Node]]]:
    """Every (branch, its add, the add's other operand, the branch's nodes) of `graph` that
    masking makes exactly 0. A branch calling an `untouchable` module (excluded, traced as
    one call) or a module also called elsewhere does not qualify."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    calls: dict[str, int] = {}
    for n in nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    found = []
    for add in nodes:
        rule = _rule(add, mods) if add.op != "call_module" else None
        if rule is None or rule.kind != "add" or add.kwargs or len(add.args) != 2 \
                or not all(isinstance(a, fx.Node) for a in add.args):
            continue
        is_sub = add.target in _SUB_TARGETS
        for k, operand in enumerate(add.args):
            if is_sub and k == 0:  # a - f: dropping a would leave -f
                continue
            region = _exclusive_region(nodes, position, operand, add)
            # Modules with weights go with the branch; a stateless one (a shared nn.ReLU) may
            # also serve elsewhere and simply stays there.
            called = [n.target for n in nodes if n in region and n.op == "call_module" and _has_state(mods[n.target])]
            bns = [t for t in called if isinstance(mods[t], _BatchNorm)]
            if not bns or any(calls[t] > 1 or t in untouchable for t in called):
                continue
            if not _zero_after_masking(region, nodes, operand, mods):
                continue
            branch = Branch(_block_of(add, region), add.name, tuple(bns), tuple(called))
            found.append((branch, add, add.args[1 - k], [n for n in nodes if n in region]))
    return found


def find_branches(model: nn.Module, example_input: torch.Tensor | None, opaque: Iterable[str] = (),
                  graph: fx.GraphModule | None = None) -> list[Branch]:
    """Every residual branch of `model` that could be removed (whatever its factors are).

    Only branches whose add keeps its shape without them (the other operand has the add's
    shape, so no broadcast is lost) and whose modules are called nowhere else qualify.
    `opaque`: modules traced as one call (exclude, untraceable ones): never removed.
    `graph`: the model already traced with shapes (Analysis.graph), else it is traced here.
    """
    opaque = set(opaque)
    gm = graph if graph is not None else trace(model, example_input, opaque)
    mods = dict(model.named_modules())
    out = []
    for branch, add, other, _ in _branches_in(gm.graph, mods, opaque | set(getattr(gm, "netslim_untraceable", {}))):
        if node_shape(other) is not None and node_shape(other) == node_shape(add):
            out.append(branch)
    return out


# ----------------------------------------------------------------------------------------
# Deciding: which branches are dead at this threshold

def dead_branches(model: nn.Module, branches: Sequence[Branch], threshold: float,
                  masked_out: dict[str, Sequence[int]] | None = None) -> list[Branch]:
    """The branches whose every BN factor is at or under `threshold` (or already masked out).

    The threshold's own rule keeps a channel only above it, so these branches would keep
    nothing but what min_channels brings back. One branch per add at most (the larger),
    and none inside another removed branch.
    """
    mods = dict(model.named_modules())
    masked_out = masked_out or {}

    def dead(bn: str) -> bool:
        below = mods[bn].weight.detach().abs() <= threshold
        below[list(masked_out.get(bn, ()))] = True
        return bool(below.all())

    chosen: dict[tuple[str, str], Branch] = {}
    for b in branches:
        if all(dead(n) for n in b.bns):
            key = (b.block, b.add)
            if key not in chosen or len(b.modules) > len(chosen[key].modules):
                chosen[key] = b
    picked = sorted(chosen.values(), key=lambda b: -len(b.modules))
    out: list[Branch] = []
    for b in picked:  # a branch inside a larger removed one goes with it
        if not any(set(b.modules) <= set(o.modules) for o in out):
            out.append(b)
    return out


def mark_removed(plan: dict[str, list[int]], removed: Sequence[Branch]) -> dict[str, list[int]]:
    """The plan with every BN of a removed branch keeping no channel."""
    out = dict(plan)
    for b in removed:
        for n in b.bns:
            out[n] = []
    return out


def emptied_bns(plan: dict[str, Sequence[int]]) -> set[str]:
    return {n for n, kept in plan.items() if len(kept) == 0}


def branches_for_plan(model: nn.Module, plan: dict[str, Sequence[int]], analysis: Analysis,
                      opaque: Iterable[str] = ()) -> list[Branch]:
    """The branches a plan removes (its BNs that keep no channel); PruneError if they form none.
    `analysis` is of `model` (or of the model it is a copy of)."""
    empty = emptied_bns(plan)
    if not empty:
        return []
    example = None
    if analysis.graph is None:
        example = make_example(getattr(model, "netslim_meta", {}).get("input_size"), model)
    removed = [b for b in find_branches(model, example, opaque, graph=analysis.graph) if set(b.bns) <= empty]
    removed = [b for b in removed if not any(b is not o and set(b.modules) < set(o.modules) for o in removed)]
    covered = {n for b in removed for n in b.bns}
    stray = sorted(empty - covered)
    if stray:
        raise PruneError(f"the plan keeps no channel of {', '.join(stray[:4])}, which is not a whole residual "
                         "branch netslim can remove (every layer keeps at least one channel otherwise)")
    return removed


def plan_for_slicing(plan: dict[str, Sequence[int]], analysis: Analysis, removed: Sequence[Branch]
                     ) -> dict[str, list[int]]:
    """The plan with removed branches' BNs following their coupled partners outside the branch.

    A channel of such a BN that is tied to channels outside the branch (a post-activation
    block's last BN and the residual stream) goes exactly when they go; everything else of
    the branch is left as it is (the whole branch is dropped after slicing).
    """
    dead = {n for b in removed for n in b.bns}
    if not dead:
        return {n: list(k) for n, k in plan.items()}
    kept_of = {n: set(map(int, k)) for n, k in plan.items() if n not in dead}
    out = {n: list(k) for n, k in plan.items() if n not in dead}
    gone: dict[str, set[int]] = {}
    for u in analysis.units:
        inside = [(n, j) for n, j in u.bn_channels if n in dead]
        outside = [(n, j) for n, j in u.bn_channels if n not in dead]
        if inside and outside:
            n0, j0 = outside[0]
            if n0 in kept_of and j0 not in kept_of[n0]:
                for n, j in inside:
                    gone.setdefault(n, set()).add(j)
    for n, channels in gone.items():
        size = _bn_size(analysis, n)
        out[n] = [j for j in range(size) if j not in channels]
    return out


def _bn_size(analysis: Analysis, name: str) -> int:
    return len(analysis.modules[name].out_slots)


def kept_channels(mods: dict[str, nn.Module], bn_names: Sequence[str], plan: dict[str, Sequence[int]]) -> int:
    """BN channels left by a plan, a removed branch's BNs counting 0."""
    return sum(len(plan[n]) if n in plan else mods[n].num_features for n in bn_names)


# ----------------------------------------------------------------------------------------
# Removing: each block's forward without its branch

def remove_branches(model: nn.Module, removed: Sequence[Branch], opaque: Iterable[str] = ()) -> nn.Module:
    """`model` (changed in place, or a GraphModule when the model's own forward holds an add)
    with every removed branch's operand dropped from its add."""
    opaque = set(opaque)
    by_block: dict[str, list[Branch]] = {}
    for b in removed:
        by_block.setdefault(b.block, []).append(b)
    # Inner blocks first: an outer block's trace then runs through the rewritten inner one.
    for block in sorted(by_block, key=lambda p: -len(p.split(".")) if p else 0):
        module = model.get_submodule(block) if block else model
        prefix = block + "." if block else ""
        inner_opaque = {n[len(prefix):] for n in opaque if n.startswith(prefix)}
        rewritten = _without_branches(module, [_relative(b, prefix) for b in by_block[block]], inner_opaque)
        if block:
            parent, _, child = block.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, rewritten)
        else:
            rewritten.netslim_meta = getattr(model, "netslim_meta", {})
            model = rewritten
    return model


def _relative(b: Branch, prefix: str) -> Branch:
    cut = len(prefix)
    return Branch("", b.add, tuple(n[cut:] for n in b.bns), tuple(n[cut:] for n in b.modules))


def _without_branches(module: nn.Module, branches: Sequence[Branch], opaque: set[str]) -> fx.GraphModule:
    graph = Tracer(opaque).trace(module)
    mods = dict(module.named_modules())
    wanted = {frozenset(b.bns) for b in branches}
    done: set[frozenset] = set()
    while done != wanted:
        # Found again after every removal: an add's other operand may be an add just removed.
        match = next(((add, other, region) for branch, add, other, region in _branches_in(graph, mods, opaque)
                      if frozenset(branch.bns) in wanted - done), None)
        if match is None:
            break
        add, other, region = match
        done.add(frozenset(n.target for n in region if n.op == "call_module"
                           and isinstance(mods[n.target], _BatchNorm)))
        add.replace_all_uses_with(other)
        graph.erase_node(add)
        for n in reversed(region):  # only the branch: other unused values keep their side effects
            graph.erase_node(n)
    if done != wanted:
        missing = sorted(n for key in wanted - done for n in key)
        raise PruneError(f"cannot remove the residual branch of {', '.join(missing[:4])} from "
                         f"{type(module).__name__}: its add was not found when tracing the block alone")
    gm = fx.GraphModule(module, graph, class_name=f"{type(module).__name__}WithoutBranch")
    gm.training = module.training
    return gm


# ----------------------------------------------------------------------------------------
# The prune step's side: one object per prune call

class BlockRemoval:
    """Turns plans into plans that remove dead branches; finds the branches once, lazily.

    Tracing costs a forward of the model, so it only happens when some BatchNorm has every
    factor at or under the threshold (a dead branch needs all of its BNs so).
    """

    def __init__(self, model: nn.Module, analysis: Analysis, example_input: torch.Tensor,
                 untouchable: Iterable[str] = (), masked_out: dict[str, Sequence[int]] | None = None,
                 modules: dict[str, nn.Module] | None = None):
        """`modules`: dict(model.named_modules()) if the caller has it."""
        self.model, self.analysis, self.example_input = model, analysis, example_input
        self.untouchable = set(untouchable)
        self.masked_out = masked_out or {}
        self.mods = dict(model.named_modules()) if modules is None else modules
        self._branches: list[Branch] | None = None

    @property
    def branches(self) -> list[Branch]:
        if self._branches is None:
            self._branches = find_branches(self.model, self.example_input, self.untouchable, self.analysis.graph)
        return self._branches

    def _any_dead_bn(self, threshold: float) -> bool:
        """Has some BN every factor at or under `threshold` (or masked out)? Compared on all
        the factors joined, a few ops instead of three per BN, where they share a dtype (the
        comparison rounds the threshold to it) and a device; else BN by BN."""
        factors = [self.mods[n].weight.detach() for n in self.analysis.bn_names]
        if len({(f.dtype, f.device) for f in factors}) != 1:
            return any(self._dead_bn(n, f, threshold) for n, f in zip(self.analysis.bn_names, factors))
        below = torch.cat(factors).abs() <= threshold
        sizes = torch.tensor([len(f) for f in factors], device=below.device)
        starts = (sizes.cumsum(0) - sizes).tolist()
        for k, n in enumerate(self.analysis.bn_names):
            if self.masked_out.get(n):
                below[starts[k] + torch.as_tensor(list(self.masked_out[n]), device=below.device)] = True
        bn_of_factor = torch.repeat_interleave(torch.arange(len(factors), device=below.device), sizes)
        above = torch.zeros(len(factors), dtype=torch.long, device=below.device).index_add_(
            0, bn_of_factor, (~below).long())  # per BN: factors over the threshold
        return bool((above == 0).any())

    def _dead_bn(self, name: str, factors: torch.Tensor, threshold: float) -> bool:
        below = factors.abs() <= threshold
        below[list(self.masked_out.get(name, ()))] = True
        return bool(below.all())

    def __call__(self, plan: dict[str, list[int]], threshold: float, decisions: Sequence
                 ) -> tuple[dict[str, list[int]], list[Branch]]:
        """(plan with every dead branch's BNs emptied, the removed branches); `decisions`
        (prune.LayerDecision) are updated: a removed BN's channels count as removed."""
        if not self._any_dead_bn(threshold):
            return plan, []
        removed = dead_branches(self.model, self.branches, threshold, self.masked_out)
        if not removed:
            return plan, []
        dead = {n for b in removed for n in b.bns}
        unit_channels: dict[str, set[int]] = {}
        for u in self.analysis.units:
            for n, j in u.bn_channels:
                unit_channels.setdefault(n, set()).add(j)
        for d in decisions:
            lost = 0
            for n in d.bns:
                if n in dead:
                    kept = set(plan[n]) if n in plan else set(range(self.mods[n].num_features))
                    lost += len(kept & unit_channels.get(n, set()))
            d.channels_kept -= lost
            if all(n in dead for n in d.bns):
                d.kept, d.guard = 0, None
        return mark_removed(plan, removed), removed
