"""Compose a hybrid from a Llama teacher with no training: config, weight copy, per-layer init error."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import ZebraConfig
from .init_mamba import mamba_from_llama_attention
from .init_mla import mla_from_llama_attention
from .modeling import ZebraForCausalLM
from .rope import config_fields as rope_config_fields


def hybrid_config(teacher_config, mla_layers, kv_rank: int, qk_rope_dim: int, q_rank: int | None = None,
                  **overrides) -> ZebraConfig:
    """ZebraConfig with the teacher's shape and RoPE (scaled RoPE too: zebra.rope); layers in `mla_layers`
    are MLA, the rest Mamba2."""
    n = teacher_config.num_hidden_layers
    bad = [i for i in mla_layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"mla_layers {bad} out of range for a teacher with {n} layers")
    mla = set(mla_layers)
    fields = dict(
        vocab_size=teacher_config.vocab_size,
        hidden_size=teacher_config.hidden_size,
        intermediate_size=teacher_config.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=teacher_config.num_attention_heads,
        num_key_value_heads=teacher_config.num_key_value_heads,
        head_dim=getattr(teacher_config, "head_dim", None),
        hidden_act=teacher_config.hidden_act,
        max_position_embeddings=teacher_config.max_position_embeddings,
        rms_norm_eps=teacher_config.rms_norm_eps,
        mlp_bias=getattr(teacher_config, "mlp_bias", False),
        tie_word_embeddings=teacher_config.tie_word_embeddings,
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
        pad_token_id=teacher_config.pad_token_id,
        mixer_types=["mla" if i in mla else "mamba" for i in range(n)],
        kv_rank=kv_rank,
        q_rank=q_rank,
        qk_rope_dim=qk_rope_dim,
        **rope_config_fields(teacher_config),  # rope_theta, and the teacher's scaled RoPE if any
    )
    fields.update(overrides)
    return ZebraConfig(**fields)


def full_rank_mla_config(teacher_config, **overrides) -> ZebraConfig:
    """All layers MLA with no truncation and every RoPE dimension kept: reproduces the teacher."""
    kv, d = teacher_config.num_key_value_heads, teacher_config.hidden_size // teacher_config.num_attention_heads
    d = getattr(teacher_config, "head_dim", None) or d
    return hybrid_config(teacher_config, range(teacher_config.num_hidden_layers), kv_rank=2 * kv * d,
                         qk_rope_dim=kv * d, rope_freq_idx=list(range(d // 2)) * kv, **overrides)


class _LayerTap:
    """Forward hooks recording each teacher decoder layer's input and output, and each attention's input."""

    def __init__(self, layers):
        self.inputs, self.outputs, self.attn_inputs, self._hooks = {}, {}, {}, []
        for i, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_hook(self._record(i), with_kwargs=True))
            self._hooks.append(layer.self_attn.register_forward_pre_hook(self._record_attn(i), with_kwargs=True))

    def _record(self, i):
        def hook(module, args, kwargs, output):
            self.inputs[i] = args[0] if args else kwargs["hidden_states"]
            self.outputs[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def _record_attn(self, i):
        def hook(module, args, kwargs):
            self.attn_inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def close(self):
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def teacher_activations(teacher, input_ids: torch.Tensor):
    """Per layer: decoder-layer input, output, and attention input (normed), each [batch, seq, hidden]."""
    tap = _LayerTap(teacher.model.layers)
    try:
        teacher(input_ids=input_ids, use_cache=False)
    finally:
        tap.close()
    return tap.inputs, tap.outputs, tap.attn_inputs


@torch.no_grad()
def convert(teacher, config: ZebraConfig, calib_ids: torch.Tensor | None = None) -> ZebraForCausalLM:
    """Build the hybrid: teacher embeddings/norms/MLPs/head copied, each mixer initialised from its attention,
    on the teacher's device and in its dtype.

    calib_ids [batch, seq]: optional calibration tokens for activation-aware MLA initialisation.
    """
    ref = next(teacher.parameters())
    dtype = ref.dtype
    student = ZebraForCausalLM(config).to(device=ref.device, dtype=dtype)
    attn_in = teacher_activations(teacher, calib_ids)[2] if calib_ids is not None else {}
    student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    if not config.tie_word_embeddings:
        student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    layers = zip(teacher.model.layers, student.model.layers)
    for i, (t, s) in enumerate(tqdm(list(layers), desc="convert", leave=False)):
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            getattr(s, name).load_state_dict(getattr(t, name).state_dict())
        if config.mixer_types[i] == "mla":
            calib = attn_in[i].flatten(0, 1) if i in attn_in else None
            s.mixer = mla_from_llama_attention(t.self_attn, config, i, calib=calib)
        else:
            s.mixer = mamba_from_llama_attention(t.self_attn, config, i)
        s.mixer.to(dtype)
    student.tie_weights()
    return student.eval()


@torch.no_grad()
def layer_init_errors(teacher, student, input_ids: torch.Tensor) -> list[float]:
    """Per layer, ||d_s - d_t|| / ||d_t|| where d = layer output - layer input (the layer's contribution
    to the residual stream), both layers fed the teacher's input to that layer."""
    inputs, outputs, _ = teacher_activations(teacher, input_ids)
    batch, seq = input_ids.shape
    pos = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    errors = []
    for i, layer in enumerate(student.model.layers):
        x = inputs[i].to(next(layer.parameters()).dtype)
        d_t = (outputs[i] - inputs[i]).double()
        d_s = (layer(x, pos) - x).double()
        errors.append(float((d_s - d_t).norm() / d_t.norm()))
    return errors
