"""zebra.rope against transformers' Llama rotary embedding, and MLA conversion of a scaled-RoPE teacher."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tests.conftest import tiny_llama
from zebra import ZebraForCausalLM
from zebra.config import ZebraConfig
from zebra.convert import full_rank_mla_config, hybrid_config
from zebra.init_mla import mla_from_llama_attention
from zebra.rope import inverse_frequencies, mla_frequencies, rope_parameters

HEAD_DIM, MAX_POS = 16, 256
# Parameters for every rope type transformers knows (each small enough to change the frequencies).
PARAMS = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {"short_factor": [1.0 + i / 10 for i in range(8)], "long_factor": [2.0 + i for i in range(8)],
                 "original_max_position_embeddings": 64},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "proportional": {"partial_rotary_factor": 0.5},
}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, **PARAMS["llama3"]}


def llama_config(rope_type: str) -> LlamaConfig:
    params = {"rope_type": rope_type, "rope_theta": 10000.0, **PARAMS[rope_type]}
    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
                       max_position_embeddings=MAX_POS, rope_parameters=params)


def test_every_rope_type_transformers_knows_is_covered():
    assert set(ROPE_INIT_FUNCTIONS) <= set(PARAMS)


@pytest.mark.parametrize("rope_type", sorted(PARAMS))
def test_frequencies_equal_llama_rotary_embedding(rope_type):
    config = llama_config(rope_type)
    rotary = LlamaRotaryEmbedding(config)
    inv_freq, scaling = inverse_frequencies(rope_parameters(config), HEAD_DIM, MAX_POS)
    print(f"{rope_type}: scaling {scaling}, inv_freq {inv_freq[:3].tolist()} ...")
    assert torch.equal(inv_freq, rotary.inv_freq) and scaling == rotary.attention_scaling
    if rope_type not in ("default", "dynamic"):  # dynamic equals default until a sequence outgrows max_position
        assert not torch.equal(inv_freq, inverse_frequencies(rope_parameters(llama_config("default")), HEAD_DIM,
                                                             MAX_POS)[0])


def test_unknown_rope_type_is_named():
    with pytest.raises(ValueError, match="'ntk_magic' is unknown.*llama3"):
        inverse_frequencies({"rope_type": "ntk_magic", "rope_theta": 1e4}, HEAD_DIM, MAX_POS)


def teacher_attention(model, x, positions):
    """Layer 0's LlamaAttention of `model` with its own (scaled) rotary embedding, causal."""
    t = x.shape[1]
    mask = torch.zeros(t, t, dtype=x.dtype).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    rotary = LlamaRotaryEmbedding(model.config)
    attn = model.model.layers[0].self_attn
    return attn(x, position_embeddings=rotary(x, positions), attention_mask=mask[None, None])[0]


def test_full_rank_mla_reproduces_llama3_scaled_teacher():
    """Positions past original_max_position_embeddings, where Llama-3 scaling changes the low frequencies."""
    teacher = tiny_llama(rope_parameters=dict(LLAMA3))
    config = full_rank_mla_config(teacher.config)
    assert config.teacher_rope_parameters["rope_type"] == "llama3"
    mla = mla_from_llama_attention(teacher.model.layers[0].self_attn, config, 0)
    x = torch.randn(2, 40, 64, dtype=torch.float64)
    pos = torch.arange(40).expand(2, 40)
    with torch.no_grad():
        want = teacher_attention(teacher, x, pos)
        err = ((mla(x, pos) - want).norm() / want.norm()).item()
        unscaled = ZebraConfig(**{**config.to_dict(), "teacher_rope_parameters": None})
        plain = mla_from_llama_attention(teacher.model.layers[0].self_attn, config, 0)
        plain.rope_inv_freq = tuple(mla_frequencies(unscaled)[0].tolist())  # what mla.py did before zebra.rope
        err_unscaled = ((plain(x, pos) - want).norm() / want.norm()).item()
    print(f"relative error vs the Llama-3-scaled teacher: {err:.2e}; with unscaled frequencies {err_unscaled:.2e}")
    assert err < 1e-6 and err_unscaled > 1e-3


def test_scaled_rope_survives_save_and_load(tmp_path):
    teacher = tiny_llama(rope_parameters=dict(LLAMA3))
    config = hybrid_config(teacher.config, [0, 1], kv_rank=8, qk_rope_dim=8)
    config.save_pretrained(tmp_path)
    reloaded = ZebraConfig.from_pretrained(tmp_path)
    assert reloaded.teacher_rope_parameters == config.teacher_rope_parameters
    assert torch.equal(mla_frequencies(reloaded)[0], inverse_frequencies(LLAMA3, HEAD_DIM, 512)[0])
    ZebraForCausalLM(config).save_pretrained(tmp_path / "model")
    model = ZebraForCausalLM.from_pretrained(tmp_path / "model")  # built on the meta device, then loaded
    assert model.model.layers[0].mixer.rope_inv_freq == tuple(inverse_frequencies(LLAMA3, HEAD_DIM, 512)[0].tolist())


def test_conversion_refuses_a_config_with_other_frequencies():
    teacher = tiny_llama(rope_parameters=dict(LLAMA3))
    config = full_rank_mla_config(teacher.config)
    config.teacher_rope_parameters = None  # default RoPE: not the teacher's
    with pytest.raises(ValueError, match="teacher_rope_parameters.*other frequencies"):
        mla_from_llama_attention(teacher.model.layers[0].self_attn, config, 0)
    config.teacher_rope_parameters = {**LLAMA3, "rope_theta": 500000.0}
    with pytest.raises(ValueError, match="rope_theta"):
        mla_frequencies(config)
