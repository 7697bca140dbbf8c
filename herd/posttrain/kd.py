"""Distillation: a student learns the teacher's next-token distribution at the targets (and the targets)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.bounds import FRACTION, POSITIVE, require
from herd.posttrain.logprobs import target_logits


@dataclass
class KDConfig:
    temperature: float = 1.0
    kd_weight: float = 0.5      # the rest of the loss is the ordinary cross-entropy on the targets

    def __post_init__(self):
        require(self, POSITIVE, "temperature")
        require(self, FRACTION, "kd_weight")


def kd_token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per position, on logits softened by `temperature` and scaled back by T²
    (Hinton et al.), so that gradients keep their size whatever the temperature."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(student_logits.shape)}: distillation on logits needs one vocabulary")
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1) * temperature ** 2


def kd_loss(student: nn.Module, batch: dict[str, torch.Tensor], teacher: nn.Module, config: KDConfig
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed per-token loss, number of targets); the teacher runs without gradients on the same batch."""
    logits, mask = target_logits(student, batch)
    with torch.no_grad():
        teacher_logits, _ = target_logits(teacher, batch)
    kd = kd_token_losses(logits, teacher_logits, config.temperature)
    ce = F.cross_entropy(logits, batch["labels"][mask], reduction="none")
    return (config.kd_weight * kd + (1 - config.kd_weight) * ce).sum(), mask.sum()
