"""Parameters, MACs/FLOPs, latency and peak memory of a model.

Counting convention (thop 0.1.1, which produced the seed's table; see REFERENCE.md)
-------------------------------------------------------------------------------------
MACs are counted per forward call of a module, on the shapes it actually sees:

- Conv (1d/2d/3d): out.numel() * (Cin/groups) * prod(kernel). A bias adds nothing.
- Linear: in_features * out.numel(). A bias adds nothing.
- BatchNorm/InstanceNorm/LayerNorm/GroupNorm: 2 * numel, doubled again when affine
  (so 4 per element for an ordinary BN), in train or eval mode alike. thop reads the
  input's numel; this module reads the output's, which is the same for a plain norm and,
  for the pruning engine's gather-then-normalise BN, is the reduced width it computes.
- AvgPool: 1 per output element. AdaptiveAvgPool: (prod(in_spatial / out_spatial) + 1)
  per output element (float kernel, truncated to int as thop does).
- ReLU, max-pool, dropout, concatenation, addition, gathers and anything else: 0.

Differences from thop, all outside the seed's models:
- Modules are matched by isinstance, not exact type, so subclasses (the pruning engine's
  gathering BN, a user's Conv2d subclass) are counted.
- ConvTranspose counts its true MACs, in.numel() * (Cout/groups) * prod(kernel); thop
  applies the forward-conv formula to it.
- thop also counts PReLU, Softmax, Upsample and RNN modules; they count 0 here.
- Work that no counted module performs is not lost: conv, matmul-family and attention
  ops issued *outside* the modules above (F.conv2d or x @ w in a custom forward, an
  unknown module that calls F.linear) are seen at the aten level by a
  TorchDispatchMode and counted with the same conv/linear formulas. Ops issued from
  inside a counted module are skipped there, so nothing is counted twice. Functional
  pooling and normalisation are not counted, matching thop's blind spot.

All the rules need are shapes, so `count` runs the forward on the meta device (weights
swapped for meta stand-ins with torch.func.functional_call: no arithmetic, the model
untouched) and falls back to a real forward when the model needs data (`.item()`, NumPy).

The seed's table has a second blind spot: thop only hooks modules registered on the
model, and the seed called some average pools inline (vgg: `nn.AvgPool2d(2)(x)` in
forward; densenet: `F.avg_pool2d` in each transition). netslim's models call them inline
too, so `count` reproduces the seed's table exactly.

Peak memory
-----------
On CUDA it comes from the caching allocator's statistics. On CPU there is no allocator
statistic, so a TorchDispatchMode tracks every tensor storage an aten op returns (each
storage once, views included) and subtracts it when the storage is freed (a
weakref.finalize on the storage). Composite ops are decomposed so their intermediates are
seen. What it cannot see is scratch memory a kernel allocates and frees internally
(e.g. oneDNN reorders), so it is a lower bound on the process's true peak.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import time
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AvgPoolNd
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import ConfigError
from .gc_pause import paused_gc
from .meta_shapes import fast_meta_op

__all__ = ["RUNTIMES", "count", "count_params", "forward_runner", "measure_latency", "peak_memory", "profile",
           "release", "timed_turn"]

# Where latency is measured: PyTorch eager, or the exported ONNX graph in onnxruntime.
RUNTIMES = ("torch", "onnxruntime")

log = logging.getLogger(__name__)

DeviceLike = Union[str, torch.device]
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# MAC rules for modules (thop 0.1.1's conventions; see the module docstring)

def _conv_macs(m: _ConvNd, x: Tensor, y: Tensor) -> int:
    # weight: Cout x Cin/groups x k...; each output element costs (Cin/groups) * prod(k) MACs
    return y.numel() * math.prod(m.weight.shape[1:])


def _conv_transpose_macs(m: _ConvNd, x: Tensor, y: Tensor) -> int:
    # weight: Cin x Cout/groups x k...; each *input* element is scattered to (Cout/groups) * prod(k) outputs
    return x.numel() * math.prod(m.weight.shape[1:])


def _linear_macs(m: nn.Linear, x: Tensor, y: Tensor) -> int:
    return m.in_features * y.numel()


def _norm_macs(m: nn.Module, x: Tensor, y: Tensor) -> int:
    affine = bool(getattr(m, "affine", False) or getattr(m, "elementwise_affine", False))
    return 2 * y.numel() * (2 if affine else 1)


def _avgpool_macs(m: nn.Module, x: Tensor, y: Tensor) -> int:
    return y.numel()


def _adaptive_avgpool_macs(m: nn.Module, x: Tensor, y: Tensor) -> int:
    # thop: (adds per output = prod(in/out) over the pooled dims, as floats) + 1 division
    nd = 3 if isinstance(m, nn.AdaptiveAvgPool3d) else 2 if isinstance(m, nn.AdaptiveAvgPool2d) else 1
    kernel = math.prod(float(i) / float(o) for i, o in zip(x.shape[-nd:], y.shape[-nd:]))
    return int((kernel + 1) * y.numel())


# Checked in order: the first matching base class wins (transposed convs are _ConvNd too).
_MODULE_RULES: tuple[tuple[type, Callable[[Any, Tensor, Tensor], int]], ...] = (
    (_ConvTransposeNd, _conv_transpose_macs),
    (_ConvNd, _conv_macs),
    (nn.Linear, _linear_macs),
    (_BatchNorm, _norm_macs),
    (_InstanceNorm, _norm_macs),
    (nn.LayerNorm, _norm_macs),
    (nn.GroupNorm, _norm_macs),
    (_AvgPoolNd, _avgpool_macs),
    (_AdaptiveAvgPoolNd, _adaptive_avgpool_macs),
)


def _module_rule(m: nn.Module) -> Optional[Callable[[Any, Tensor, Tensor], int]]:
    for cls, rule in _MODULE_RULES:
        if isinstance(m, cls):
            return rule
    return None


# ---------------------------------------------------------------------------------------------
# MAC rules for aten ops issued outside counted modules

def _aten_conv_macs(args: tuple, out: Any) -> int:
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    x, w, transposed = args[0], args[1], args[6]
    return (x.numel() if transposed else out.numel()) * math.prod(w.shape[1:])


def _aten_mm_macs(a: Tensor, b: Tensor) -> int:
    # a: ... x n x k, b: ... x k x m  ->  n*k*m per batch entry
    return a.numel() * b.shape[-1]


def _aten_sdpa_macs(args: tuple, out: Any) -> int:
    # q: ... x L x E, k: ... x S x E, v: ... x S x Ev  ->  q @ k^T (L*S*E) + attn @ v (L*S*Ev)
    q, k, v = args[0], args[1], args[2]
    return math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])


_ATEN_RULES: dict[Any, Callable[[tuple, Any], int]] = {
    aten.convolution: _aten_conv_macs,
    aten._convolution: _aten_conv_macs,
    aten.mm: lambda a, o: _aten_mm_macs(a[0], a[1]),
    aten.bmm: lambda a, o: _aten_mm_macs(a[0], a[1]),
    aten.addmm: lambda a, o: _aten_mm_macs(a[1], a[2]),
    aten.baddbmm: lambda a, o: _aten_mm_macs(a[1], a[2]),
    aten.addbmm: lambda a, o: _aten_mm_macs(a[1], a[2]),
    aten.mv: lambda a, o: a[0].numel(),
    aten.addmv: lambda a, o: a[1].numel(),
    aten.dot: lambda a, o: a[0].numel(),
    aten.vdot: lambda a, o: a[0].numel(),
}
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_attention_math"):
    if hasattr(aten, _name):
        _ATEN_RULES[getattr(aten, _name)] = _aten_sdpa_macs


class _DecomposingMode(TorchDispatchMode):
    """A dispatch mode that sees the aten ops composite ops are made of.

    Under inference_mode, composite ops (aten.linear, aten.conv2d, aten.matmul) reach the
    mode whole; re-running their decomposition inside the mode shows the parts.
    """

    def _leaf(self, func: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def _handles(self, func: Any) -> bool:
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if not self._handles(func):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return self._leaf(func, args, kwargs)


class _OpCounter(_DecomposingMode):
    """Counts MACs of conv/matmul/attention aten ops issued while no counted module runs."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.depth = 0  # > 0 while a counted (hooked) module's forward runs

    def _handles(self, func: Any) -> bool:
        # Inside a counted module nothing is counted: no need to look inside composite ops
        # (decomposing every batch_norm into prims took 0.3 s of a ResNet-50 count at 224).
        return self.depth > 0 or func.overloadpacket in _ATEN_RULES

    def _leaf(self, func: Any, args: tuple, kwargs: dict) -> Any:
        out = fast_meta_op(func, args)  # eval batch norm, convs... on meta: their shapes, without the slow kernels
        if out is None:
            out = func(*args, **kwargs)
        rule = _ATEN_RULES.get(func.overloadpacket)
        if rule is not None and self.depth == 0:
            self.macs += int(rule(args, out))
        return out


