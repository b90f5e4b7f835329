"""Export a (slim) model for deployment: ONNX, checked against PyTorch, and TorchScript.

A mask-mode checkpoint is exported as the slim model it stands for (the masked channels
removed), since that is the model worth deploying; the outputs are identical.
"""
from __future__ import annotations

import importlib
import io
import logging
import warnings
from typing import Any, Optional

import torch
from torch import nn

from .engine.trace import example_input
from .errors import ConfigError, NetslimError
from .fileio import atomic_write_bytes
from . import padding
from .padding import PadSetting, resolve_block

log = logging.getLogger(__name__)

# What ONNX export cannot run without: torch's exporter writes through the onnx package.
# onnxruntime (the same extra) is optional: without it the file is written unchecked.
ONNX_REQUIRES = ("onnx",)


def check_onnx_dependencies() -> None:
    """Raise NetslimError unless ONNX export can run. Call it before writing anything, so that
    a missing package never leaves half of what was asked (e.g. the TorchScript file) behind."""
    missing = []
    for name in ONNX_REQUIRES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise NetslimError(f"ONNX export needs {' and '.join(missing)}, which is not installed: "
                           "pip install netslim[onnx] (or pip install onnx onnxruntime)")


def deployable(model: nn.Module, meta: dict) -> tuple[nn.Module, torch.Tensor]:
    """The eval-mode slim model to export (a mask applied as removal) and an example input."""
    from .engine.slim import apply_plan

    x = example_input(meta.get("input_size"), model)
    mask = meta.get("mask") or {}
    if mask:
        model = apply_plan(model, mask, x)
    return model.eval(), x


def export_torchscript(model: nn.Module, meta: dict, path: str) -> None:
    """Trace the model and write it atomically (torch.jit.load reads it without netslim)."""
    model, x = deployable(model, meta)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still widely deployed
        torch.jit.save(torch.jit.trace(model, x), buf)
    atomic_write_bytes(path, buf.getvalue())


def onnx_bytes(model: nn.Module, example: torch.Tensor, *, opset: int = 17, fold_gathers: bool = True,
               pad_channels: PadSetting = "auto") -> bytes:
    """`model` (eval mode) as an ONNX file in memory, batch dimension dynamic.

    The one exporter netslim uses: `export_onnx` writes its bytes and `profile`'s
    onnxruntime latency times them, so what is timed is what is deployed.
    `fold_gathers`: fold the channel gathers of pre-activation 1x1 convs into their
    weights (fold_preactivation_gathers), which onnxruntime runs faster.
    `pad_channels`: "auto" (onnxruntime's NCHWc block on this CPU: 16 with AVX-512, 8 with
    AVX2, none without), "off", or a channel multiple: odd widths padded with zero channels
    (padding.pad_channels), so onnxruntime runs them in its blocked layout; same outputs.
    """
    check_onnx_dependencies()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        try:
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except Exception as e:  # the exporter raises many types for unsupported ops
            raise NetslimError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    data = fold_preactivation_gathers(buf.getvalue()) if fold_gathers else buf.getvalue()
    block = resolve_block(pad_channels)
    return padding.pad_channels(data, block)[0] if block else data


def _single_consumer(node: Any, readers: dict[str, list], op_type: str) -> Any:
    """The one node reading `node`'s output if it is an `op_type`, else None."""
    nxt = readers.get(node.output[0], [])
    return nxt[0] if len(nxt) == 1 and nxt[0].op_type == op_type else None


