"""Distillation losses: logit KD against a full or top-k teacher, and intermediate-layer (ILD) losses.

All losses compute in float32 whatever the input dtype (the full-vocabulary KD loss in float64 for
float64 inputs), and average over tokens. The full-vocabulary
KD loss runs over chunks of tokens, so that [tokens, vocab] float32 log-probabilities never exist
at once (49,152 x 32k tokens would be 6.4 GB): only a chunk's, and the gradient in the logits' dtype.
On CUDA it runs instead as one fused Triton kernel (kernels.kd_loss; kd_loss's `backend` picks), which keeps
no float32 [tokens, vocab] temporary at all; the chunked loop stays the reference.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kernels import kd_loss as kd_kernel
from kernels import token_l2 as l2_kernel
from kernels.dispatch import use_kernel

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024  # tokens per chunk of the KD loss: ~200 MB per float32 [chunk, 49152] temporary
BACKENDS = ("auto", "triton", "torch")  # kd_loss's (kernels.kd_loss or the chunked loop) and ild_loss's (kernels.token_l2)


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


def top_k_logprobs(logits: Tensor, k: int, temperature: float = 1.0, chunk_tokens: int = CHUNK_TOKENS) -> TopKLogprobs:
    """The k largest softened log-probabilities of [batch, seq, vocab] logits (normalised over the
    full vocab), computed chunk_tokens tokens at a time."""
    if not 0 < k <= logits.shape[-1]:
        raise ValueError(f"top_k={k} must be in 1..vocab ({logits.shape[-1]})")
    flat = logits.flatten(0, -2)
    parts = [torch.log_softmax(flat[s : s + chunk_tokens].float() / temperature, dim=-1).topk(k, dim=-1)
             for s in range(0, flat.shape[0], chunk_tokens)]
    shape = (*logits.shape[:-1], k)
    values, indices = (torch.cat([getattr(p, f) for p in parts]).view(shape) for f in ("values", "indices"))
    return TopKLogprobs(values, indices, temperature)


def kd_loss(
    student_logits: Tensor,
    teacher: Tensor | TopKLogprobs,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    labels: Tensor | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    backend: str = "auto",
) -> Tensor:
    """(1 - ce_weight) * T^2 * KL(teacher || student) + ce_weight * CE(student, labels), token mean.

    student_logits  [batch, seq, vocab]
    teacher         [batch, seq, vocab] logits (the default: the full-vocabulary KL, exact), or
                    TopKLogprobs taken at the same temperature (an option; biased, see below)
    labels          [batch, seq] token ids as in HF (the loss shifts them: logits at t predict
                    labels at t+1), IGNORE_INDEX where no loss; needed when ce_weight > 0
    chunk_tokens    tokens whose float32 [chunk, vocab] temporaries exist at once (chunked PyTorch path)
    backend         full-vocabulary teacher only: "auto" the fused Triton kernel (kernels.kd_loss) on CUDA,
                    else the chunked PyTorch loop; "triton" the kernel or a RuntimeError (on CPU tensors it
                    runs under TRITON_INTERPRET=1); "torch" the chunked loop

    KL is on the softened distributions softmax(z / T); the T^2 keeps gradient scale independent
    of T (Hinton et al.). The teacher is a constant: no gradient flows into it.

    With a top-k teacher the KL is taken over k+1 outcomes: the k tokens and one bucket for all
    the others, whose teacher mass is 1 - sum(top-k probs) and student mass is the student's
    probability of every token outside the top-k. That is exactly the full KL only when the
    teacher puts no mass outside its top-k; otherwise it is a LOWER BOUND on the full KL that
    ignores the tail (how each side spreads the rest mass over the other tokens), so a student
    trained on it is never told to match the teacher's tail. Top-k saves teacher-to-student
    traffic; use the full teacher unless that traffic is the bottleneck.
    """
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight={ce_weight} must be in [0, 1]")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if ce_weight > 0 and labels is None:
        raise ValueError("kd_loss: ce_weight > 0 needs labels")
    if backend not in BACKENDS:
        raise ValueError(f"kd_loss: backend must be one of {BACKENDS}, got {backend!r}")
    student = student_logits.flatten(0, -2)
    if isinstance(teacher, TopKLogprobs):
        _check_temperature(teacher, temperature)
        kl = _chunked_top_k_kl(student, teacher, temperature, chunk_tokens)
        loss = (1.0 - ce_weight) * temperature**2 * kl
        if ce_weight > 0:
            loss = loss + ce_weight * causal_ce(student_logits, labels)
        return loss
    if teacher.shape != student_logits.shape:
        raise ValueError(f"kd_loss: teacher logits shape {tuple(teacher.shape)} != student "
                         f"{tuple(student_logits.shape)}")
    targets = _next_token_targets(labels, student_logits.shape[:-1], student.device) if ce_weight > 0 else None
    teacher = teacher.flatten(0, -2)
    fused = _use_fused_kernel(student, teacher, backend)
    return _FullVocabKD.apply(student, teacher, targets, temperature, ce_weight, chunk_tokens, fused)


def _use_fused_kernel(student: Tensor, teacher: Tensor, backend: str) -> bool:
    """The full-vocabulary dispatch point: True for kernels.kd_loss's fused kernel, False for the chunked loop
    (RuntimeError when backend "triton" insists on a kernel that cannot run)."""
    reason = "backend='torch'" if backend == "torch" else kd_kernel.unsupported(student, teacher, backend)
    return use_kernel(log, "kd_loss", "kernels.kd_loss.kd_rows_triton", reason, backend)


def _next_token_targets(labels: Tensor, shape: torch.Size, device) -> Tensor:
    """[tokens] target of each position (labels shifted by one; IGNORE_INDEX at each sequence's end)."""
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long, device=device)
    targets[..., :-1] = labels[..., 1:]
    return targets.flatten()


