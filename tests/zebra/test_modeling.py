"""The whole hybrid: exact conversion at full rank, cached decode == full forward, save/load,
generate(), and kv_bytes_per_token against the cache generate() builds."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import zebra
from tests.conftest import rel
from zebra.convert import convert, full_rank_mla_config, hybrid_config, layer_init_errors


def test_full_rank_mla_reproduces_teacher_logits(teacher64):
    ids = torch.randint(0, 256, (2, 24))
    student = convert(teacher64, full_rank_mla_config(teacher64.config))
    with torch.no_grad():
        err = rel(student(ids).logits, teacher64(ids).logits)
    print("full-rank logits rel err", err)
    assert err < 1e-6


def test_truncated_hybrid_init_errors_are_reported(teacher64):
    ids = torch.randint(0, 256, (2, 16))
    cfg = hybrid_config(teacher64.config, [0, 3], kv_rank=16, qk_rope_dim=8)
    errors = layer_init_errors(teacher64, convert(teacher64, cfg), ids)
    assert len(errors) == 4 and all(e > 0 for e in errors)
    full = layer_init_errors(teacher64, convert(teacher64, full_rank_mla_config(teacher64.config)), ids)
    assert max(full) < 1e-6 < min(errors)


@pytest.fixture
def hybrid(teacher64):
    cfg = hybrid_config(teacher64.config, [0, 3], kv_rank=24, qk_rope_dim=8, chunk_size=4)
    return convert(teacher64, cfg, calib_ids=torch.randint(0, 256, (2, 16)))


def test_cached_decode_equals_full_forward(hybrid):
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        full = hybrid(ids).logits
        cache = zebra.ZebraCache(hybrid.config, 2, 13, dtype=torch.float64)
        prefill = hybrid(ids[:, :5], past_key_values=cache, use_cache=True).logits
        steps = [hybrid(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(5, 13)]
    got = torch.cat([prefill, *steps], dim=1)
    print("decode vs full max diff", float((got - full).abs().max()))
    assert rel(got, full) < 1e-9


def test_save_and_reload_with_auto_class(hybrid, tmp_path):
    hybrid.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(loaded) is zebra.ZebraForCausalLM
    ids = torch.randint(0, 256, (2, 11))
    saved, back = hybrid.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    with torch.no_grad():  # same weights; BLAS may still round differently by memory alignment
        torch.testing.assert_close(loaded(ids).logits, hybrid(ids).logits, rtol=0, atol=1e-12)
    assert loaded.config.mixer_types == hybrid.config.mixer_types


def test_generate_greedy_matches_uncached_argmax_and_sampling_runs(hybrid):
    ids = torch.randint(3, 256, (2, 6))
    out = hybrid.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    seq = ids
    with torch.no_grad():
        for _ in range(7):
            nxt = hybrid(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    torch.manual_seed(0)
    sampled = hybrid.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=True,
                              top_p=0.9, temperature=0.8, pad_token_id=0, eos_token_id=None)
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :6], ids)


def test_left_padded_batch_generates_like_single_rows(hybrid):
    a, b = torch.randint(3, 256, (1, 7)), torch.randint(3, 256, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = (torch.arange(7) >= torch.tensor([[0], [3]])).long()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = hybrid.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(out[0, 7:], hybrid.generate(a, attention_mask=torch.ones_like(a), **kw)[0, 7:])
    assert torch.equal(out[1, 7:], hybrid.generate(b, attention_mask=torch.ones_like(b), **kw)[0, 4:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_token_matches_generated_cache(teacher64, dtype):
    cfg = hybrid_config(teacher64.config, [1, 2], kv_rank=24, qk_rope_dim=8)
    student = convert(teacher64, cfg).to(dtype)
    teacher = teacher64.to(dtype)
    ids = torch.randint(3, 256, (3, 9))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
              eos_token_id=None, return_dict_in_generate=True)
    for model, fixed in ((teacher, 0), (student, zebra.state_bytes_per_sequence(cfg, dtype))):
        cache = model.generate(ids, **kw).past_key_values
        tensors = cache.tensors() if isinstance(cache, zebra.ZebraCache) else [
            t for layer in cache.layers for t in (layer.keys, layer.values)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        seq = cache.get_seq_length()
        assert seq == 9 + 6 - 1 and (not isinstance(cache, zebra.ZebraCache) or cache.max_len == seq)
        per_token = (nbytes - 3 * fixed) / (3 * seq)
        print(type(model).__name__, nbytes, per_token)
        assert per_token == zebra.kv_bytes_per_token(model.config, dtype)


def test_causal_lm_loss_equals_sliced_logits_formula(hybrid):
    """Shifting the labels (no copy of the logits) gives the old loss, cross-entropy of logits[:, :-1] against
    labels[:, 1:], in float64 on random inputs with ignored (-100) labels, and in the model's forward."""
    logits, labels = torch.randn(3, 9, 17, dtype=torch.float64), torch.randint(0, 17, (3, 9))
    labels[0, 4], labels[2, 1:3] = -100, -100

    def old(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100)

    loss = zebra.modeling.causal_lm_loss(logits, labels)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, old(logits, labels), rtol=1e-12, atol=1e-12)
    ids = torch.randint(0, 256, (2, 11))
    out = hybrid(ids, labels=ids)
    torch.testing.assert_close(out.loss, old(out.logits, ids), rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_convert_on_the_gpu_equals_convert_on_the_cpu(teacher64):
    """The init stage converts on the driver's GPU: the same student (to float64 SVD round-off), living on
    the teacher's device. All layers MLA: a Mamba2 layer's conv weights come from the device's own RNG."""
    teacher = copy.deepcopy(teacher64).double()
    cfg = hybrid_config(teacher.config, list(range(teacher.config.num_hidden_layers)), kv_rank=16, qk_rope_dim=8)
    calib = torch.randint(0, 256, (2, 16))
    cpu = convert(teacher, cfg, calib_ids=calib)
    cpu_errors = layer_init_errors(teacher, cpu, calib)
    teacher = teacher.cuda()
    gpu = convert(teacher, cfg, calib_ids=calib.cuda())
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    ids = torch.randint(0, 256, (2, 12))
    want, got = cpu(ids).logits, gpu(ids.cuda()).logits.cpu()
    assert rel(got, want) < 1e-6
    assert layer_init_errors(teacher, gpu, calib.cuda()) == pytest.approx(cpu_errors, rel=1e-5)
