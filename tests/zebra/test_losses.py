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


def _ref_ce(student, labels):
    """Float64 next-token CE written out: mean over kept positions of -log softmax at the next label."""
    logp = torch.log_softmax(student.double(), -1)[:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    return -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep].mean()


def _labels():
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels[0, 2] = labels[2, 4] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("chunk", [1, 4, 7, BATCH * SEQ, 10_000])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_chunked_full_vocab_equals_unchunked_float64(chunk, ce_weight):
    """Loss and gradient of the chunked full-vocabulary KD against the one-shot float64 formula."""
    student = _logits(torch.float64).requires_grad_()
    teacher, labels, temperature = _logits(torch.float64), _labels(), 2.0
    got = kd_loss(student, teacher, temperature, ce_weight, labels if ce_weight else None, chunk_tokens=chunk)
    (2.5 * got).backward()  # a non-unit upstream gradient must scale the stored one
    ref_student = student.detach().clone().requires_grad_()
    want = (1 - ce_weight) * _ref_kl(ref_student, teacher, temperature) + ce_weight * _ref_ce(ref_student, labels)
    (2.5 * want).backward()
    print(f"chunk={chunk} ce={ce_weight}: loss diff {abs(got - want).item():.1e}, "
          f"grad diff {(student.grad - ref_student.grad).abs().max().item():.1e}")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 10_000])
def test_chunked_top_k_equals_reference_and_gradient(chunk):
    student, teacher, k = _logits().requires_grad_(), _logits(), 7
    got = kd_loss(student, top_k_logprobs(teacher, k, 2.0), 2.0, chunk_tokens=chunk)
    got.backward()
    ref_student = student.detach().double().requires_grad_()
    want = _ref_kl_top_k(ref_student, teacher, 2.0, k)
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("top_k", [None, 5])
def test_kd_keeps_no_float32_vocab_tensor_for_backward(top_k):
    """Backward keeps the gradient in the logits' dtype (full) or the inputs (top-k, recomputed):
    never a float32 [tokens, vocab] tensor."""
    student = _logits(torch.bfloat16).requires_grad_()
    teacher = _logits(torch.bfloat16)
    teacher = teacher if top_k is None else top_k_logprobs(teacher, top_k)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = kd_loss(student, teacher, chunk_tokens=4)
    loss.backward()
    print(saved)
    assert saved and not [s for s in saved if s[0] == torch.float32 and s[1] > 4 * VOCAB]
    assert torch.isfinite(student.grad.float()).all()


@pytest.mark.parametrize("chunk", [1, 4, 10_000])
def test_top_k_logprobs_chunked_equals_one_shot(chunk):
    logits = _logits()
    got = top_k_logprobs(logits, 5, 2.0, chunk_tokens=chunk)
    want = torch.log_softmax(logits.double() / 2.0, -1).topk(5, -1)
    assert got.logprobs.shape == got.indices.shape == (BATCH, SEQ, 5)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.logprobs.double(), want.values, rtol=1e-6, atol=1e-6)


def test_kd_rejects_bad_chunk_and_shape():
    student, teacher = _logits(), _logits()
    with pytest.raises(ValueError, match="chunk_tokens"):
        kd_loss(student, teacher, chunk_tokens=0)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(student, teacher[:, :-1])


def _ref_ild(student_out, teacher_out, student_mixer=None, teacher_mixer=None):
    """Float64, token by token: sqrt of the summed squared difference, averaged over tokens."""
    def term(a, b):
        a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
        return sum(((a[t] - b[t]) ** 2).sum().sqrt() for t in range(a.shape[0])) / a.shape[0]
    return term(student_out, teacher_out) + (term(student_mixer, teacher_mixer) if student_mixer is not None else 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_mixer", [False, True])
def test_ild_matches_reference(dtype, with_mixer):
    s, t, sm, tm = (torch.randn(BATCH, SEQ, 16, dtype=torch.float64).to(dtype) for _ in range(4))
    mixers = (sm, tm) if with_mixer else (None, None)
    got = ild_loss(s, t, *mixers)
    want = _ref_ild(s, t, *mixers)
    print(f"{dtype} mixer={with_mixer}: diff {abs(got.double() - want).item():.1e}")
    torch.testing.assert_close(got.double(), want, rtol=DTYPES[dtype], atol=DTYPES[dtype])
    assert ild_loss(t, t.clone()).item() == 0.0


def test_ild_is_not_squared():
    """Doubling every error doubles the loss (an L2 norm), where the MSE would quadruple."""
    s, t = torch.randn(BATCH, SEQ, 16), torch.randn(BATCH, SEQ, 16)
    torch.testing.assert_close(ild_loss(t + 2 * (s - t), t), 2 * ild_loss(s, t))


def test_ild_gradient_is_finite_where_a_token_matches_exactly():
    student, teacher = torch.randn(BATCH, SEQ, 16, requires_grad=True), torch.randn(BATCH, SEQ, 16)
    with torch.no_grad():
        student[0, 1] = teacher[0, 1]  # the norm's gradient x / ||x|| is 0/0 there
    ild_loss(student, teacher).backward()
    assert torch.isfinite(student.grad).all() and not student.grad[0, 1].any()


def test_ild_errors_name_the_problem():
    s = torch.randn(BATCH, SEQ, 16)
    with pytest.raises(ValueError, match="student_out shape"):
        ild_loss(s, s[:, :-1])
    with pytest.raises(ValueError, match="student_mixer shape"):
        ild_loss(s, s, s, s[:, :-1])
    with pytest.raises(ValueError, match="both"):
        ild_loss(s, s, s)