def fold_preactivation_gathers(data: bytes) -> bytes:
    """Fold each Gather(channels) -> BatchNormalization -> Relu -> 1x1 Conv into the conv.

    A pre-activation block (ResNet-164's bottleneck) prunes its first BN by gathering the
    kept channels of the full-width residual stream. onnxruntime runs that stream in its
    blocked NCHWc layout, where a channel gather cannot run: every block paid a reorder out
    of it and back, and the BN and ReLU it separates ran unfused (onnxruntime's profiler:
    a third of the slim model's time). Folded, the BN and ReLU run at the stream's width
    (the dropped channels with scale 0 and shift 0, so they output exactly 0) and the conv
    reads the whole stream with zero weights for the dropped channels: the same outputs,
    and no op onnxruntime cannot fuse. Only 1x1 convs that narrow the stream at least 2x (a
    bottleneck's first conv), where the zero weights cost less than what they remove: a
    3x3 conv pays the full width 9 times over, a 1x1 as wide as the stream (DenseNet's
    transitions) once (measured: DenseNet-40 40% 1.14x -> 1.07x dense folded).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(data))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # torch's exporter shares equal tensors through Identity nodes
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    widths = {v.name: v.type.tensor_type.shape.dim[1].dim_value
              for v in [*model.graph.value_info, *model.graph.input] if len(v.type.tensor_type.shape.dim) == 4}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    folded = []
    for gather in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gather.attribute}
        if gather.op_type != "Gather" or attrs.get("axis") != 1 or gather.input[1] not in inits \
                or not widths.get(gather.input[0]):
            continue
        bn = _single_consumer(gather, readers, "BatchNormalization")
        relu = bn is not None and _single_consumer(bn, readers, "Relu")
        conv = relu and _single_consumer(relu, readers, "Conv")
        if not conv or any(name not in inits for name in (*bn.input[1:5], conv.input[1])):
            continue
        weight = numpy_helper.to_array(inits[conv.input[1]])
        conv_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        width = widths[gather.input[0]]
        if weight.shape[2:] != (1, 1) or conv_attrs.get("group", 1) != 1 or 2 * weight.shape[0] > width:
            continue
        kept = numpy_helper.to_array(inits[gather.input[1]]).astype(np.int64) % width
        if kept.ndim != 1 or len(np.unique(kept)) != len(kept):  # a repeated channel is not a selection
            continue
        # BN scale, shift, mean, var at the full width: a dropped channel outputs 0 (scale 0, shift 0)
        for slot, fill in zip(range(1, 5), (0.0, 0.0, 0.0, 1.0)):
            values = numpy_helper.to_array(inits[bn.input[slot]])
            full = np.full(width, fill, dtype=values.dtype)
            full[kept] = values
            bn.input[slot] = _add_initializer(model, f"{bn.input[slot]}.full", full)
        full_weight = np.zeros((weight.shape[0], width, 1, 1), dtype=weight.dtype)
        full_weight[:, kept] = weight
        conv.input[1] = _add_initializer(model, f"{conv.input[1]}.full", full_weight)
        bn.input[0] = gather.input[0]
        folded.append(gather)
    for gather in folded:
        model.graph.node.remove(gather)
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for stale in [n for n in model.graph.node if n.op_type == "Identity" and n.output[0] not in used]:
        model.graph.node.remove(stale)
    used = {name for node in model.graph.node for name in node.input}
    for stale in [t for t in model.graph.initializer if t.name not in used]:  # the narrow BN, weight, indices
        model.graph.initializer.remove(stale)
    del model.graph.value_info[:]  # the inferred shapes: some changed; onnxruntime infers them again
    return model.SerializeToString()


def _add_initializer(model: Any, name: str, values: Any) -> str:
    from onnx import numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(values, name))
    return name


def onnxruntime_session(data: bytes, threads: Optional[int] = None, *, profile_prefix: Optional[str] = None) -> Any:
    """An onnxruntime CPU InferenceSession as it is deployed for latency: `threads` intra-op
    threads (None: onnxruntime's default), sequential execution, every graph optimisation
    on. `profile_prefix` turns on onnxruntime's per-op profiler (session.end_profiling())."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed: pip install onnxruntime "
                          "(or netslim[onnx])") from None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: it warns about unused initializers of folded BNs
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, meta: dict, path: str, *, opset: int = 17, atol: float = 1e-4,
                pad_channels: PadSetting = "auto") -> dict[str, Any]:
    """Write ONNX (batch dimension dynamic) and compare onnxruntime's outputs with PyTorch's.

    `pad_channels` as in onnx_bytes (default "auto": odd widths padded to onnxruntime's
    channel block on this CPU). Returns {"opset", "pad_channels" (the block, or None),
    "checked", "max_abs_diff"}. A mismatch above `atol` is an error and nothing is written.
    """
    model, x = deployable(model, meta)
    block = resolve_block(pad_channels)
    data = onnx_bytes(model, x, opset=opset, pad_channels=block)
    result: dict[str, Any] = {"opset": opset, "pad_channels": block, "checked": False, "max_abs_diff": None}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("onnxruntime is not installed: the ONNX file was not checked (pip install netslim[onnx])")
    else:
        batch = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        session = onnxruntime_session(data)
        got = torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])
        with torch.no_grad():
            want = model(batch)
        diff = float((got - want).abs().max())
        result.update(checked=True, max_abs_diff=diff)
        if not diff <= atol:
            raise NetslimError(f"onnxruntime's outputs differ from PyTorch's by {diff:.3g} (> {atol}); "
                               "not writing the ONNX file")
    atomic_write_bytes(path, data)
    return result
