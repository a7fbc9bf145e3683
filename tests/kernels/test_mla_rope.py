"""MLA's RoPE + Q/K/V assembly kernel (kernels.mla_rope): Q, K, V and the gradients of q, kv and k_pe against the
float64 formula on fresh random inputs (k_pe a strided slice as kv_a_proj's output gives it, token counts not a
multiple of the block, head dims not powers of two); on a CPU under TRITON_INTERPRET=1 (float32), on the GPU
(`gpu`) at SmolLM2's MLA shape in bfloat16. Then zebra.mla.MLAttention through the kernel equals its PyTorch path
(output and every parameter's gradient), and the dispatch point's choices and errors."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the imports below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.mla_rope import mla_qkv_ref, mla_qkv_triton  # noqa: E402
from zebra.config import ZebraConfig  # noqa: E402
from zebra.mla import MLAttention, rope_cos_sin  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def inputs(b, t, heads, nope, rope, v_dim, kv_rank, dtype, device="cpu"):
    """q [b, t, heads * (nope + rope)], kv [b, t, heads * (nope + v)] and k_pe [b, t, rope] (a slice of a
    [b, t, kv_rank + rope] leaf), all requiring grad; cos, sin of random positions and frequencies (float32)."""
    q = torch.randn(b, t, heads * (nope + rope), device=device).to(dtype).requires_grad_()
    kv = torch.randn(b, t, heads * (nope + v_dim), device=device).to(dtype).requires_grad_()
    kv_a = torch.randn(b, t, kv_rank + rope, device=device).to(dtype).requires_grad_()
    positions = torch.randint(0, 4096, (b, t), device=device)
    cos, sin = rope_cos_sin(positions, 10000.0 ** -torch.rand(rope // 2, device=device))
    return q, kv, kv_a, kv_a[..., kv_rank:], cos, sin


def check(b, t, heads, nope, rope, v_dim, dtype=torch.float32, device="cpu"):
    q, kv, kv_a, k_pe, cos, sin = inputs(b, t, heads, nope, rope, v_dim, 5, dtype, device)
    got = mla_qkv_triton(q, kv, k_pe, cos, sin, heads, nope, v_dim)
    assert [tuple(x.shape) for x in got] == [(b, heads, t, nope + rope)] * 2 + [(b, heads, t, v_dim)]
    assert all(x.dtype == dtype and x.is_contiguous() for x in got)
    cotangents = [torch.randn_like(x) for x in got]
    grads = torch.autograd.grad(got, [q, kv, kv_a], cotangents)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, kv, kv_a)]
    want = mla_qkv_ref(leaves64[0], leaves64[1], leaves64[2][..., 5:], cos.double(), sin.double(), heads, nope, v_dim)
    grads64 = torch.autograd.grad(want, leaves64, [c.double() for c in cotangents])
    errors = {n: rel_err(a, w) for n, a, w in zip(("Q", "K", "V"), got, want)}
    errors |= {f"d{n}": rel_err(g, g64) for n, g, g64 in zip(("q", "kv", "kv_a"), grads, grads64)}
    print(f"{dtype} b{b} t{t} h{heads} nope {nope} rope {rope} v {v_dim}: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < TOL[dtype], errors
    assert not grads[2][..., :5].any()  # the latent's columns of kv_a get nothing from here


@pytest.mark.parametrize("b, t, heads, nope, rope, v_dim", [
    (2, 19, 3, 8, 8, 6),      # t not a multiple of the block; v not a power of two
    (1, 16, 2, 12, 4, 16),    # nope not a power of two; one block
    (2, 33, 1, 4, 16, 4),     # one head; the rotary part wider than the rest
])
def test_kernel_matches_float64_formula(b, t, heads, nope, rope, v_dim):
    check(b, t, heads, nope, rope, v_dim)


def test_reference_is_the_attention_inputs_of_the_pytorch_path():
    """mla_qkv_ref (the kernel's contract) builds the Q, K, V that MLAttention.naive_attention gives SDPA, in
    float64: the same attention output from them."""
    mla = MLAttention(config(q_rank=None), 0).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    pos = torch.arange(11).expand(2, 11)
    latent, k_pe = mla.kv_a_proj(x).split([mla.kv_rank, mla.rope_dim], dim=-1)
    cos, sin = rope_cos_sin(pos, mla._inv_freq_on(x.device)[mla.rope_freq_idx])
    with torch.no_grad():
        big_q, big_k, big_v = mla_qkv_ref(mla.q_proj(x), mla.kv_b_proj(latent), k_pe, cos, sin, mla.num_heads,
                                          mla.nope_dim, mla.v_dim)
        out = torch.nn.functional.scaled_dot_product_attention(big_q, big_k, big_v, is_causal=True, scale=mla.scale)
        mine = mla.o_proj(out.transpose(1, 2).reshape(2, 11, -1))
        torch.testing.assert_close(mine, mla(x, pos), rtol=1e-12, atol=1e-12)


def config(**kw) -> ZebraConfig:
    return ZebraConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=3, num_key_value_heads=1, head_dim=8, qk_rope_dim=6, kv_rank=10,
                       rope_freq_idx=[2, 0, 1], **kw)


@pytest.mark.parametrize("q_rank", [None, 12])
def test_module_through_the_kernel_equals_its_pytorch_path(q_rank):
    """MLAttention with mamba_backend "triton" (the kernel; TRITON_INTERPRET on a CPU) and "torch": the same
    output and parameter gradients on a fresh causal pass, float32."""
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    fused, plain = (MLAttention(config(q_rank=q_rank, mamba_backend=backend), 0) for backend in ("triton", "torch"))
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 21, 32)
    pos = torch.arange(21).expand(2, 21)
    results = []
    for mla in (fused, plain):
        out = mla(x, pos)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), {n: p.grad for n, p in mla.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_dispatch():
    x, pos = torch.randn(1, 5, 32), torch.arange(5)[None]
    assert not MLAttention(config(mamba_backend="torch"), 0)._fused_inputs(torch.randn(1, 5, 42), torch.randn(1, 5, 6))
    assert not MLAttention(config(), 0)._fused_inputs(torch.randn(1, 5, 42), torch.randn(1, 5, 6))  # auto: CPU
    with pytest.raises(RuntimeError, match="float64"):
        MLAttention(config(mamba_backend="triton"), 0).double()(x.double(), pos)
    with pytest.raises(ValueError, match="kv shape"):
        mla_qkv_triton(torch.randn(1, 5, 42), torch.randn(1, 5, 40), torch.randn(1, 5, 6), torch.randn(1, 5, 6),
                       torch.randn(1, 5, 6), 3, 8, 6)


@pytest.mark.gpu
def test_kernel_matches_formula_on_gpu():
    """SmolLM2's MLA shape in bfloat16: 16 x 2048 tokens, 9 heads, nope 64, rope 32, v 64."""
    torch.manual_seed(0)
    check(16, 2048, 9, 64, 32, 64, torch.bfloat16, "cuda")
