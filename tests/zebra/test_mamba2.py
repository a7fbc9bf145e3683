"""Mamba2Mixer: decode and prefill through ZebraCache == full forward, left padding, gradients, and the
initialisation from a Llama attention layer. Float64, fresh random inputs."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv

from kernels.ssd import ssd_sequential_ref
from tests.conftest import tiny_llama
from zebra.cache import ZebraCache
from zebra.config import ZebraConfig
from zebra.init_mamba import mamba_from_llama_attention
from zebra.kv import state_bytes_per_sequence
from zebra import mamba2
from zebra.mamba2 import Mamba2Mixer

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
TOL = 1e-10


def mamba_config(**kw) -> ZebraConfig:
    fields = dict(vocab_size=32, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                  qk_rope_dim=HEAD_DIM, mixer_types=["mamba"], chunk_size=4, mamba_backend="torch")
    fields.update(kw)
    return ZebraConfig(**fields)


@pytest.fixture
def mixer():
    """A random mixer whose conv and gate are far from their initial values (a harder test)."""
    m = Mamba2Mixer(mamba_config(), 0).double()
    with torch.no_grad():
        m.conv1d.weight.normal_(0.0, 0.5)
        m.conv1d.bias.normal_(0.0, 0.5)
        m.D.normal_()
        m.norm.weight.normal_(1.0, 0.2)
    return m


def max_diff(a, b):
    return (a - b).abs().max().item()


def cached(mixer, x, cache, attention_mask=None):
    """One forward of the mixer through a ZebraCache, with the bookkeeping the model does around its layers."""
    cache.begin(x.shape[1], x.shape[0])
    out = mixer(x, cache=cache, attention_mask=attention_mask)
    cache.advance(x.shape[1])
    return out


@torch.no_grad()
def test_token_by_token_decode_matches_full_forward(mixer):
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64)
    full = mixer(x)
    config = mamba_config()
    cache = ZebraCache(config, 2, 11, dtype=torch.float64)
    steps = torch.cat([cached(mixer, x[:, t : t + 1], cache) for t in range(x.shape[1])], dim=1)
    print(f"decode vs full: max diff {max_diff(steps, full):.2e}")
    assert max_diff(steps, full) < TOL
    conv, ssm = cache.mamba_state(0)
    assert conv.shape == (2, mixer.conv_dim, config.d_conv)
    assert ssm.shape == (2, HEADS, HEAD_DIM, config.d_state)
    assert cache.nbytes() == 2 * state_bytes_per_sequence(config, torch.float64)
    assert cache.lengths.tolist() == [11, 11]


@torch.no_grad()
@pytest.mark.parametrize("prefill", [1, 2, 6])
def test_prefill_continue_and_decode_match_full_forward(mixer, prefill):
    """Prefill, then a multi-token continuation from the stored state, then single-token steps."""
    x = torch.randn(2, prefill + 7, HIDDEN, dtype=torch.float64)
    full = mixer(x)
    cache = ZebraCache(mamba_config(), 2, x.shape[1], dtype=torch.float64)
    parts = [cached(mixer, x[:, :prefill], cache), cached(mixer, x[:, prefill : prefill + 5], cache)]
    parts += [cached(mixer, x[:, t : t + 1], cache) for t in range(prefill + 5, x.shape[1])]
    diff = max_diff(torch.cat(parts, dim=1), full)
    print(f"prefill {prefill} + continue 5 + decode 2 vs full: max diff {diff:.2e}")
    assert diff < TOL


@torch.no_grad()
def test_left_padding_leaves_real_positions_unchanged(mixer):
    lengths, total, extra = [7, 4], 9, 3
    seqs = [torch.randn(1, n + extra, HIDDEN, dtype=torch.float64) for n in lengths]
    padded = torch.cat([torch.cat([torch.randn(1, total - n, HIDDEN, dtype=torch.float64), s[:, :n]], dim=1)
                        for n, s in zip(lengths, seqs)])
    mask = torch.tensor([[0] * (total - n) + [1] * n for n in lengths])
    cache = ZebraCache(mamba_config(), 2, total + extra, dtype=torch.float64)
    out = cached(mixer, padded, cache, mask)
    for t in range(extra):  # decode continues after the padded prefill
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        step_in = torch.cat([s[:, n + t : n + t + 1] for n, s in zip(lengths, seqs)])
        out = torch.cat([out, cached(mixer, step_in, cache, mask)], dim=1)
    for i, (n, s) in enumerate(zip(lengths, seqs)):
        diff = max_diff(out[i : i + 1, total - n :], mixer(s))
        print(f"sequence {i} ({total - n} pads): max diff at real positions {diff:.2e}")
        assert diff < TOL


def test_gradient_reaches_every_parameter(mixer):
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    mixer(x).pow(2).sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -- initialisation from Llama attention ----------------------------------------------------------
@pytest.fixture
def attention():
    return tiny_llama().model.layers[0].self_attn  # hidden 64, 4 heads, 2 KV heads, head_dim 16


def test_init_copies_teacher_weights(attention):
    config = mamba_config()
    mixer = mamba_from_llama_attention(attention, config, 0)
    z, x, B, C, dt = mixer.in_proj.weight.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM,
                                                 HEADS * HEAD_DIM, HEADS])
    assert torch.equal(C, attention.q_proj.weight)
    assert torch.equal(B, attention.k_proj.weight)
    assert torch.equal(x, attention.v_proj.weight)
    assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
    assert 0 < z.std() < 3 * config.initializer_range and 0 < dt.std() < 3 * config.initializer_range
    taps = mixer.conv1d.weight[:, 0]
    assert torch.equal(taps[:, -1], torch.ones_like(taps[:, -1])) and not taps[:, :-1].any()
    assert not mixer.conv1d.bias.any()
    dt_init = F.softplus(mixer.dt_bias)
    assert dt_init.min() >= 1e-3 * (1 - 1e-9) and dt_init.max() <= 1e-1 * (1 + 1e-9)
    A = -torch.exp(mixer.A_log)
    assert A.min() >= -16 and A.max() <= -1
    assert torch.equal(mixer.D, torch.ones(HEADS, dtype=mixer.D.dtype))
    assert torch.equal(mixer.norm.weight, torch.ones_like(mixer.norm.weight))
    assert mixer.in_proj.weight.dtype == attention.q_proj.weight.dtype


@torch.no_grad()
def test_initialised_layer_is_the_teachers_linear_attention(attention):
    """With the identity conv, heads read silu(W_q h), silu(W_k h), silu(W_v h) with GQA's head-to-group map."""
    mixer = mamba_from_llama_attention(attention, mamba_config(), 0)
    h = torch.randn(2, 10, HIDDEN, dtype=torch.float64)

    def per_head(proj):  # [b, t, D] -> [b, t, heads, head_dim], KV heads repeated as Llama repeats them
        out = F.silu(proj(h)).unflatten(-1, (-1, HEAD_DIM)).transpose(1, 2)
        return repeat_kv(out, HEADS // out.shape[1]).transpose(1, 2)

    proj = mixer.in_proj(h)
    z, dt_raw = proj[..., : HEADS * HEAD_DIM], proj[..., -HEADS:]
    dt = F.softplus(dt_raw + mixer.dt_bias)
    y, _ = ssd_sequential_ref(per_head(attention.v_proj), dt, -torch.exp(mixer.A_log), per_head(attention.k_proj),
                              per_head(attention.q_proj), D=mixer.D)
    expected = attention.o_proj(mixer.norm(y.flatten(-2), z))
    diff = max_diff(mixer(h), expected)
    print(f"initialised mixer vs teacher linear attention: max diff {diff:.2e}")
    assert diff < TOL and torch.isfinite(expected).all()


@pytest.mark.parametrize("field, value", [("d_state", 8), ("mamba_head_dim", 8), ("mamba_groups", 1),
                                          ("mamba_heads", 2), ("hidden_size", 32)])
def test_init_rejects_mismatched_shapes(attention, field, value):
    with pytest.raises(ValueError, match=field):
        mamba_from_llama_attention(attention, mamba_config(**{field: value}), 0)


@pytest.mark.gpu
@torch.no_grad()
def test_kernel_path_matches_reference_path():
    """On CUDA, backend 'auto' (mamba_ssm / causal_conv1d where installed) == backend 'torch', full and cached."""
    mixer = Mamba2Mixer(mamba_config(mamba_backend="auto", chunk_size=16), 0).cuda()
    x = torch.randn(2, 70, HIDDEN, device="cuda")
    reference = Mamba2Mixer(mamba_config(), 0).cuda()
    reference.load_state_dict(mixer.state_dict())
    expected = reference(x)
    cache = ZebraCache(mamba_config(), 2, 70, device="cuda")
    parts = [cached(mixer, x[:, :40], cache), cached(mixer, x[:, 40:67], cache)]
    parts += [cached(mixer, x[:, t : t + 1], cache) for t in range(67, 70)]
    errors = [((out - expected).norm() / expected.norm()).item() for out in (mixer(x), torch.cat(parts, dim=1))]
    print(f"float32 kernel path vs reference: relative error full {errors[0]:.2e}, cached {errors[1]:.2e}")
    assert max(errors) < 1e-3


def test_in_proj_padded_to_a_multiple_of_8_rows_is_in_proj(mixer):
    """The product runs on a weight zero-padded to a multiple of 8 rows (cuBLAS's aligned kernels); values and
    gradients (input and weight) equal the plain in_proj's in float64."""
    width = mixer.in_proj.out_features
    assert width % 8 != 0  # this mixer's width takes the padded path
    rows = mamba2.PAD_MIN_ROWS // 2 + 1
    h = torch.randn(2, rows, HIDDEN, dtype=torch.float64, requires_grad=True)
    out = mixer._in_proj(h)
    assert out.shape == (2, rows, width)
    seed = torch.randn_like(out)
    grads = torch.autograd.grad((out * seed).sum(), [h, mixer.in_proj.weight])
    ref = mixer.in_proj(h)
    ref_grads = torch.autograd.grad((ref * seed).sum(), [h, mixer.in_proj.weight])
    assert max_diff(out, ref) < TOL
    assert all(max_diff(a, b) < TOL for a, b in zip(grads, ref_grads))


def test_in_proj_of_a_few_rows_does_not_copy_the_weight(mixer, monkeypatch):
    """A decode step's few rows run the plain product: no padded copy of the weight per generated token; the
    many-row product of a training step or prefill does pad."""
    padded = []
    real_pad = torch.nn.functional.pad
    monkeypatch.setattr(mamba2.F, "pad", lambda *a, **k: padded.append(a[0].shape) or real_pad(*a, **k))
    step = torch.randn(16, 1, HIDDEN, dtype=torch.float64)
    assert max_diff(mixer._in_proj(step), mixer.in_proj(step)) < TOL
    assert padded == []
    mixer._in_proj(torch.randn(1, mamba2.PAD_MIN_ROWS, HIDDEN, dtype=torch.float64))
    assert padded == [mixer.in_proj.weight.shape]
