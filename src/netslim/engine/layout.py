"""Ops that move channels around: concatenation, splits, indexing, views, flatten and channel
shuffles. A mixin of the slot walk (slots.SlotWalk), which provides `unknown`, `union`,
`pin`, `fresh`, `info` and `passthrough`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .channels import ChannelInfo, Grid
from .trace import node_shape as _shape


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



class LayoutSteps:
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

    def cat_call(self, node: fx.Node) -> Any:
        args = node.args
        tensors = args[0] if args else node.kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        return self.cat(node, tensors, dim)

    def flatten_call(self, node: fx.Node, x: ChannelInfo | None) -> Any:
        args = node.args
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        return self.flatten(node, x, start, end)

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
            self.union_pairs(first.slots, c.slots)
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
                self.union_pairs(parts[0], part)
        else:
            why = "unequal parts" if len(set(sizes)) > 1 else "a size written in the code"
            self.pin(x.slots, f"{node.name} splits the channels into {why} {sizes}; they keep their width")
        return tuple(ChannelInfo(part) for part in parts)

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

    def grid_op(self, node: fx.Node, grid: Grid) -> Any:
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
            self.union_pairs(rows[0], row)
        return Grid(rows)

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


# What the walk does for each rule kind (rules.py): modules get (walk, node, rule, module,
