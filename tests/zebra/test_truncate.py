"""Rank truncation of MLA layers against plain float64 SVD references, on fresh random weights and inputs."""
import pytest
import torch

from zebra.config import ZebraConfig
from zebra.kv import kv_bytes_per_token
from zebra.modeling import ZebraForCausalLM
from zebra.truncate import truncate_mla, truncate_ranks

MLA_LAYERS = [0, 2]


def random_hybrid(kv_rank=12, q_rank=None, seed=0) -> ZebraForCausalLM:
    """3 layers (MLA, Mamba2, MLA), float64, every weight drawn fresh at a scale where errors show."""
    torch.manual_seed(seed)
    config = ZebraConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rope_theta=10000.0, kv_rank=kv_rank, q_rank=q_rank, qk_rope_dim=4,
        mixer_types=["mla" if i in MLA_LAYERS else "mamba" for i in range(3)],
    )
    model = ZebraForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def best_rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    """Eckart-Young: the closest rank-r matrix to w (Frobenius), from a fresh SVD."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("q_rank", [None, 20])
def test_same_ranks_reproduce_the_model(q_rank):
    model = random_hybrid(q_rank=q_rank)
    same = truncate_ranks(model, model.config.kv_rank, q_rank)
    x, pos = torch.randn(2, 11, 32, dtype=torch.float64), torch.arange(11).expand(2, 11)
    ids = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        for i in MLA_LAYERS:
            err = rel_err(same.model.layers[i].mixer(x, pos), model.model.layers[i].mixer(x, pos))
            print(f"q_rank={q_rank}, layer {i}: relative output error {err:.2e}")
            assert err < 1e-12
        # before the final norm: LlamaRMSNorm computes in float32, which would hide float64 differences
        ours, ref = (m.model(ids, output_hidden_states=True).hidden_states[-1] for m in (same, model))
        err = rel_err(ours, ref)
    print(f"q_rank={q_rank}: relative error of the last layer's output {err:.2e}")
    assert err < 1e-12


@pytest.mark.parametrize("q_from, q_to", [(None, None), (None, 10), (20, 10)])
def test_truncated_maps_are_the_best_rank_r_approximations(q_from, q_to):
    model, kv_to = random_hybrid(q_rank=q_from, seed=1), 5
    small = truncate_ranks(model, kv_to, q_to)
    for i in MLA_LAYERS:
        big, cut = model.model.layers[i].mixer, small.model.layers[i].mixer
        a, b = big.kv_a_proj.weight, big.kv_b_proj.weight
        latent_a = cut.kv_a_proj.weight[:kv_to]
        err = rel_err(cut.kv_b_proj.weight @ latent_a, best_rank_r(b @ a[:12], kv_to))
        print(f"layer {i}: kv map vs best rank-{kv_to} {err:.2e}")
        assert err < 1e-10
        assert torch.equal(cut.kv_a_proj.weight[kv_to:], a[12:])  # the RoPE key rows are kept
        assert torch.allclose(cut.kv_b_proj.weight.norm(dim=0), latent_a.norm(dim=1), rtol=1e-10)  # balanced
        assert torch.equal(cut.o_proj.weight, big.o_proj.weight)
        assert torch.equal(cut.rope_freq_idx, big.rope_freq_idx)
        q_big = big.q_proj.weight if q_from is None else big.q_b_proj.weight @ big.q_a_proj.weight
        if q_to is None:
            assert torch.equal(cut.q_proj.weight, big.q_proj.weight)
        else:
            err = rel_err(cut.q_b_proj.weight @ cut.q_a_proj.weight, best_rank_r(q_big, q_to))
            print(f"layer {i}: q map vs best rank-{q_to} {err:.2e}")
            assert err < 1e-10


def test_config_and_kv_bytes_follow_the_new_ranks():
    model = random_hybrid(q_rank=20, seed=2)
    small = truncate_ranks(model, 5, 10)
    assert (small.config.kv_rank, small.config.q_rank) == (5, 10)
    assert (model.config.kv_rank, model.config.q_rank) == (12, 20)  # the input is untouched
    assert small.config.mixer_types == model.config.mixer_types
    drop = kv_bytes_per_token(model.config) - kv_bytes_per_token(small.config)
    assert drop == len(MLA_LAYERS) * (12 - 5) * 2  # bf16 cache bytes per token
    assert small.model.layers[0].mixer.kv_a_proj.weight.shape == (5 + 4, 32)
    for name, p in small.named_parameters():
        if ".mixer." not in name or ".layers.1." in name:  # everything outside the MLA mixers is copied
            assert torch.equal(p, model.get_parameter(name)), name


@pytest.mark.parametrize("kv_rank, q_rank, field", [(13, 20, "kv_rank 13"), (5, 21, "q_rank 21"),
                                                    (5, None, "q_rank None")])
def test_growing_a_rank_is_refused(kv_rank, q_rank, field):
    model = random_hybrid(q_rank=20)
    config = ZebraConfig(**{**model.config.to_dict(), "kv_rank": kv_rank, "q_rank": q_rank})
    with pytest.raises(ValueError, match=field):
        truncate_mla(model.model.layers[0].mixer, config)
