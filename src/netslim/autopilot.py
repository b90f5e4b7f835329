"""Sparsity autopilot: what pruning would give now, an s that reaches a target, s schedules, warnings.

Choosing s is the question every Network Slimming user asks: too small and the factors
never get small (pruning then cuts channels that still carry signal), too large and
accuracy suffers. Every epoch of sparsity training, fit() now logs

- a forecast (`SparsityForecast`): the global threshold at the configured percent, the
  FLOPs and parameters that pruning there would leave, the share of |gamma| below 1e-2,
  and the layers the threshold would empty (kept only by min_channels);
- with `s = "auto"` and a target share Q (`SparsityController`): the s of the next epoch,
  raised while the share of factors below 1e-2 lags behind its plan (Q times the share of
  the run's learning-rate sum spent so far) and lowered when it runs ahead.

`s_for_epoch` implements the fixed schedules (constant, linear-decay, step-decay) and
`sparsity_warnings` names set-ups known to defeat the L1 penalty.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

S_SCHEDULES = ("constant", "linear-decay", "step-decay")
SMALL = 1e-2           # a factor below this counts as pruned-for-free (its channel outputs ~ beta)
_ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "Adafactor")


class SparsityForecast:
    """What pruning `model` at `percent` would give now (the plan only: no model is kept).

    The plan is prune()'s, block removal included (remove_blocks, on by default as in
    prune): a residual branch the penalty has silenced is counted as gone, as the prune
    stage will remove it.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, percent: float, min_channels: int = 1,
                 remove_blocks: bool = True):
        from .engine.analysis import analyze
        from .engine.blocks import BlockRemoval
        from .profile import count

        self.percent, self.min_channels, self.example = percent, min_channels, example_input
        self.analysis = analyze(model, example_input, strict=False)
        self.dense = count(model, example_input=example_input)
        self.removal = BlockRemoval(model, self.analysis, example_input, self.analysis.untraceable) \
            if remove_blocks else None

    def __call__(self, model: nn.Module) -> dict:
        from .engine.blocks import BlockRemoval
        from .engine.plan import make_plan
        from .engine.slim import apply_plan
        from .profile import count

        plan, threshold, decisions = make_plan(model, self.analysis, self.percent, min_channels=self.min_channels)
        gone = []
        if self.removal is not None:
            if self.removal.model is not model:  # BlockRemoval reads the factors of the model it was built on
                self.removal = BlockRemoval(model, self.analysis, self.example, self.analysis.untraceable)
            plan, gone = self.removal(plan, threshold, decisions)
        with torch.no_grad():
            after = count(apply_plan(model, plan, self.example, analysis=self.analysis, branches=gone),
                          example_input=self.example)
        return {"percent": self.percent, "threshold": threshold,
                "flops_left": after["flops"] / self.dense["flops"], "params_left": after["params"] / self.dense["params"],
                "at_min_channels": [d.name for d in decisions if d.guard == "min_channels"],
                "removed_blocks": [b.block for b in gone]}