class _FullVocabKD(torch.autograd.Function):
    """(1 - w) T^2 mean KL + w CE over [tokens, vocab] logits, one chunk of tokens at a time, or (fused) by
    kernels.kd_loss's kernel, which computes the same per-row terms and gradient in one launch.

    The gradient is computed in the forward pass, chunk by chunk, into one tensor of the student's
    dtype: d/dz_s [T^2 KL(p || q)] = T (q - p) with q = softmax(z_s / T), p = softmax(z_t / T), and
    d/dz_s CE = softmax(z_s) - onehot(target). Nothing is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, student, teacher, targets, temperature, ce_weight, chunk, fused=False):
        n = student.shape[0]
        n_ce = int((targets != IGNORE_INDEX).sum()) if targets is not None else 0
        if ce_weight > 0 and n_ce == 0:
            raise ValueError("kd_loss: ce_weight > 0 but every label is IGNORE_INDEX")
        kl_scale = (1.0 - ce_weight) * temperature / n
        if fused:
            grad, kl_rows, ce_rows = kd_kernel.kd_rows_triton(
                student, teacher, targets if ce_weight > 0 else None, temperature, kl_scale,
                ce_weight / max(n_ce, 1), write_grad=ctx.needs_input_grad[0])
            kl_total, ce_total = kl_rows.sum(), ce_rows.sum()
        else:
            grad, kl_total, ce_total = _chunked_kd(student, teacher, targets, temperature, ce_weight, chunk,
                                                   kl_scale, n_ce, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        kl = (1.0 - ce_weight) * temperature**2 * kl_total / n
        return kl + ce_weight * ce_total / max(n_ce, 1)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None, None


def _chunked_kd(student: Tensor, teacher: Tensor, targets: Tensor | None, temperature: float, ce_weight: float,
                chunk: int, kl_scale: float, n_ce: int, need_grad: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """The reference loop of _FullVocabKD: student, teacher [n, vocab] -> grad [n, vocab] in student's dtype
    (None unless need_grad), summed KL and summed CE (scalars, at least float32)."""
    n = student.shape[0]
    grad = torch.empty_like(student) if need_grad else None
    acc = torch.promote_types(student.dtype, torch.float32)
    kl_total, ce_total = student.new_zeros((), dtype=acc), student.new_zeros((), dtype=acc)
    for s in range(0, n, chunk):
        zs, zt = student[s : s + chunk].to(acc), teacher[s : s + chunk].to(acc)
        log_q, log_p = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
        p = log_p.exp()
        kl_total += torch.where(p > 0, p * (log_p - log_q), 0.0).sum()
        g = (log_q.exp() - p) * kl_scale if grad is not None else None
        if ce_weight > 0:
            ce_total += _ce_chunk(zs, targets[s : s + chunk], g, ce_weight / n_ce)
        if g is not None:
            grad[s : s + chunk] = g
    return grad, kl_total, ce_total


def _ce_chunk(logits: Tensor, targets: Tensor, grad: Tensor | None, scale: float) -> Tensor:
    """Summed CE of logits [c, vocab] at targets [c]; adds scale * its gradient into grad [c, vocab]."""
    keep = targets != IGNORE_INDEX
    log_s = torch.log_softmax(logits, -1)
    safe = targets.clamp(min=0)[:, None]
    ce = -(log_s.gather(-1, safe)[:, 0] * keep).sum()
    if grad is not None:
        g = log_s.exp().scatter_add(-1, safe, torch.full_like(safe, -1.0, dtype=log_s.dtype))
        grad.add_(g * keep[:, None].to(g.dtype) * scale)
    return ce


def _check_temperature(teacher: TopKLogprobs, temperature: float) -> None:
    if teacher.temperature != temperature:
        raise ValueError(
            f"teacher TopKLogprobs.temperature={teacher.temperature} but kd_loss temperature={temperature}; "
            "ask the teacher for top-k at the loss's temperature"
        )


def _chunked_top_k_kl(student: Tensor, teacher: TopKLogprobs, temperature: float, chunk: int) -> Tensor:
    """Token-mean k+1-bucket KL of student [tokens, vocab] logits; each chunk is checkpointed (its
    float32 log-softmax is recomputed in backward instead of kept)."""
    logp, idx = teacher.logprobs.flatten(0, -2), teacher.indices.flatten(0, -2)
    total = student.new_zeros((), dtype=torch.float32)
    for s in range(0, student.shape[0], chunk):
        args = (student[s : s + chunk], logp[s : s + chunk], idx[s : s + chunk], temperature)
        grad = torch.is_grad_enabled() and student.requires_grad
        total = total + (checkpoint(_kl_top_k_sum, *args, use_reentrant=False) if grad else _kl_top_k_sum(*args))
    return total / student.shape[0]


def _kl_top_k_sum(student: Tensor, teacher_logp: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """Summed KL over the teacher's top-k tokens plus one rest bucket: student [c, vocab] logits,
    teacher_logp and indices [c, k]."""
    student_logp = torch.log_softmax(student.float() / temperature, dim=-1)
    teacher_logp = teacher_logp.float()
    teacher_p = teacher_logp.exp()
    kl = (teacher_p * (teacher_logp - student_logp.gather(-1, indices))).sum(-1)
    if indices.shape[-1] < student_logp.shape[-1]:
        teacher_rest = (1.0 - teacher_p.sum(-1)).clamp(min=0.0)
        student_logp_rest = torch.logsumexp(student_logp.scatter(-1, indices, float("-inf")), dim=-1)
        kl = kl + torch.xlogy(teacher_rest, teacher_rest) - teacher_rest * student_logp_rest
    return kl.sum()


def causal_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of [batch, seq, vocab] logits on HF-style [batch, seq] labels (shifted here)."""
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def ild_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    student_mixer: Tensor | None = None,
    teacher_mixer: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """The official Zebra-Llama ILD loss of one layer: token mean of ||student_out - teacher_out||_2
    plus, when given, the token mean of ||student_mixer - teacher_mixer||_2.

    *_out    [batch, seq, d_model] the layer's output (residual stream after the layer)
    *_mixer  [batch, seq, d_model] the token mixer's output (attention / MLA / Mamba2, before the residual add)

    The norm over d_model is not squared: a token's loss grows linearly with its error, so a few
    outlier tokens do not dominate the batch as they do under the mean squared error.

    backend: "auto" and "torch" run the float32 PyTorch formula; "triton" insists on kernels.token_l2's Triton
    kernels (no float32 copy of the inputs). "auto" does not pick the kernels: on an H200 they took 1.09-1.35 ms
    for one layer's forward + backward at 16 x 2048, the formula 0.93-0.98 ms (notes/GPU.md, session 9).
    """
    loss = _token_l2(student_out, teacher_out, "out", backend)
    if (student_mixer is None) != (teacher_mixer is None):
        raise ValueError("ild_loss: give both student_mixer and teacher_mixer, or neither")
    if student_mixer is not None:
        loss = loss + _token_l2(student_mixer, teacher_mixer, "mixer", backend)
    return loss


def _token_l2(student: Tensor, teacher: Tensor, what: str, backend: str) -> Tensor:
    """The token mean of ||student - teacher||_2 over the last dim; the dispatch point of kernels.token_l2."""
    if student.shape != teacher.shape:
        raise ValueError(f"ild_loss: student_{what} shape {tuple(student.shape)} != "
                         f"teacher_{what} {tuple(teacher.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"ild_loss: backend must be one of {BACKENDS}, got {backend!r}")
    reason = (f"backend={backend!r}: the formula measured faster than the kernels" if backend in ("auto", "torch")
              else l2_kernel.unsupported(student, teacher, backend))
    if use_kernel(log, "ild_loss", "kernels.token_l2.token_l2_triton", reason, backend):
        return l2_kernel.token_l2_triton(student, teacher).mean()
    return l2_kernel.token_l2_ref(student, teacher).mean()
