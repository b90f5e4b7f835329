"""Knowledge distillation while fine-tuning a pruned model (Hinton et al., 2015).

The teacher is any checkpoint of the same task, usually the sparsity-trained model that
was pruned. The student's loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

(T^2 keeps the soft term's gradients on the scale of the hard one as T grows).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
                      alpha: float, temperature: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy (logits in fp32)."""
    s, t = student.float(), teacher.float()
    soft = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, target)


def load_teacher(path: str | os.PathLike, student: nn.Module, example: torch.Tensor,
                 device: torch.device) -> nn.Module:
    """The teacher checkpoint at `path`, frozen, in eval mode on `device`.

    ConfigError when its outputs do not match the student's on `example` (another task).
    """
    from .checkpoint import load_checkpoint

    teacher, _ = load_checkpoint(path)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            t_shape, s_shape = teacher(example).shape, student(example).shape
    except RuntimeError as e:
        raise ConfigError(f"the teacher {path} does not take this task's input "
                          f"({str(e).splitlines()[0][:120]}); distill from a model of the same task") from None
    finally:
        student.train(was_training)
    if t_shape != s_shape:
        raise ConfigError(f"the teacher {path} outputs {list(t_shape)[1:]} per example but the model being "
                          f"trained outputs {list(s_shape)[1:]}; distill from a model of the same task")
    return teacher