# ---------------------------------------------------------------------------------------------
# Counting

def count_params(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> int:
    """Number of parameters (trainable or not; buffers excluded; shared ones once).
    `modules`: dict(model.named_modules()) if the caller has it (saves a walk of the model)."""
    if modules is None:
        return sum(p.numel() for p in model.parameters())
    seen: set[int] = set()  # model.parameters() lists a shared parameter once
    total = 0
    for m in modules.values():
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _first_tensor(output: Any) -> Optional[Tensor]:
    for leaf in tree_leaves(output):
        if isinstance(leaf, Tensor):
            return leaf
    return None


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _random_input(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    # A private generator: profiling must not move the caller's global RNG stream.
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)


def _check_size(input_size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(input_size)
    if not size or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ConfigError(f"input_size {input_size!r} is not valid: use positive ints per example, e.g. (3, 32, 32)")
    return size


def _count_macs(model: nn.Module, x: Tensor, excluded: set[str], on_meta: bool) -> int:
    """MACs of one eval-mode forward of `model` on `x`: module hooks plus the op counter."""
    counter = _OpCounter()
    handles = []

    def enter(m: nn.Module, args: Any) -> None:
        counter.depth += 1

    def leave(rule: Optional[Callable]) -> Callable:
        def hook(m: nn.Module, args: Any, output: Any) -> None:
            counter.depth -= 1
            x, y = _first_tensor(args), _first_tensor(output)
            if rule is not None and x is not None and y is not None:
                counter.macs += int(rule(m, x, y))
        return hook

    for name, m in model.named_modules():
        rule = _module_rule(m)
        if name in excluded or rule is not None:
            handles.append(m.register_forward_pre_hook(enter))
            # always_call: keep depth balanced even if forward raises
            handles.append(m.register_forward_hook(leave(None if name in excluded else rule), always_call=True))

    was_training = model.training
    model.eval()
    # Shapes are all the rules need: on meta, run on meta stand-ins of the weights (no compute),
    # made before the counter starts (it would see each copy: a tenth of a count).
    state = {n: t.to("meta") for n, t in [*model.named_parameters(), *model.named_buffers()]} if on_meta else {}
    try:
        with torch.no_grad(), counter:
            if on_meta:
                torch.func.functional_call(model, state, (x,))
            else:
                model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counter.macs


def count(model: nn.Module, input_size: Optional[Sequence[int]] = None, *,
          example_input: Optional[Tensor] = None, exclude: Iterable[str] = (),
          on_meta: bool = True) -> dict[str, int]:
    """{'params', 'macs', 'flops'} of one eval-mode forward (flops = 2 * macs).

    `input_size` is one example's shape, e.g. (3, 32, 32); it runs at batch 1 on the
    model's device and dtype. `example_input` is used as given instead (MACs then scale
    with its batch). `exclude` names modules (as in named_modules) whose work counts 0.
    `on_meta` counts from shapes alone on the meta device (no arithmetic, fast); a model
    that needs real data (`.item()`, NumPy, tensors made in forward) falls back to a real
    forward on its own device.
    """
    if (input_size is None) == (example_input is None):
        raise ValueError("count() needs exactly one of input_size and example_input")
    shape = tuple(example_input.shape) if example_input is not None else (1, *_check_size(input_size))
    excluded = set(exclude)
    missing = sorted(excluded - {name for name, _ in model.named_modules()})
    if missing:
        raise ConfigError(f"exclude names no module of the model: {', '.join(missing)}")

    device, dtype = _device_dtype(model)
    dtype = example_input.dtype if example_input is not None else dtype
    macs: Optional[int] = None
    if on_meta:
        try:
            macs = _count_macs(model, torch.empty(shape, device="meta", dtype=dtype), excluded, on_meta=True)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
            log.debug("counting on meta failed (%s: %s); counting with a real forward", type(err).__name__, err)
    if macs is None:
        x = example_input if example_input is not None else _random_input(shape, device, dtype)
        macs = _count_macs(model, x, excluded, on_meta=False)
    return {"params": count_params(model), "macs": macs, "flops": 2 * macs}


# ---------------------------------------------------------------------------------------------
# Running on a device: latency and memory

def _resolve_device(device: DeviceLike) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} is not available (no CUDA here): use device 'cpu'")
    return dev


def _prepare(model: nn.Module, device: torch.device, dtype: Optional[torch.dtype],
             channels_last: bool) -> nn.Module:
    """`model` itself if it already suits device/dtype/layout, else a converted copy.

    The caller's model is never moved or cast: the copy takes the conversion.
    """
    cur_device, cur_dtype = _device_dtype(model)
    same = (cur_device.type == device.type and (device.index is None or cur_device == device)
            and (dtype is None or dtype == cur_dtype) and not channels_last)
    if same:
        return model
    net = copy.deepcopy(model).to(device=device, dtype=dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def _input(net: nn.Module, batch: int, size: tuple[int, ...], channels_last: bool) -> Tensor:
    device, dtype = _device_dtype(net)
    x = _random_input((batch, *size), device, dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_batches(batch_sizes: Sequence[int]) -> list[int]:
    sizes = list(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ConfigError(f"batch sizes {batch_sizes!r} are not valid: use positive ints, e.g. (1, 64)")
    return sizes


def _forward(net: nn.Module, x: Tensor, device: torch.device) -> None:
    """One forward, until its work is done."""
    net(x)
    _sync(device)  # CUDA launches are asynchronous


def _median_ms(run: Callable[[], Any], warmup: int, repeats: Optional[int], target_seconds: float) -> tuple[float, int]:
    """(median milliseconds of `run`, how many timed runs): `warmup` untimed runs first;
    `repeats` None times enough runs (at least 3) to fill about `target_seconds`."""
    for _ in range(warmup):
        run()
    t0 = time.perf_counter()
    run()
    times = [time.perf_counter() - t0]
    n = repeats if repeats is not None else max(3, math.ceil(target_seconds / max(times[0], 1e-6)))
    for _ in range(n - 1):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(times)


def _onnxruntime_session(model: nn.Module, size: tuple[int, ...], threads: Optional[int]) -> Any:
    """`model` exported in memory (export.onnx_bytes, as `netslim export` writes it: gathers
    folded, odd widths padded to onnxruntime's channel block) in an
    onnxruntime CPU session with `threads` intra-op threads (None: torch's current count)."""
    from .export import onnxruntime_session

    return onnxruntime_session(_onnx_data(model, size), _ort_threads(threads))


def _ort_threads(threads: Optional[int]) -> int:
    return threads if threads is not None else torch.get_num_threads()


def _onnx_data(model: nn.Module, size: tuple[int, ...]) -> bytes:
    from .export import onnx_bytes

    net = _prepare(model, torch.device("cpu"), None, False)
    was_training = net.training
    net.eval()
    try:
        return onnx_bytes(net, _random_input((1, *size), torch.device("cpu"), torch.float32))
    finally:
        net.train(was_training)


def forward_runner(model: nn.Module, input_size: Sequence[int], batch_size: int, *,
                   runtime: str = "torch", threads: Optional[int] = None) -> Callable[[], None]:
    """A function that runs one eval-mode forward of `model` on a fixed random CPU batch, for
    timing it: prepared once (an eval copy for torch, an onnxruntime session with `threads`
    intra-op threads for onnxruntime). torch's threads are the caller's setting."""
    size, (batch_size,) = _check_size(input_size), _check_batches([batch_size])
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} is not known: use one of {', '.join(RUNTIMES)}")
    x = _random_input((batch_size, *size), torch.device("cpu"), torch.float32)
    if runtime == "onnxruntime":
        feed = {"input": x.numpy()}
        if _ort_threads(threads) > 1:
            return _TurnTakingSession(_onnx_data(model, size), _ort_threads(threads), feed)
        session = _onnxruntime_session(model, size, threads)
        return lambda: session.run(None, feed)
    net = copy.deepcopy(model).eval() if model.training else model

    def run() -> None:
        with torch.inference_mode():
            net(x)
    return run


def timed_turn(run: Callable[[], Any], clock: Callable[[], float], per_turn: int = 1) -> list[float]:
    """Seconds of `per_turn` calls of `run` in a row (after one untimed call when per_turn > 1,
    so the timed ones find its weights in the caches), for timing two models in turns. A runner
    holding threads that would spin into the other model's turn (forward_runner's onnxruntime
    session on several threads) is started before its turn and stopped after."""
    getattr(run, "prepare", lambda: None)()
    if per_turn > 1:
        run()
    times = []
    for _ in range(per_turn):
        t0 = clock()
        run()
        times.append(clock() - t0)
    getattr(run, "release", lambda: None)()
    return times


def release(run: Callable[[], Any]) -> None:
    """Stop a runner's threads until its next turn (a no-op for runners without any)."""
    getattr(run, "release", lambda: None)()


class _TurnTakingSession:
    """One forward in an onnxruntime session with several intra-op threads, for timing it in
    turns with another model. Such a session's idle threads spin (onnxruntime's default, and
    what makes it fast at batch 1), taking the cores from whatever runs next: two sessions
    timed one call each in turn both ran at half speed (vgg-13 batch 1, 2 threads: 3.8 -> 7.6
    ms), and 20 untimed calls did not stop it. So a caller ends each turn with release(),
    which drops the session and its threads, and starts the next with prepare(), which makes
    it again and runs it untimed until its threads are up."""

    WARMUP = 3

    def __init__(self, data: bytes, threads: int, feed: dict) -> None:
        self._data, self._threads, self._feed = data, threads, feed
        self._session: Any = None
        self.prepare()   # fails here, where the runner is made, if the model does not run

    def prepare(self) -> None:
        from .export import onnxruntime_session

        if self._session is None:
            self._session = onnxruntime_session(self._data, self._threads)
            for _ in range(self.WARMUP):
                self._session.run(None, self._feed)

    def release(self) -> None:
        self._session = None

    def __call__(self) -> None:
        self.prepare()
        self._session.run(None, self._feed)


def _onnxruntime_latency(model: nn.Module, size: tuple[int, ...], batches: list[int], *, warmup: int,
                         repeats: Optional[int], target_seconds: float, threads: Optional[int]) -> dict[int, float]:
    """{batch size: median ms} of the model exported in memory and run in onnxruntime (CPU)."""
    session = _onnxruntime_session(model, size, threads)
    result: dict[int, float] = {}
    for bs in batches:
        feed = {"input": _random_input((bs, *size), torch.device("cpu"), torch.float32).numpy()}
        result[bs], n = _median_ms(lambda: session.run(None, feed), warmup, repeats, target_seconds)
        log.debug("onnxruntime latency batch %d: %.3f ms, median of %d runs", bs, result[bs], n)
    return result


def measure_latency(model: nn.Module, input_size: Sequence[int], batch_sizes: Sequence[int] = (1, 64), *,
                    device: DeviceLike = "cpu", warmup: int = 2, repeats: Optional[int] = None,
                    target_seconds: float = 0.5, threads: Optional[int] = None,
                    channels_last: bool = False, dtype: Optional[torch.dtype] = None,
                    runtime: str = "torch") -> dict[int, float]:
    """{batch size: median milliseconds per eval-mode forward}.

    Runs under inference_mode after `warmup` untimed forwards. `repeats` None picks, per
    batch size, enough timed runs (at least 3) to fill about `target_seconds`. `threads`
    sets torch's intra-op threads for the measurement (restored after); `dtype` casts
    weights and input (e.g. torch.bfloat16); the caller's model is not modified.
    `runtime` "onnxruntime" times the model as netslim exports it (export.onnx_bytes) in
    an onnxruntime CPU session with `threads` intra-op threads (default: torch's count).
    """
    size, batches = _check_size(input_size), _check_batches(batch_sizes)
    dev = _resolve_device(device)
    if warmup < 0 or (repeats is not None and repeats < 1) or not target_seconds > 0:
        raise ConfigError(f"warmup {warmup} / repeats {repeats} / target_seconds {target_seconds} not valid: "
                          "use warmup >= 0, repeats >= 1, target_seconds > 0")
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} is not known: use one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        if dev.type != "cpu" or channels_last or dtype not in (None, torch.float32):
            raise ConfigError("the onnxruntime latency runs on the CPU in float32 "
                              "(no device, channels_last or dtype options)")
        return _onnxruntime_latency(model, size, batches, warmup=warmup, repeats=repeats,
                                    target_seconds=target_seconds, threads=threads)
    net = _prepare(model, dev, dtype, channels_last)
    was_training, prev_threads = net.training, torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    net.eval()
    result: dict[int, float] = {}
    try:
        with torch.inference_mode():
            for bs in batches:
                x = _input(net, bs, size, channels_last)
                result[bs], n = _median_ms(lambda: _forward(net, x, dev), warmup, repeats, target_seconds)
                log.debug("latency batch %d: %.3f ms, median of %d runs, %d threads, %s",
                          bs, result[bs], n, torch.get_num_threads(), dev)
    finally:
        net.train(was_training)
        torch.set_num_threads(prev_threads)
    return result


class _LiveBytes(_DecomposingMode):
    """Bytes of tensor storages alive while the mode is active, and their peak.

    Each storage is counted once when an op first returns it (views share it) and
    subtracted when it is freed: storages keep their Python object for their whole
    lifetime, so a weakref.finalize on it fires exactly at deallocation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._keys: set[int] = set()
        self._finalizers: list[weakref.finalize] = []

    def track(self, t: Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse/nested tensors: no single storage
            return
        key = st._cdata  # address of the StorageImpl: stable while the storage lives
        if key in self._keys:
            return
        nbytes = st.nbytes()
        self._keys.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self._finalizers.append(weakref.finalize(st, self._free, key, nbytes))

    def _free(self, key: int, nbytes: int) -> None:
        self._keys.discard(key)
        self.live -= nbytes

    def _leaf(self, func: Any, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self.track(leaf)
        return out

    def __exit__(self, *exc: Any) -> Any:
        # Storages still alive (weights, the output) must not call back into a dead tracker.
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()
        return super().__exit__(*exc)


def _resident_bytes(tensors: Iterable[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def peak_memory(model: nn.Module, input_size: Sequence[int], batch_size: int = 64,
                device: DeviceLike = "cpu", *, dtype: Optional[torch.dtype] = None,
                channels_last: bool = False) -> int:
    """Peak bytes held during one inference forward: weights, buffers, input and activations.

    CUDA: from the allocator (includes cuDNN workspaces). CPU: tracked per storage at
    the aten level (see the module docstring), so kernel-internal scratch is not included.
    """
    size, (batch_size,) = _check_size(input_size), _check_batches([batch_size])
    dev = _resolve_device(device)
    net = _prepare(model, dev, dtype, channels_last)
    was_training = net.training
    net.eval()
    try:
        x = _input(net, int(batch_size), size, channels_last)
        resident = list(net.parameters()) + list(net.buffers()) + [x]
        with torch.inference_mode():
            if dev.type == "cuda":
                net(x)  # settle lazy initialisation and cuDNN algorithm choice first
                _sync(dev)
                before = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                net(x)
                _sync(dev)
                # Measure relative to what was allocated before, so other live tensors of
                # the process do not count; then add back what the model itself holds.
                return torch.cuda.max_memory_allocated(dev) - before + _resident_bytes(resident)
            # The cyclic GC stays off while storages are tracked: a collection in mid-forward
            # (when it fires depends on the process's allocation history, even on
            # PYTHONHASHSEED) delayed one free and moved the peak by a tensor now and then.
            with paused_gc(), _LiveBytes() as tracker:
                for t in resident:
                    tracker.track(t)
                out = net(x)
                del out
            return tracker.peak
    finally:
        net.train(was_training)


def profile(model: nn.Module, input_size: Sequence[int], *, batch_sizes: Sequence[int] = (1, 64),
            device: DeviceLike = "cpu", latency: bool = True, memory: bool = True,
            exclude: Iterable[str] = (), warmup: int = 2, repeats: Optional[int] = None,
            target_seconds: float = 0.5, threads: Optional[int] = None, channels_last: bool = False,
            dtype: Optional[torch.dtype] = None, runtime: str = "torch") -> dict[str, Any]:
    """Everything at once: {'params', 'macs', 'flops', 'latency_ms', 'runtime', 'threads',
    'device', 'peak_memory_bytes', 'memory_batch_size'}.

    MACs are per example (batch 1, see `count`); latency is {batch size: median ms} ({}
    when `latency` is False) in `runtime` (see `measure_latency`); peak memory (PyTorch's)
    is at the largest batch size (None when `memory` is False); `threads` is the intra-op
    thread count during the measurement.
    """
    dev, batches = _resolve_device(device), _check_batches(batch_sizes)
    result: dict[str, Any] = dict(count(model, input_size, exclude=exclude))
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result["runtime"] = runtime
        result["threads"] = torch.get_num_threads()
        result["device"] = str(dev)
        result["latency_ms"] = measure_latency(
            model, input_size, batches, device=dev, warmup=warmup, repeats=repeats,
            target_seconds=target_seconds, channels_last=channels_last, dtype=dtype,
            runtime=runtime) if latency else {}
        mem_bs = max(batches)
        result["memory_batch_size"] = mem_bs if memory else None
        result["peak_memory_bytes"] = peak_memory(
            model, input_size, mem_bs, dev, dtype=dtype, channels_last=channels_last) if memory else None
    finally:
        torch.set_num_threads(prev_threads)
    return result
