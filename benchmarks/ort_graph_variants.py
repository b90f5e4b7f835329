"""What the exported graph costs in onnxruntime: graph variants of a slim model, timed side by side.

    python benchmarks/ort_graph_variants.py MODEL PERCENT BATCH [VARIANTS] [--round-to K] [--rounds N] [--per-turn N] [--profile]

MODEL: vgg-13, resnet-164, densenet-40, mobilenetv2 (bench_deploy's models, BN factors from
bench_inference.emulate_sparsity, seed 0), pruned by netslim.prune(model, PERCENT,
round_to=K). One onnxruntime thread, every graph optimisation; dense and each variant
timed interleaved (median process CPU time per forward; at batch <= 8 turns of one untimed
and 4 timed forwards, as bench_deploy.interleaved_ms). "slim" is the graph as netslim
exports it (export.onnx_bytes: the gathers of pre-activation bottlenecks folded, odd widths
padded), "unfolded" the same with fold_gathers=False. VARIANTS (comma list):
  padmaxR   "slim" with only the channel classes padded whose padded width is at most R
            times their own (padmax1: none padded; padmax2: every one, as the export)
and, rewriting "unfolded":
  foldall   every Gather -> BN -> ReLU -> Conv folded into the conv (3x3 and wide 1x1 too)
  bnfirst   BN + ReLU at the stream's width, the Gather after them
  selconv   the Gather as a 1x1 conv with a 0/1 weight (onnxruntime folds the BN into it)
  nonchwc   dense and slim with onnxruntime's NchwcTransformer disabled (a diagnostic:
            the blocked layout's share; a deployment would have to set it)
Each line gives the multiply-adds per image the graph's convs really run (padded zeros and
folded full-width reads included). --profile adds onnxruntime's per-op kernel time
(SessionOptions.enable_profiling), as shares of the total (the profiler's own overhead inflates the ms).
"""
import argparse
import collections
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from bench_deploy import interleaved_ms
from bench_inference import emulate_sparsity
from netslim.export import onnx_bytes
from netslim.padding import pad_channels, paddable_classes, resolve_block
from netslim.models import build_model
from netslim.profile import count
from netslim.engine.prune import prune

torch.set_num_threads(1)
ARCH = {"vgg-13": ("vgg", dict(depth=13)), "resnet-164": ("resnet", dict(depth=164)),
        "densenet-40": ("densenet", dict(depth=40)), "mobilenetv2": ("mobilenetv2", {})}


def inits(m):
    return {i.name: i for i in m.graph.initializer}


def consumers(m):
    c = collections.defaultdict(list)
    for n in m.graph.node:
        for i in n.input:
            c[i].append(n)
    return c


def chains(m):
    """Gather(axis 1, const idx) -> BatchNormalization -> Relu -> Conv(group 1), single consumers."""
    ini, cons = inits(m), consumers(m)
    out = []
    for g in m.graph.node:
        if g.op_type != "Gather" or g.input[1] not in ini:
            continue
        nxt = cons[g.output[0]]
        if len(nxt) != 1 or nxt[0].op_type != "BatchNormalization":
            continue
        bn = nxt[0]
        nxt = cons[bn.output[0]]
        if len(nxt) != 1 or nxt[0].op_type != "Relu":
            continue
        relu = nxt[0]
        nxt = cons[relu.output[0]]
        if len(nxt) != 1 or nxt[0].op_type != "Conv":
            continue
        conv = nxt[0]
        if any(a.name == "group" and a.i != 1 for a in conv.attribute):
            continue
        out.append((g, bn, relu, conv))
    return out


def full_width(m, g, bn, total, kept_idx):
    """BN params scattered to the full width: dropped channels scale 0, bias 0 (relu(0) = 0)."""
    ini = inits(m)
    arrs = [numpy_helper.to_array(ini[n]) for n in bn.input[1:]]
    fill = [0.0, 0.0, 0.0, 1.0]
    fulls = []
    for a, f in zip(arrs, fill):
        b = np.full(total, f, dtype=a.dtype)
        b[kept_idx] = a
        fulls.append(b)
    return fulls


def add_init(m, name, arr):
    m.graph.initializer.append(numpy_helper.from_array(arr, name))
    return name


def stream_width(m, name):
    vi = {v.name: v for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    return vi[name].type.tensor_type.shape.dim[1].dim_value


def variant(data, kind):
    """The unfolded graph `data` with every Gather -> BN -> ReLU -> Conv chain rewritten (see the docstring)."""
    m = onnx.load_from_string(data)
    m = onnx.shape_inference.infer_shapes(m)
    ini = inits(m)
    for g, bn, relu, conv in chains(m):
        idx = numpy_helper.to_array(ini[g.input[1]]).astype(np.int64)
        total = stream_width(m, g.input[0])
        fulls = full_width(m, g, bn, total, idx)
        names = [add_init(m, f"{bn.name}_full_{j}", a) for j, a in enumerate(fulls)]
        if kind == "foldall":
            w = numpy_helper.to_array(ini[conv.input[1]])
            wf = np.zeros((w.shape[0], total, *w.shape[2:]), dtype=w.dtype)
            wf[:, idx] = w
            wname = add_init(m, conv.input[1] + "_full", wf)
            bn.input[0] = g.input[0]
            bn.input[1:] = names
            conv.input[1] = wname
            m.graph.node.remove(g)
        elif kind == "bnfirst":
            bn.input[0] = g.input[0]
            bn.input[1:] = names
            relu_out = relu.output[0]
            g.input[0] = relu_out + "_full"
            relu.output[0] = relu_out + "_full"
            g.output[0] = relu_out
            # topological order: move the gather after the relu
            m.graph.node.remove(g)
            pos = list(m.graph.node).index(relu)
            m.graph.node.insert(pos + 1, g)
        elif kind == "selconv":
            sel = np.zeros((len(idx), total, 1, 1), dtype=np.float32)
            sel[np.arange(len(idx)), idx] = 1
            sname = add_init(m, g.name + "_sel", sel)
            c = helper.make_node("Conv", [g.input[0], sname], [g.output[0]], name=g.name + "_selconv",
                                 kernel_shape=[1, 1])
            pos = list(m.graph.node).index(g)
            m.graph.node.remove(g)
            m.graph.node.insert(pos, c)
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    return m.SerializeToString()


def session(data, disabled=(), prof=None):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.log_severity_level = 3
    if prof:
        o.enable_profiling = True
        o.profile_file_prefix = prof
    return ort.InferenceSession(data, o, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))


