"""Fused full-vocabulary KD loss (kernels.kd_loss): the Triton kernel against a float64 reference written here
(log_softmax in float64), per-row terms and gradient on fresh random logits; through zebra.losses.kd_loss the
kernel path equals the chunked PyTorch path, loss and gradient. On a CPU under TRITON_INTERPRET=1 (small shapes:
the interpreter is slow), on the GPU (`gpu`) at a real shape in bfloat16. Also: the dispatch and its errors."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the import below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import kd_loss as kd_kernel  # noqa: E402
from kernels.kd_loss import kd_rows_triton  # noqa: E402
from zebra.losses import IGNORE_INDEX, kd_loss  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative (norm) error against float64: float32 differs by rounding only; bfloat16 rounds the gradient it writes.
TOL = {torch.float32: {"loss": 1e-5, "grad": 1e-5}, torch.bfloat16: {"loss": 1e-5, "grad": 1e-2}}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def logits(n, vocab, dtype, device=DEVICE, spread=3.0, pad=0):
    """[n, vocab] logits with a spread of a few nats, in dtype; a strided slice of [n, vocab + pad] when pad."""
    wide = torch.randn(n, vocab + pad, device=device) * spread
    return wide.to(dtype)[:, pad // 2 : pad // 2 + vocab]


def targets_with_ignored(n, vocab, device=DEVICE):
    """[n] int64 token ids, about a quarter of them IGNORE_INDEX (never all)."""
    t = torch.randint(0, vocab, (n,), device=device)
    t[torch.rand(n, device=device) < 0.25] = IGNORE_INDEX
    t[0] = vocab - 1  # the last column: the end of the last, partial block
    return t


def reference64(zs, zt, targets, temperature, ce_weight):
    """The KD loss and its gradient written directly in float64: (loss scalar, grad [n, V])."""
    zs64 = zs.detach().to(F64).requires_grad_()
    log_q = torch.log_softmax(zs64 / temperature, -1)
    log_p = torch.log_softmax(zt.to(F64) / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    loss = (1 - ce_weight) * temperature**2 * kl
    if ce_weight > 0:
        keep = targets != IGNORE_INDEX
        nll = -torch.log_softmax(zs64, -1)[keep].gather(-1, targets[keep][:, None])
        loss = loss + ce_weight * nll.mean()
    (grad,) = torch.autograd.grad(loss, zs64)
    return loss.detach(), grad


def rows64(zs, zt, targets, temperature, kl_scale, ce_scale):
    """kd_rows_triton's results written out in float64: grad [n, V], kl [n], ce [n] (0 where ignored)."""
    zs, zt = zs.to(F64), zt.to(F64)
    log_q, log_p = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    keep = targets != IGNORE_INDEX
    log_s = torch.log_softmax(zs, -1)
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), zs.shape[-1]).to(F64)
    ce = torch.where(keep, -(log_s * onehot).sum(-1), 0.0)
    grad = kl_scale * (log_q.exp() - p) + ce_scale * keep[:, None] * (log_s.exp() - onehot)
    return grad, kl, ce


CASES = [(vocab, dtype, temperature, ce_weight) for vocab in (1000, 4099) for dtype in (torch.float32, torch.bfloat16)
         for temperature, ce_weight in ((1.0, 0.0), (2.0, 0.3))] + [(1000, torch.float32, 2.0, 0.0),
                                                                   (4099, torch.bfloat16, 1.0, 0.3)]


