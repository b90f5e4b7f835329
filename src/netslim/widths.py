"""Hardware-aware widths (`prune(..., round_to="auto")`): keep the widths the kernels like.

A conv's time is not proportional to its output channels: vectorised kernels work in
blocks of channels (onnxruntime's NCHWc convs need multiples of 8 or 16; oneDNN pads to
the SIMD width), so 141 channels can cost more than 144. For each pruned layer whose
channels a conv produces, this measures that conv (its slim input width, kernel, stride,
padding and input size, + ReLU), the depthwise conv on the layer if there is one
(MobileNet), and the conv that reads the layer (so the layout changes the runtime
inserts between them count too) in the chosen runtime, thread count
and batch size at a few widths at or above the kept count - the count itself and its next multiples of 4, 8,
16 and 32, up to the layer's full width - and keeps the fastest. Widths within 3% of the
fastest count as equally fast, and the widest of those wins (more channels kept, same
time: accuracy suffers less).

Measurements are cached per machine in ~/.cache/netslim/widths.json (or
$NETSLIM_CACHE/widths.json), keyed by CPU, runtime versions, runtime, threads, batch and
the conv's shape, so a second prune of the same architecture measures nothing.

A BN that gathers channels of a wider stream (DenseNet's layers, a pre-activation
bottleneck's first BN) has no conv of its own to probe. In onnxruntime its width costs
what the export makes of it: the gather's output is padded with zero channels to the
channel block (padding.py), or folded into a conv that reads the whole stream
(export.fold_preactivation_gathers); either way the graph runs the same shapes whether
the block's last channels are zeros or kept channels, so auto keeps them: the count is
rounded up to the block as padding.padded_width pads it (where the export cannot pad the
gather's output, e.g. an op padding.py does not handle reads it, those channels cost their
share). In torch (no padding) such a layer, and a group of coupled BNs, keep their count.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .errors import NetslimError
from .fileio import atomic_write_json
from .padding import padded_width, resolve_block

log = logging.getLogger(__name__)

MULTIPLES = (4, 8, 16, 32)
TIE = 1.03              # a width within 3% of the fastest is as fast (measurement noise)
PROBE_SECONDS = 0.03    # timed per candidate width (CPU time on one thread)


def cache_path() -> Path:
    root = os.environ.get("NETSLIM_CACHE") or Path.home() / ".cache" / "netslim"
    return Path(root) / "widths.json"


def _machine() -> str:
    """What the timings depend on besides the shape: CPU model and the runtimes' versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:
        ort = "none"
    return f"{cpu}|torch {torch.__version__}|ort {ort}"


def candidates(kept: int, total: int) -> list[int]:
    """The kept count and its next multiples of MULTIPLES, none above `total`."""
    return sorted({kept} | {m * math.ceil(kept / m) for m in MULTIPLES if m * math.ceil(kept / m) <= total})


def fastest(times: dict[int, float]) -> int:
    """The widest width whose time is within TIE of the fastest one's."""
    best = min(times.values())
    return max(w for w, t in times.items() if t <= best * TIE)


