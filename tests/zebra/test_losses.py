"""Distillation losses against float64 references built from torch.distributions and explicit sums."""
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from zebra.losses import IGNORE_INDEX, TopKLogprobs, causal_ce, ild_loss, kd_loss, top_k_logprobs

BATCH, SEQ, VOCAB = 3, 5, 50
DTYPES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _logits(dtype=torch.float32, scale=3.0):
    return (torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64) * scale).to(dtype)


def _ref_kl(student, teacher, temperature):
    """Token-mean T^2 KL(teacher || student) in float64 via torch.distributions."""
    p = Categorical(logits=teacher.double() / temperature)
    q = Categorical(logits=student.double() / temperature)
    return temperature**2 * kl_divergence(p, q).mean()


def _ref_kl_top_k(student, teacher, temperature, k):
    """The k+1-bucket KL written out: top-k tokens of the teacher, plus everything else as one outcome."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    idx = p.topk(k, -1).indices
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True)
    p_buckets = torch.cat([p.gather(-1, idx), (p * ~in_top).sum(-1, keepdim=True)], -1)
    q_buckets = torch.cat([q.gather(-1, idx), (q * ~in_top).sum(-1, keepdim=True)], -1)
    return temperature**2 * kl_divergence(Categorical(probs=p_buckets), Categorical(probs=q_buckets)).mean()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_full_matches_reference(dtype, temperature):
    student, teacher = _logits(dtype), _logits(dtype)
    got = kd_loss(student, teacher, temperature)
    want = _ref_kl(student, teacher, temperature)
    print(f"max diff {abs(got.double() - want).item():.2e}")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=DTYPES[dtype], atol=DTYPES[dtype])


@pytest.mark.parametrize("k", [1, 7, VOCAB - 1])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_top_k_matches_bucket_reference(k, temperature):
    student, teacher = _logits(), _logits()
    got = kd_loss(student, top_k_logprobs(teacher, k, temperature), temperature)
    want = _ref_kl_top_k(student, teacher, temperature, k)
    print(f"max diff {abs(got.double() - want).item():.2e}")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got.item() <= _ref_kl(student, teacher, temperature).item() + 1e-5  # a lower bound on the full KL


def test_kd_top_k_is_exact_when_teacher_mass_is_in_top_k():
    student, teacher = _logits(), _logits()
    teacher[..., 8:] = -1e4  # the teacher only ever picks among the first 8 tokens
    got = kd_loss(student, top_k_logprobs(teacher, 8), 1.0)
    torch.testing.assert_close(got.double(), _ref_kl(student, teacher, 1.0), rtol=1e-5, atol=1e-5)


def test_kd_top_k_over_whole_vocab_equals_full_and_has_finite_grad():
    student, teacher = _logits().requires_grad_(), _logits()
    got = kd_loss(student, top_k_logprobs(teacher, VOCAB), 1.0)
    got.backward()
    torch.testing.assert_close(got.double(), _ref_kl(student, teacher, 1.0), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(student.grad).all()


def test_kd_zero_when_logits_equal():
    logits = _logits()
    assert kd_loss(logits, logits.clone(), 2.0).abs().item() < 1e-6
    assert kd_loss(logits, top_k_logprobs(logits, 5, 2.0), 2.0).abs().item() < 1e-6


def test_kd_gradient_matches_reference():
    student, teacher = _logits().requires_grad_(), _logits()
    kd_loss(student, teacher, 2.0).backward()
    student64 = student.detach().double().requires_grad_()
    _ref_kl(student64, teacher, 2.0).backward()
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-4, atol=1e-7)


def test_kd_ce_mix():
    student, teacher = _logits(), _logits()
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels[0, 2] = IGNORE_INDEX
    w = 0.3
    got = kd_loss(student, teacher, 2.0, ce_weight=w, labels=labels)
    logp = torch.log_softmax(student.double(), -1)[:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    ce = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep].mean()
    want = (1 - w) * _ref_kl(student, teacher, 2.0) + w * ce
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal_ce(student, labels).double(), ce, rtol=1e-5, atol=1e-5)


def test_kd_errors_name_the_problem():
    student, teacher = _logits(), _logits()
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student, top_k_logprobs(teacher, 4, 1.0), 2.0)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(student, teacher, ce_weight=0.5)
    with pytest.raises(ValueError, match="top_k"):
        top_k_logprobs(teacher, VOCAB + 1)
    assert isinstance(top_k_logprobs(teacher, 3), TopKLogprobs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ild_matches_reference(dtype):
    student = torch.randn(BATCH, SEQ, 16, dtype=torch.float64).to(dtype)
    teacher = torch.randn(BATCH, SEQ, 16, dtype=torch.float64).to(dtype)
    got = ild_loss(student, teacher)
    want = ((student.double() - teacher.double()) ** 2).sum() / student.numel()
    torch.testing.assert_close(got.double(), want, rtol=DTYPES[dtype], atol=DTYPES[dtype])
    assert ild_loss(teacher, teacher.clone()).item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        ild_loss(student, teacher[:, :-1])
