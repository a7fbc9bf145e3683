"""MLAttention and its SVD initialisation against HF LlamaAttention, in float64 on fresh random inputs."""
from unittest import mock

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tests.conftest import tiny_llama
from zebra.cache import ZebraCache
from zebra.config import ZebraConfig
from zebra.init_mla import mla_from_llama_attention, select_rope_slots
from zebra.mla import MLAttention, apply_rope, attention_mask_4d

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, THETA = 64, 4, 2, 16, 10000.0
FULL_ROPE, FULL_KV = KV_HEADS * HEAD_DIM, KV_HEADS * 2 * HEAD_DIM


@pytest.fixture(scope="module")
def teacher():
    model = tiny_llama()  # sdpa: all float64 (eager softmaxes in float32)
    return model.model.layers[0].self_attn, LlamaRotaryEmbedding(model.config)


def zebra_config(qk_rope_dim=FULL_ROPE, kv_rank=FULL_KV, **kw) -> ZebraConfig:
    return ZebraConfig(
        vocab_size=32, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rope_theta=THETA,
        qk_rope_dim=qk_rope_dim, kv_rank=kv_rank,
        rope_freq_idx=[p % (HEAD_DIM // 2) for p in range(qk_rope_dim // 2)], **kw,
    )


def teacher_out(teacher, x, positions):
    """HF LlamaAttention, causal. x [B, T, D], positions [B, T]."""
    attn, rotary = teacher
    t = x.shape[1]
    mask = torch.zeros(t, t, dtype=x.dtype).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return attn(x, position_embeddings=rotary(x, positions), attention_mask=mask[None, None])[0]


def inputs(batch=2, seq=9):
    return torch.randn(batch, seq, HIDDEN, dtype=torch.float64), torch.arange(seq).expand(batch, seq)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("q_rank", [None, HIDDEN])
def test_full_rank_conversion_matches_llama(teacher, q_rank):
    mla = mla_from_llama_attention(teacher[0], zebra_config(q_rank=q_rank), 0)
    x, pos = inputs()
    with torch.no_grad():
        err = rel_err(mla(x, pos), teacher_out(teacher, x, pos))
    print(f"q_rank={q_rank}: relative error vs Llama {err:.3e}")
    assert err < 1e-6


def partial_rope_reference(teacher, slots, x, pos):
    """Llama attention where only the kept (group, frequency) pairs rotate: the target of partial RoPE."""
    attn, rotary = teacher
    (b, t, _), group, half = x.shape, HEADS // KV_HEADS, HEAD_DIM // 2
    rotated = torch.zeros(HEADS, HEAD_DIM, dtype=torch.bool)
    for g, i in slots:
        rotated[g * group : (g + 1) * group, [i, i + half]] = True
    cos, sin = rotary(x, pos)
    q = attn.q_proj(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(group, dim=1)
    v = attn.v_proj(x).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(group, dim=1)
    q, k = (torch.where(rotated[:, None], apply_rope(z, cos[:, None], sin[:, None]), z) for z in (q, k))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def test_partial_rope_full_rank_is_exact_and_truncation_error_falls(teacher):
    x, pos = inputs()
    rope = HEAD_DIM // 2  # 4 of the 16 (group, frequency) slots; W_kv then has 8 zero rows: rank 56
    slots = select_rope_slots(teacher[0], zebra_config(rope), rope // 2)
    with torch.no_grad():
        ref = partial_rope_reference(teacher, slots, x, pos)
        errs = [rel_err(mla_from_llama_attention(teacher[0], zebra_config(rope, r), 0)(x, pos), ref)
                for r in (4, 16, 32, 48, 56)]
        mla = mla_from_llama_attention(teacher[0], zebra_config(rope), 0)
        vs_llama = rel_err(mla(x, pos), teacher_out(teacher, x, pos))
        reloaded = MLAttention(zebra_config(rope), 0).double()
        reloaded.load_state_dict(mla.state_dict())  # the per-layer rope_freq_idx travels with the weights
        reload_diff = (reloaded(x, pos) - mla(x, pos)).abs().max().item()
    print(f"slots {slots}; error vs partial-RoPE reference by kv_rank 4..56: {errs}; vs Llama {vs_llama:.3e}; "
          f"reloaded max diff {reload_diff:.1e}")
    # SVD truncation is optimal for the weights, not for the outputs on these fresh inputs, so neighbouring
    # ranks may swap (seen once in five runs at ranks 16/32); far-apart ranks and full rank may not.
    assert errs[0] > errs[2] > errs[-2] > errs[-1] and errs[-1] < 1e-10
    assert mla.rope_freq_idx.tolist() == [i for _, i in slots] and reload_diff == 0
    assert 1e-4 < vs_llama < 1  # partial RoPE is an approximation of the teacher, not a copy


def test_truncation_error_falls_with_kv_rank_full_rope(teacher):
    x, pos = inputs()
    with torch.no_grad():
        ref = teacher_out(teacher, x, pos)
        errs = [rel_err(mla_from_llama_attention(teacher[0], zebra_config(kv_rank=r), 0)(x, pos), ref)
                for r in (4, 8, 16, 24, 32)]
    print(f"error vs Llama by kv_rank 4..32 (full RoPE): {errs}")
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-10


def random_mla(**kw) -> MLAttention:
    mla = MLAttention(zebra_config(qk_rope_dim=8, kv_rank=12, **kw), 0).double()
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.3)
        mla.rope_freq_idx.copy_(torch.randint(0, HEAD_DIM // 2, (4,)))
    return mla


@pytest.mark.parametrize("padded", [False, True])
def test_naive_equals_absorbed(padded):
    mla = random_mla(q_rank=24)
    x, pos = inputs(seq=7)
    padding = torch.tensor([[1] * 7, [0] * 3 + [1] * 4]) if padded else None
    mask = attention_mask_4d(padding, 7, 7, x.device)
    with torch.no_grad():
        q_nope, q_pe = mla._split_heads(mla._q_proj(x), x.shape[:2])
        latent, k_pe = mla.kv_a_proj(x).split([12, 8], dim=-1)
        naive = mla.naive_attention(q_nope, q_pe, latent, k_pe, mask)
        absorbed = mla.absorbed_attention(q_nope, q_pe, latent, k_pe, mask)
    diff = (naive - absorbed).abs().max().item()
    print(f"padded={padded}: naive vs absorbed max diff {diff:.3e}")
    assert torch.isfinite(absorbed).all() and diff < 1e-10


def cached(mla, x, pos, cache, padding=None):
    """One forward of the layer through a ZebraCache, with the bookkeeping the model does around its layers."""
    cache.begin(x.shape[1], x.shape[0])
    out = mla(x, pos, cache, padding)
    cache.advance(x.shape[1])
    return out


@pytest.mark.parametrize("absorb", [True, False])
def test_decode_with_cache_equals_full_forward(absorb):
    mla = random_mla(mla_absorb=absorb)
    x, pos = inputs(seq=8)
    cfg = zebra_config(8, 12)
    with torch.no_grad(), mock.patch.object(mla, "absorbed_attention", wraps=mla.absorbed_attention) as absorbed:
        full = mla(x, pos)
        step_cache, split_cache = (ZebraCache(cfg, 2, 8, dtype=torch.float64) for _ in range(2))
        steps = torch.cat([cached(mla, x[:, t : t + 1], pos[:, t : t + 1], step_cache) for t in range(8)], dim=1)
        chunks = [(0, 5), (5, 6), (6, 8)]  # prefill, one decode step, a two-token step
        split = torch.cat([cached(mla, x[:, a:b], pos[:, a:b], split_cache) for a, b in chunks], dim=1)
    diffs = [(y - full).abs().max().item() for y in (steps, split)]
    print(f"absorb={absorb}: token-by-token / prefill-then-decode max diff {diffs}")
    assert max(diffs) < 1e-10
    assert absorbed.call_count == (7 + 2 if absorb else 0)  # every step with history, never a fresh prefill
    for cache in (step_cache, split_cache):
        assert [tuple(t.shape) for t in cache.tensors()] == [(2, 8, 12), (2, 8, 8)]


def test_left_padding_matches_unpadded():
    """Row 0: 9 real tokens; row 1: 3 pads then 6 real tokens. Prefill both, then decode one token."""
    mla = random_mla()
    pad, total = 3, 9
    x = torch.randn(2, total + 1, HIDDEN, dtype=torch.float64)  # last column: the decoded token
    padding = torch.ones(2, total, dtype=torch.long)
    padding[1, :pad] = 0
    pos = torch.stack([torch.arange(total + 1), (torch.arange(total + 1) - pad).clamp(min=1)])
    with torch.no_grad():
        cache = ZebraCache(zebra_config(8, 12), 2, total + 1, dtype=torch.float64)
        prefill = cached(mla, x[:, :total], pos[:, :total], cache, padding)
        padding = torch.cat([padding, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = cached(mla, x[:, total:], pos[:, total:], cache, padding)
        got = [torch.cat([prefill, step], dim=1)[0], torch.cat([prefill, step], dim=1)[1, pad:]]
        want = [mla(x[:1], pos[:1])[0], mla(x[1:, pad:], pos[1:, pad:])[0]]
    diffs = [(g - w).abs().max().item() for g, w in zip(got, want)]
    print(f"left padding: unpadded row / padded row max diff {diffs}")
    assert torch.isfinite(prefill).all() and max(diffs) < 1e-10


def test_teacher_shape_errors_name_the_field(teacher):
    with pytest.raises(ValueError, match="qk_rope_dim"):
        mla_from_llama_attention(teacher[0], zebra_config(FULL_ROPE + 2), 0)
    with pytest.raises(ValueError, match="v_head_dim"):
        mla_from_llama_attention(teacher[0], zebra_config(v_head_dim=8), 0)
    with pytest.raises(ValueError, match="bias"):
        mla_from_llama_attention(tiny_llama(attention_bias=True).model.layers[0].self_attn, zebra_config(), 0)
    with pytest.raises(ValueError, match="calib"):
        mla_from_llama_attention(teacher[0], zebra_config(), 0, calib=torch.randn(5, HIDDEN + 1))
