"""The Network Slimming sparsity term: an L1 penalty on BatchNorm scaling factors.

The paper adds s * sum|gamma| to the loss. Its sub-gradient s * sign(gamma) is added to
each gamma's gradient after backward() and before optimizer.step(), exactly as the seed
does. sign(0) = 0, so gammas held at zero by mask-mode pruning stay at zero.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def bn_gammas(model: nn.Module) -> list[nn.Parameter]:
    """The scaling factors (weights) of every affine BatchNorm layer in `model`."""
    return [m.weight for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None]


@torch.no_grad()
def abs_gammas(model: nn.Module) -> "torch.Tensor | None":
    """|gamma| of every affine BN of `model`, as one flat float32 tensor (None if it has none)."""
    g = [p.detach().abs().float().flatten() for p in bn_gammas(model)]
    return torch.cat(g) if g else None


# Where the fraction of small factors is counted: 0.01 is "as good as pruned", 0.1-0.3 is
# where a few epochs of the L1 term visibly move mass (a step moves a factor by lr * s).
GAMMA_THRESHOLDS = (0.01, 0.1, 0.2, 0.3)


def gamma_summary(model: nn.Module) -> dict:
    """How far sparsity training has pushed the BN scaling factors toward zero: count,
    sum, median and quantiles of |gamma| over all BNs, and the fraction below each of
    GAMMA_THRESHOLDS (keys "frac_below_<t>")."""
    v = abs_gammas(model)
    if v is None:
        return {"count": 0}
    q10, q90 = torch.quantile(v, torch.tensor([0.1, 0.9], device=v.device)).tolist()
    out = {"count": int(v.numel()), "sum": float(v.sum()), "median": float(v.median()), "q10": q10, "q90": q90}
    out.update({f"frac_below_{t:g}": float((v < t).float().mean()) for t in GAMMA_THRESHOLDS})
    out["frac_below_1e-2"] = out["frac_below_0.01"]  # the key results.json has always had
    return out


class BNSparsity:
    """Adds s * sign(gamma) to every BN gamma's gradient in one fused foreach call.

    Collects the gammas once, so the per-step cost is two foreach kernels over the list,
    not a Python loop over modules.
    """

    def __init__(self, model: nn.Module, s: float):
        if s < 0:
            raise ValueError(f"sparsity s must be >= 0, got {s}")
        self.s = float(s)
        self.gammas = bn_gammas(model)

    @torch.no_grad()
    def step(self) -> None:
        if self.s == 0:
            return
        params = [g for g in self.gammas if g.grad is not None]
        if not params:
            return
        grads = [g.grad for g in params]
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=self.s)

    def penalty(self) -> float:
        """s * sum |gamma|: the value of the L1 term (for logging)."""
        with torch.no_grad():
            return self.s * float(sum(g.abs().sum() for g in self.gammas))


def bn_l1_(model: nn.Module, s: float) -> None:
    """Add s * sign(gamma) to the gradient of every BN gamma of `model`, in place.

    Call after loss.backward() and before optimizer.step().
    """
    BNSparsity(model, s).step()


class SparsityCallback(BNSparsity):
    """The Network Slimming step for any training loop: call it after loss.backward() and
    before optimizer.step().

        sparsity = netslim.SparsityCallback(model, 1e-4)    # model may be DDP-wrapped
        loss.backward(); sparsity(); optimizer.step()

    With an fp16 GradScaler the gradients are scaled at that point: pass `scaler=` and call
    `sparsity(optimizer)`; it unscales them first (scaler.unscale_), so the L1 step is in
    true-gradient units and scaler.step() does not unscale twice.
    """

    def __init__(self, model: nn.Module, s: float, *, scaler: "torch.amp.GradScaler | None" = None):
        super().__init__(model, s)
        self.scaler = scaler

    def __call__(self, optimizer: "torch.optim.Optimizer | None" = None) -> None:
        if self.scaler is not None and self.scaler.is_enabled():
            if optimizer is None:
                raise ValueError("with a GradScaler, call sparsity(optimizer): the gradients must be unscaled first")
            self.scaler.unscale_(optimizer)
        self.step()