def _conv_shapes(model: nn.Module, analysis: Any, plan: dict[str, list[int]],
                 example_input: torch.Tensor) -> dict[tuple[str, ...], tuple]:
    """{layer: probe shape} for each layer whose channels one plain conv produces: that conv as
    it runs in the slim model `plan` makes (input width already pruned: cin, h, w, kernel,
    stride, padding), the depthwise conv on the layer (kernel, stride, padding) or None, and
    the first plain conv reading the layer (its output width, kernel, stride, padding, and
    the pooling factor in between) or None."""
    from .engine.slim import apply_plan

    roots: dict[tuple[str, ...], set[int]] = {}
    for u in analysis.units:
        roots.setdefault(u.layer, set()).add(analysis.find(u.root))
    makes: dict[int, list[str]] = {}
    reads: dict[int, list[str]] = {}
    depthwise: dict[int, list[str]] = {}
    for name, use in analysis.modules.items():
        if use.kind == "conv":
            for r in dict.fromkeys(analysis.find(s) for s in use.out_slots):
                makes.setdefault(r, []).append(name)
            for r in dict.fromkeys(analysis.find(s) for s in use.in_slots):
                reads.setdefault(r, []).append(name)
        elif use.kind == "dwconv":
            for r in dict.fromkeys(analysis.find(s) for s in use.in_slots):
                depthwise.setdefault(r, []).append(name)
    slim = apply_plan(model, plan, example_input, analysis=analysis)
    seen: dict[str, tuple] = {}

    def hook(name: str) -> Callable:
        def record(m: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
            seen[name] = (tuple(args[0].shape[1:]), out.shape[1], tuple(m.kernel_size), tuple(m.stride),
                          tuple(m.padding), tuple(out.shape[2:]))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in slim.named_modules()
               if type(m) is nn.Conv2d and m.groups in (1, m.in_channels) and m.dilation == (1, 1)
               and isinstance(m.padding, tuple)]
    try:
        with torch.no_grad():
            slim.eval()(example_input)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer, rs in roots.items():
        producers = {n for r in rs for n in makes.get(r, [])}
        if len(producers) != 1 or (name := producers.pop()) not in seen:
            continue
        (cin, h, w), _, k, s, p, out_hw = seen[name]
        dw = next((n for r in rs for n in depthwise.get(r, []) if n in seen), None)
        if dw is not None:  # a depthwise conv on the layer (MobileNet): it runs at the layer's width too
            _, _, dk, ds, dp, out_hw = seen[dw]
            dw = (dk, ds, dp)
        consumer = None
        reader = next((n for r in rs for n in reads.get(r, []) if n in seen and n != name), None)
        if reader is not None:
            (_, rh, rw), cout, rk, rs_, rp, _ = seen[reader]
            if out_hw[0] % rh == 0 and out_hw[0] // rh == out_hw[1] // rw:
                consumer = (cout, rk, rs_, rp, out_hw[0] // rh)
        out[layer] = (cin, h, w, k, s, p, dw, consumer)
    return out


def _probe_ms(shape: tuple, width: int, runtime: str, batch: int) -> float:
    """Median CPU (one thread) or wall ms of conv(shape -> width) + ReLU [+ depthwise conv +
    ReLU] [+ pool + the consumer conv reading `width` channels] in `runtime`: the layouts and kernels the
    runtime picks around a layer of that width."""
    from .profile import forward_runner

    cin, h, w, k, s, p, dw, consumer = shape
    layers: list[nn.Module] = [nn.Conv2d(cin, width, k, stride=s, padding=p), nn.ReLU()]
    if dw is not None:
        layers += [nn.Conv2d(width, width, dw[0], stride=dw[1], padding=dw[2], groups=width), nn.ReLU()]
    if consumer is not None:
        cout, ck, cs, cp, pool = consumer
        layers += ([nn.MaxPool2d(pool)] if pool > 1 else []) + [nn.Conv2d(width, cout, ck, stride=cs, padding=cp)]
    run = forward_runner(nn.Sequential(*layers).eval(), (cin, h, w), batch, runtime=runtime)
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    for _ in range(2):
        run()
    times: list[float] = []
    spent = 0.0
    while len(times) < 5 or (spent < PROBE_SECONDS and len(times) < 200):
        t0 = clock()
        run()
        times.append(clock() - t0)
        spent += times[-1]
    return statistics.median(times) * 1e3


def _gathered(analysis: Any, bns: tuple[str, ...]) -> bool:
    """Whether the layer is one BN gathering channels of a wider stream."""
    return len(bns) == 1 and getattr(analysis.modules.get(bns[0]), "bn_mode", "") == "gather"


def choose_widths(model: nn.Module, analysis: Any, plan: dict[str, list[int]], decisions: list,
                  example_input: torch.Tensor, *, runtime: str = "torch", batch_size: int = 1,
                  threads: Optional[int] = None) -> dict[tuple[str, ...], int]:
    """{layer: width to keep} for the layers where a wider choice measured at least as fast."""
    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    path = cache_path()
    try:
        cache: dict[str, float] = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    fresh = 0
    chosen: dict[tuple[str, ...], int] = {}
    try:
        shapes = _conv_shapes(model, analysis, plan, example_input)
        # onnxruntime runs the export as it is deployed: odd widths padded (padding.py), which changes the timings
        block = resolve_block("auto") if runtime == "onnxruntime" else None
        padded = f"|pad{block}" if runtime == "onnxruntime" else ""
        prefix = f"{_machine()}|{runtime}{padded}|t{torch.get_num_threads()}|b{batch_size}"
        for d in decisions:
            if d.kept >= d.total:
                continue
            if d.bns not in shapes:
                if block and d.kept and _gathered(analysis, d.bns):
                    width = min(padded_width(d.kept, block), d.total)
                    if width > d.kept:
                        chosen[d.bns] = width
                        log.info("%s: %d -> %d channels (gathered: the export runs it %d wide)", d.name, d.kept,
                                 width, width)
                continue
            times = {}
            for width in candidates(d.kept, d.total):
                key = f"{prefix}|{shapes[d.bns]}|{width}"
                if key not in cache:
                    cache[key] = _probe_ms(shapes[d.bns], width, runtime, batch_size)
                    fresh += 1
                times[width] = cache[key]
            width = fastest(times)
            if width != d.kept:
                chosen[d.bns] = width
                log.info("%s: %d -> %d channels (%.3f -> %.3f ms)", d.name, d.kept, width,
                         times[d.kept], times[width])
    finally:
        torch.set_num_threads(prev)
    if fresh:
        try:
            atomic_write_json(path, cache)
        except NetslimError as e:  # a cache that cannot be written costs time next run, nothing else
            log.warning("could not write the width cache %s: %s", path, e)
    return chosen