@pytest.mark.parametrize("vocab, dtype, temperature, ce_weight", CASES)
def test_kd_loss_triton_matches_float64_reference(vocab, dtype, temperature, ce_weight):
    """kd_loss(backend="triton"): loss and student gradient == the float64 reference; strided student rows."""
    n = 37
    zs = logits(n, vocab, dtype, pad=6).requires_grad_()
    zt = logits(n, vocab, dtype)
    labels = targets_with_ignored(n, vocab)
    # kd_loss shifts HF labels by one: labels [1, n] give targets labels[1:], IGNORE_INDEX at the end.
    hf_labels = torch.cat([labels.new_full((1,), IGNORE_INDEX), labels[:-1]])[None]
    loss = kd_loss(zs[None], zt[None], temperature, ce_weight, hf_labels if ce_weight else None, backend="triton")
    (grad,) = torch.autograd.grad(loss, zs)
    targets = torch.cat([labels[:-1], labels.new_full((1,), IGNORE_INDEX)])
    loss64, grad64 = reference64(zs, zt, targets, temperature, ce_weight)
    errors = {"loss": rel_err(loss, loss64), "grad": rel_err(grad, grad64)}
    print(f"{dtype} V={vocab} T={temperature} w={ce_weight}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert grad.dtype == dtype and loss.dtype == torch.float32
    assert errors["loss"] < TOL[dtype]["loss"] and errors["grad"] < TOL[dtype]["grad"], errors


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # 0 * -inf, guarded
def test_kernel_per_row_terms_match_reference():
    """kd_rows_triton's per-row KL, CE and scaled gradient == rows64 in float64 on the same float32 rows,
    including a row where the teacher rules tokens out (logit -inf: p = 0 and log p = -inf, the p > 0 guard) and
    IGNORE_INDEX rows."""
    n, vocab, temperature = 9, 777, 1.0
    zs, zt = logits(n, vocab, torch.float32), logits(n, vocab, torch.float32)
    zt[1, :300] = float("-inf")
    targets = targets_with_ignored(n, vocab)
    grad, kl, ce = kd_rows_triton(zs, zt, targets, temperature, kl_scale=0.7, ce_scale=0.2)
    grad64, kl64, ce64 = rows64(zs, zt, targets, temperature, 0.7, 0.2)
    assert rel_err(kl, kl64) < 1e-5 and rel_err(ce, ce64) < 1e-5 and rel_err(grad, grad64) < 1e-5
    assert (ce[targets == IGNORE_INDEX] == 0).all() and torch.isfinite(kl).all()
    _, kl_no_ce, ce_none = kd_rows_triton(zs, zt, None, temperature, 0.7, 0.0, write_grad=False)
    assert torch.equal(kl_no_ce, kl) and (ce_none == 0).all()


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_triton_path_equals_chunked_path(ce_weight):
    """kd_loss through the kernel == through the chunked PyTorch loop (backend "torch", several chunks)."""
    batch, seq, vocab = 2, 13, 1000
    zs = logits(batch * seq, vocab, torch.bfloat16).view(batch, seq, vocab).requires_grad_()
    zt = logits(batch * seq, vocab, torch.bfloat16).view(batch, seq, vocab)
    labels = targets_with_ignored(batch * seq, vocab).view(batch, seq)
    results = {}
    for backend in ("triton", "torch"):
        loss = kd_loss(zs, zt, 2.0, ce_weight, labels, chunk_tokens=8, backend=backend)
        results[backend] = (loss, *torch.autograd.grad(loss, zs))
    (loss_k, grad_k), (loss_t, grad_t) = results["triton"], results["torch"]
    assert rel_err(loss_k, loss_t) < 1e-5 and rel_err(grad_k, grad_t) < 1e-2


def test_triton_backend_that_cannot_run_raises(monkeypatch):
    """backend="triton" where the kernel cannot run is a RuntimeError naming the backend and the reason; "auto"
    on CPU tensors takes the chunked loop (no interpreter); a bad backend is a ValueError naming it."""
    zs, zt = logits(4, 50, torch.float32, device="cpu"), logits(4, 50, torch.float32, device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"kd_loss: backend='triton' but tensors are on cpu"):
        kd_loss(zs[None], zt[None], backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match=r"backend='triton' but student dtype torch.float64 has no kernel"):
        kd_loss(zs.double()[None], zt.double()[None], backend="triton")
    assert kd_kernel.unsupported(zs, zt, "auto") == "tensors are on cpu"
    torch.testing.assert_close(kd_loss(zs[None], zt[None]), kd_loss(zs[None], zt[None], backend="torch"))
    with pytest.raises(ValueError, match="backend must be one of"):
        kd_loss(zs[None], zt[None], backend="cuda")


def test_kernel_rejects_mismatched_shapes():
    zs = logits(4, 50, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"teacher \(4, 49\)"):
        kd_rows_triton(zs, zs[:, :49], None, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"targets must be \[n\] = \[4\]"):
        kd_rows_triton(zs, zs, torch.zeros(3, dtype=torch.long), 1.0, 1.0, 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_gpu_real_shape_matches_chunked_path(ce_weight):
    """4096 tokens x SmolLM2's 49,152 vocab in bfloat16, T=2: kernel (backend "auto" on CUDA) == chunked loop."""
    batch, seq, vocab = 2, 2048, 49152
    zs = logits(batch * seq, vocab, torch.bfloat16, device="cuda").view(batch, seq, vocab).requires_grad_()
    zt = logits(batch * seq, vocab, torch.bfloat16, device="cuda").view(batch, seq, vocab)
    labels = targets_with_ignored(batch * seq, vocab, device="cuda").view(batch, seq)
    results, ms = {}, {}
    for backend in ("auto", "torch"):
        loss = kd_loss(zs, zt, 2.0, ce_weight, labels, backend=backend)
        results[backend] = (loss, *torch.autograd.grad(loss, zs))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            torch.autograd.grad(kd_loss(zs, zt, 2.0, ce_weight, labels, backend=backend), zs)
        end.record()
        torch.cuda.synchronize()
        ms[backend] = start.elapsed_time(end) / 5
    (loss_k, grad_k), (loss_t, grad_t) = results["auto"], results["torch"]
    print(f"loss kernel {loss_k.item():.6f} chunked {loss_t.item():.6f}, grad rel err {rel_err(grad_k, grad_t):.1e}; "
          f"loss + grad {ms['auto']:.2f} ms kernel, {ms['torch']:.2f} ms chunked")
    assert rel_err(loss_k, loss_t) < 1e-5 and rel_err(grad_k, grad_t) < 1e-2
