"""The static ZebraCache: bytes against zebra.kv, views and row management, overflow, rows of different
lengths against the full forward (float64), and generate() on the static cache against a greedy loop."""
from unittest import mock

import pytest
import torch

from zebra.cache import ZebraCache
from tests.conftest import rel
from zebra.convert import convert, hybrid_config
from zebra.kv import kv_bytes_per_token, state_bytes_per_sequence


@pytest.fixture
def hybrid(teacher64):
    cfg = hybrid_config(teacher64.config, [0, 3], kv_rank=24, qk_rope_dim=8, chunk_size=4)
    model = convert(teacher64, cfg, calib_ids=torch.randint(0, 256, (2, 16)))
    with torch.no_grad():  # a conv and gate far from their initial values: a harder test
        for layer in model.model.layers:
            if layer.layer_type == "mamba":
                layer.mixer.conv1d.weight.normal_(0.0, 0.5)
                layer.mixer.conv1d.bias.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bytes_equal_zebra_kv(hybrid, dtype):
    cfg = hybrid.config
    cache = ZebraCache(cfg, 3, 17, dtype=dtype)
    per_row = 17 * kv_bytes_per_token(cfg, dtype) + state_bytes_per_sequence(cfg, dtype)
    print(dtype, cache.nbytes(), 3 * per_row)
    assert cache.nbytes() == 3 * per_row
    assert {t.dtype for t in cache.ssm.values()} == {torch.promote_types(dtype, torch.float32)}
    assert {t.dtype for t in [*cache.latent.values(), *cache.conv.values()]} == {dtype}


def test_views_share_storage_and_rows_reset_and_copy(hybrid):
    cache = ZebraCache(hybrid.config, 4, 6, dtype=torch.float64)
    view = cache.narrow(1, 2)
    assert view.batch_size == 2 and cache.slot(3).batch_size == 1
    view.lengths.fill_(5)
    view.ssm[1].fill_(2.0)
    view.latent[0][1, 4].fill_(3.0)
    assert cache.lengths.tolist() == [0, 5, 5, 0]
    assert cache.ssm[1][1:3].eq(2.0).all() and not cache.ssm[1][[0, 3]].any()
    assert cache.latent[0][2, 4].eq(3.0).all()
    cache.copy_row(2, 0)
    assert cache.lengths[0] == 5 and torch.equal(cache.latent[0][0], cache.latent[0][2])
    cache.reset_rows([1, 2])
    assert cache.lengths.tolist() == [5, 0, 0, 0] and not cache.ssm[1][1:3].any() and cache.ssm[1][0].eq(2.0).all()
    with pytest.raises(ValueError, match="outside the cache's 4 rows"):
        cache.narrow(3, 2)


def test_overflow_raises_eagerly_and_is_dropped_when_static(hybrid):
    cache = ZebraCache(hybrid.config, 2, 5, dtype=torch.float64)
    ids = torch.randint(3, 256, (2, 5))
    with torch.no_grad():
        hybrid(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="max_len is 5"):
            hybrid(ids[:, :1], past_key_values=cache, use_cache=True)
        before = [t.clone() for t in cache.latent.values()]
        cache.static = True  # what a CUDA graph replays: no host check, the write past the end is dropped
        out = hybrid(ids[:, :1], past_key_values=cache, use_cache=True).logits
    assert torch.isfinite(out).all() and cache.lengths.tolist() == [5, 5]
    assert all(torch.equal(a, b) for a, b in zip(before, cache.latent.values()))


def test_rows_of_different_lengths_decode_like_full_forward(hybrid):
    """Row 0 holds 7 tokens, row 1 holds 3 (each prefilled through its slot); then both decode together."""
    seqs = [torch.randint(3, 256, (1, 11)), torch.randint(3, 256, (1, 7))]
    prompt = [7, 3]
    cache = ZebraCache(hybrid.config, 2, 12, dtype=torch.float64)
    got = [[], []]
    with torch.no_grad():
        for r, (seq, n) in enumerate(zip(seqs, prompt)):
            got[r].append(hybrid(seq[:, :n], past_key_values=cache.slot(r), use_cache=True).logits[0])
        assert cache.lengths.tolist() == prompt
        for t in range(4):
            step = torch.cat([seq[:, n + t : n + t + 1] for seq, n in zip(seqs, prompt)])
            logits = hybrid(step, past_key_values=cache, use_cache=True).logits
            for r in range(2):
                got[r].append(logits[r])
        for r, (seq, n) in enumerate(zip(seqs, prompt)):
            full = hybrid(seq[:, : n + 4]).logits[0]
            err = rel(torch.cat(got[r]), full)
            print(f"row {r} ({n} prompt tokens + 4 steps): rel err vs full forward {err:.2e}")
            assert err < 1e-10
    assert cache.lengths.tolist() == [11, 7]


def test_generate_uses_the_static_cache_and_equals_a_greedy_loop(hybrid):
    ids = torch.randint(3, 256, (2, 6))
    seen = []
    forward = hybrid.forward

    def recording(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    with mock.patch.object(hybrid, "forward", side_effect=recording):
        out = hybrid.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, hybrid(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert torch.equal(out.sequences, seq)
    assert seen == [6, 1, 1, 1, 1]  # the prompt once, then one token per step: the cache is reused
    assert isinstance(cache, ZebraCache) and cache.max_len == 6 + 5 - 1 and cache.lengths.tolist() == [10, 10]
