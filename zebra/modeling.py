"""ZebraForCausalLM: a Llama whose attention layers are MLA or Mamba2 token mixers.

Embeddings, norms, MLPs and LM head are the teacher's (the Llama modules themselves, so converted
weights load unchanged). The decode cache is a `ZebraCache`: latent + RoPE key for MLA layers,
conv window + SSM state for Mamba2 layers.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from .cache import ZebraCache
from .config import ZebraConfig
from .mamba2 import Mamba2Mixer
from .mla import MLAttention

MIXERS = {"mla": MLAttention, "mamba": Mamba2Mixer}


class ZebraDecoderLayer(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ZebraConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.mixer_types[layer_idx]
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = MIXERS[self.layer_type](config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden_states, position_ids, cache=None, attention_mask=None):
        """[batch, seq, hidden] -> [batch, seq, hidden]."""
        mixed = self.mixer(self.input_layernorm(hidden_states), position_ids, cache, attention_mask)
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class ZebraPreTrainedModel(PreTrainedModel):
    config_class = ZebraConfig
    config: ZebraConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ZebraDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _is_stateful = True  # Mamba2 state cannot be rolled back: no assisted decoding

    @torch.no_grad()
    def _init_weights(self, module):
        # Mixers initialise their own SSM/RoPE parameters in __init__; only plain layers are drawn here.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, LlamaRMSNorm):
            module.weight.fill_(1.0)


class ZebraModel(ZebraPreTrainedModel):
    def __init__(self, config: ZebraConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(ZebraDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: ZebraCache | None = None,
        inputs_embeds=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = ZebraCache(self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, hidden.shape[:2], hidden.device)
        states = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, position_ids, past_key_values, attention_mask)
            if states is not None:
                states.append(hidden)
        if past_key_values is not None:
            past_key_values.advance(hidden.shape[1])
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=past_key_values,
            hidden_states=tuple(states) if states is not None else None,
        )


def positions_from_mask(attention_mask, past: int, shape, device) -> torch.Tensor:
    """Position ids [batch, seq]: counted over real tokens when a padding mask [batch, past+seq] is given."""
    batch, seq = shape
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device).expand(batch, seq)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -seq:]


class ZebraForCausalLM(ZebraPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZebraConfig):
        super().__init__(config)
        self.model = ZebraModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: prepare_inputs_for_generation builds a ZebraCache.
        return False

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: ZebraCache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        """Feed only the tokens the cache has not seen; build the ZebraCache on the first step."""
        if use_cache and past_key_values is None:
            past_key_values = ZebraCache(self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs = {"past_key_values": past_key_values, "attention_mask": attention_mask, "use_cache": use_cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:] if past else input_ids
        inputs["logits_to_keep"] = kwargs.get("logits_to_keep") or 1
        return inputs

    def _reorder_cache(self, past_key_values: ZebraCache, beam_idx):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