def op_profile(data, x, n=5, disabled=()):
    """{op type: kernel ms summed over n forwards (warm-up included)} and their total."""
    s = session(data, disabled, prof=os.path.join(tempfile.gettempdir(), "ort_variants"))
    for _ in range(n):
        s.run(None, {"input": x})
    path = s.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    per = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["args"]["op_name"]] += e["dur"] / 1e3
    return dict(per.most_common()), sum(per.values())


def graph_macs(data):
    """Multiply-adds per image of the graph's Conv and Gemm nodes (padded zeros included)."""
    m = onnx.shape_inference.infer_shapes(onnx.load_from_string(data))
    shape = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*m.graph.value_info, *m.graph.output]}
    weights = {t.name: t.dims for t in m.graph.initializer}
    for n in m.graph.node:  # the exporter shares equal tensors through Identity nodes
        if n.op_type == "Identity" and n.input[0] in weights:
            weights[n.output[0]] = weights[n.input[0]]
    total = 0
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            spatial = np.prod(shape[n.output[0]][2:]) if n.op_type == "Conv" else 1
            total += int(np.prod(weights[n.input[1]])) * int(spatial)
    return total


def check_equal(a, b, x):
    ya = session(a).run(None, {"input": x})[0]
    yb = session(b).run(None, {"input": x})[0]
    return float(np.abs(ya - yb).max() / np.abs(ya).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=list(ARCH))
    ap.add_argument("percent", type=float)
    ap.add_argument("batch", type=int)
    ap.add_argument("variants", nargs="?", default="foldall,bnfirst,selconv,nonchwc")
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 6 at batch <= 8, else 5)")
    ap.add_argument("--per-turn", type=int, default=None,
                    help="forwards timed per turn after an untimed one (default 4 at batch <= 8, else 1)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    arch, kw = ARCH[args.model]
    dense = emulate_sparsity(build_model(arch, num_classes=10, **kw), seed=0).eval()
    slim, _ = prune(dense, args.percent, round_to=args.round_to)
    slim.eval()
    ex = torch.randn(1, 3, 32, 32)
    macs = count(dense, (3, 32, 32))["macs"] / count(slim, (3, 32, 32))["macs"]
    dd, unfolded = onnx_bytes(dense, ex), onnx_bytes(slim, ex, fold_gathers=False)
    x = np.random.RandomState(0).randn(args.batch, 3, 32, 32).astype(np.float32)
    vs = {"dense": (dd, ()), "slim": (onnx_bytes(slim, ex), ()), "unfolded": (unfolded, ())}
    for k in [v for v in args.variants.split(",") if v]:
        if k.startswith("padmax"):
            block, plain = resolve_block("auto"), onnx_bytes(slim, ex, pad_channels="off")
            limit = float(k[len("padmax"):])
            chosen = {i for i, c in enumerate(paddable_classes(plain, block)) if c["padded"] <= limit * c["width"]}
            vs[k] = (pad_channels(plain, block, only=chosen)[0], ())
        elif k == "nopad":
            vs[k] = (onnx_bytes(slim, ex, pad_channels="off", fold_gathers=False), ())
        elif k == "nonchwc":
            vs["slim nonchwc"] = (vs["slim"][0], ("NchwcTransformer",))
            vs["dense nonchwc"] = (dd, ("NchwcTransformer",))
        else:
            v = variant(unfolded, k)
            print(f"# {k}: max |diff| / max |y| vs unfolded {check_equal(unfolded, v, x[:2]):.2e}", flush=True)
            vs[k] = (v, ())
    fns = []
    for label, (data, dis) in vs.items():
        s = session(data, dis)
        feed = {"input": x}
        fns.append(lambda s=s, feed=feed: s.run(None, feed))
    rounds = args.rounds or (6 if args.batch <= 8 else 5)
    ms = interleaved_ms(fns, rounds, cpu_clock=True, per_turn=args.per_turn or (4 if args.batch <= 8 else 1))
    print(f"== {args.model} {args.percent:.0%} b{args.batch} round_to {args.round_to}: MAC ratio {macs:.2f}x, "
          f"load {os.getloadavg()[0]:.1f}")
    for (label, _), t in zip(vs.items(), ms):
        print(f"{label:14s} {t:9.2f} ms  speedup {ms[0] / t:5.2f}x  ratio {ms[0] / t / macs:.2f}  "
              f"graph MACs {graph_macs(vs[label][0]) / 1e6:.1f}M", flush=True)
    if args.profile:
        for label, (data, dis) in vs.items():
            per, tot = op_profile(data, x, disabled=dis)
            print(f"-- profile {label}: " + ", ".join(f"{k} {v / tot:.0%}" for k, v in per.items() if v / tot >= 0.005),
                  flush=True)


if __name__ == "__main__":
    main()
