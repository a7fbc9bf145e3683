"""Distillation losses: logit KD against a full or top-k teacher, and intermediate-layer (ILD) MSE.

All losses compute in float32 whatever the input dtype, and average over tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TopKLogprobs:
    """The teacher's k most likely tokens per position, as log-probabilities at `temperature`.

    logprobs     [batch, seq, k] log_softmax(teacher_logits / temperature) at those tokens
    indices      [batch, seq, k] int64 token ids
    temperature  the softening they were taken at; kd_loss refuses another
    """

    logprobs: Tensor
    indices: Tensor
    temperature: float


def top_k_logprobs(logits: Tensor, k: int, temperature: float = 1.0) -> TopKLogprobs:
    """The k largest softened log-probabilities of [batch, seq, vocab] logits (normalised over the full vocab)."""
    if not 0 < k <= logits.shape[-1]:
        raise ValueError(f"top_k={k} must be in 1..vocab ({logits.shape[-1]})")
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return TopKLogprobs(values, indices, temperature)


def kd_loss(
    student_logits: Tensor,
    teacher: Tensor | TopKLogprobs,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    labels: Tensor | None = None,
) -> Tensor:
    """(1 - ce_weight) * T^2 * KL(teacher || student) + ce_weight * CE(student, labels), token mean.

    student_logits  [batch, seq, vocab]
    teacher         [batch, seq, vocab] logits, or TopKLogprobs taken at the same temperature
    labels          [batch, seq] token ids as in HF (the loss shifts them: logits at t predict
                    labels at t+1), IGNORE_INDEX where no loss; needed when ce_weight > 0

    KL is on the softened distributions softmax(z / T); the T^2 keeps gradient scale independent
    of T (Hinton et al.). With a top-k teacher the KL is taken over k+1 outcomes: the k tokens and
    one bucket for all the others, whose teacher mass is 1 - sum(top-k probs) and student mass is
    the student's probability of every token outside the top-k. That is exactly the full KL when
    the teacher puts no mass outside its top-k, and otherwise a lower bound on it (it ignores how
    each side spreads the rest mass over the other tokens).
    """
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight={ce_weight} must be in [0, 1]")
    student_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, TopKLogprobs):
        kl = _kl_top_k(student_logp, teacher, temperature)
    else:
        teacher_logp = torch.log_softmax(teacher.float() / temperature, dim=-1)
        kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
    loss = (1.0 - ce_weight) * temperature**2 * kl.mean()
    if ce_weight > 0:
        if labels is None:
            raise ValueError("kd_loss: ce_weight > 0 needs labels")
        loss = loss + ce_weight * causal_ce(student_logits, labels)
    return loss


def _kl_top_k(student_logp: Tensor, teacher: TopKLogprobs, temperature: float) -> Tensor:
    """Per-token KL [batch, seq] over the teacher's top-k tokens plus one rest bucket."""
    if teacher.temperature != temperature:
        raise ValueError(
            f"teacher TopKLogprobs.temperature={teacher.temperature} but kd_loss temperature={temperature}; "
            "ask the teacher for top-k at the loss's temperature"
        )
    teacher_logp = teacher.logprobs.float()
    teacher_p = teacher_logp.exp()
    student_logp_k = student_logp.gather(-1, teacher.indices)
    kl_k = (teacher_p * (teacher_logp - student_logp_k)).sum(-1)
    if teacher.indices.shape[-1] == student_logp.shape[-1]:
        return kl_k  # k = vocab: no rest bucket
    teacher_rest = (1.0 - teacher_p.sum(-1)).clamp(min=0.0)
    student_logp_rest = torch.logsumexp(student_logp.scatter(-1, teacher.indices, float("-inf")), dim=-1)
    kl_rest = torch.xlogy(teacher_rest, teacher_rest) - teacher_rest * student_logp_rest
    return kl_k + kl_rest


def causal_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of [batch, seq, vocab] logits on HF-style [batch, seq] labels (shifted here)."""
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def ild_loss(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """Mean squared error between [batch, seq, d_model] hidden states, averaged over every element."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"ild_loss: student shape {tuple(student_hidden.shape)} != teacher {tuple(teacher_hidden.shape)}"
        )
    return F.mse_loss(student_hidden.float(), teacher_hidden.float())
