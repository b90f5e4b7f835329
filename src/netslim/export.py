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


def onnx_bytes(model: nn.Module, example: torch.Tensor, *, opset: int = 17) -> bytes:
    """`model` (eval mode) as an ONNX file in memory, batch dimension dynamic.

    The one exporter netslim uses: `export_onnx` writes its bytes and `profile`'s
    onnxruntime latency times them, so what is timed is what is deployed.
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
    return buf.getvalue()


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


def export_onnx(model: nn.Module, meta: dict, path: str, *, opset: int = 17, atol: float = 1e-4) -> dict[str, Any]:
    """Write ONNX (batch dimension dynamic) and compare onnxruntime's outputs with PyTorch's.

    Returns {"opset", "checked", "max_abs_diff"}. A mismatch above `atol` is an error and
    nothing is written.
    """
    model, x = deployable(model, meta)
    data = onnx_bytes(model, x, opset=opset)
    result: dict[str, Any] = {"opset": opset, "checked": False, "max_abs_diff": None}
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