class SparsityController:
    """s for the coming steps, so that a share `target` of the factors is below 1e-2 at the end.

    The share should grow with the L1 budget spent so far (the sum of the learning rate:
    each step moves a factor by lr x s), from 0 to `target` at the last epoch; with the
    seed's step schedule almost all of it is spent before the first lr decay. At each of
    `updates_per_epoch` points of an epoch (the last one at its end) s is multiplied by
    2 ** clamp(4 * (planned - share) / target, -1, 1): doubled at most when the share lags,
    halved at most when it runs ahead, unchanged on plan. Several updates per epoch, not
    one: a short run spends its budget in two or three epochs, and one doubling per epoch
    from a low start never catches up (measured: 29% for a target of 70% in 6 epochs,
    BENCHMARKS.md). s stays under 1e-3 / lr: a factor that jitters around 0 by more than
    a tenth of 1e-2 would never count as small.
    """

    def __init__(self, target: float, epoch_lrs: Sequence[float], s: float, updates_per_epoch: int = 8):
        self.target, self.epoch_lrs = target, list(epoch_lrs)
        self.updates_per_epoch = max(int(updates_per_epoch), 1)
        self.total = sum(self.epoch_lrs) or 1.0
        self.planned = [self.planned_at(e + 1) for e in range(len(self.epoch_lrs))]
        self.s = min(s, self.max_s(0))

    def planned_at(self, epochs_done: float) -> float:
        """The share planned after `epochs_done` epochs (fractional: within an epoch)."""
        whole = min(int(epochs_done), len(self.epoch_lrs))
        spent = sum(self.epoch_lrs[:whole])
        if whole < len(self.epoch_lrs):
            spent += (epochs_done - whole) * self.epoch_lrs[whole]
        return self.target * spent / self.total

    def max_s(self, epoch: int) -> float:
        lr = self.epoch_lrs[min(epoch, len(self.epoch_lrs) - 1)]
        return 0.1 * SMALL / lr if lr > 0 else float("inf")

    def update_points(self, steps: int) -> set[int]:
        """The steps (1-based) of an epoch of `steps` after which s is updated inside the epoch
        (the update at its end is the epoch's own)."""
        return {round(steps * k / self.updates_per_epoch) for k in range(1, self.updates_per_epoch)} - {0, steps}

    @staticmethod
    def initial_s(model: nn.Module, lr_sum: float) -> float:
        """A low first s: 1/16 of the s whose L1 steps alone (sum of lr x s over the run) would
        move the median |gamma| to 0. Start low because sparsity cannot be taken back: a factor
        the penalty has pinned near 0 stays there when s drops (measured: starting at the full
        value, 50% of the factors were under 1e-2 after one of six epochs and 68% at the end
        for a target of 50%). The controller doubles s while the share lags."""
        from .sparsity import abs_gammas

        g = abs_gammas(model)
        median = float(g.median()) if g is not None and g.numel() else 0.5
        return max(median, 1e-3) / max(lr_sum, 1e-12) / 16

    def update(self, epochs_done: float, share: float) -> float:
        """s after `epochs_done` epochs (fractional within an epoch) with `share` of |gamma| < 1e-2."""
        planned = self.planned_at(epochs_done)
        step = max(-1.0, min(1.0, 4 * (planned - share) / self.target))
        self.s = min(self.s * 2.0 ** step, self.max_s(int(epochs_done)))  # for the epoch the coming steps are in
        return self.s


def s_for_epoch(s: float, schedule: str, epoch: int, epochs: int, milestones: Sequence[int],
                gamma: float = 0.1) -> float:
    """s during epoch `epoch` (0-based): constant, linear-decay (to 0 at the end) or step-decay
    (times `gamma` at each lr milestone, as the seed's lr)."""
    if schedule == "linear-decay":
        return s * (1 - epoch / epochs)
    if schedule == "step-decay":
        return s * gamma ** sum(1 for m in milestones if epoch >= m)
    return s


def sparsity_warnings(s: float, weight_decay: float, optimizer: Optional[torch.optim.Optimizer] = None,
                      clips_gradients: bool = False) -> list[str]:
    """One line per set-up known to defeat the L1 penalty on the BN factors (empty when none)."""
    out = []
    if s > 0 and weight_decay > 10 * s:
        out.append(f"weight decay {weight_decay:g} is more than 10x s {s:g}: on the BN factors the L2 pull "
                   "shrinks every factor alike instead of zeroing a few; raise s or exclude BN from weight decay")
    if optimizer is not None and type(optimizer).__name__ in _ADAPTIVE:
        out.append(f"{type(optimizer).__name__} divides each gradient by its running scale, so s * sign(gamma) "
                   "stops being a constant pull towards 0; use SGD for sparsity training (the paper's)")
    if clips_gradients:
        out.append("gradients clipped before the L1 step: clip after netslim.bn_l1_ (or not at all), or the "
                   "clip scales the penalty with the loss gradient")
    return out


def epoch_lrs(lr: float, epochs: int, milestones: Sequence[int], gamma: float, schedule: str) -> list[float]:
    """The mean learning rate of each epoch of a run (the L1 step per unit s, per step)."""
    from .train import scheduled_lr

    if schedule == "step":
        return [lr * gamma ** sum(1 for m in milestones if e >= m) for e in range(epochs)]
    return [scheduled_lr(schedule, lr, (e + 0.5) / epochs) or lr for e in range(epochs)]  # the epoch's middle
