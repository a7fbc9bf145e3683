"""ZebraForCausalLM: a Llama whose attention layers are MLA or Mamba2 token mixers.

Embeddings, norms, MLPs and LM head are the teacher's (the Llama modules themselves, so converted
weights load unchanged; the norms are ZebraRMSNorm, a LlamaRMSNorm on kernels.norm's fused kernel). The decode cache is a static `ZebraCache` (zebra.cache): latent + RoPE key for
MLA layers, conv window + SSM state for Mamba2 layers, in buffers preallocated for max_len tokens.
`generate()` builds one sized for its max_length; a forward with use_cache and no cache builds one of
config.max_position_embeddings tokens. transformers >= 5.24 names the cache argument `cache`, earlier
versions `past_key_values`: forward and prepare_inputs_for_generation take either.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from kernels.norm import rms_norm

from .cache import ZebraCache, new_token_mask
from .config import ZebraConfig
from .mamba2 import Mamba2Mixer
from .mla import MLAttention

MIXERS = {"mla": MLAttention, "mamba": Mamba2Mixer}
# The cache's name in model outputs and generate()'s model kwargs: "cache" from transformers 5.24 on.
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ZebraRMSNorm(LlamaRMSNorm):
    """LlamaRMSNorm (same `weight` parameter, state dict and numerics) computed by kernels.norm.rms_norm: its fused
    Triton kernel on CUDA, LlamaRMSNorm's own formula elsewhere; backend as ZebraConfig.mamba_backend."""

    def __init__(self, hidden_size: int, eps: float, backend: str = "auto"):
        super().__init__(hidden_size, eps=eps)
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., hidden] in promote_types(hidden_states.dtype, weight.dtype)."""
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, self.backend)


class ZebraDecoderLayer(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ZebraConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.mixer_types[layer_idx]
        self.input_layernorm = ZebraRMSNorm(config.hidden_size, config.rms_norm_eps, config.mamba_backend)
        self.mixer = MIXERS[self.layer_type](config, layer_idx)
        self.post_attention_layernorm = ZebraRMSNorm(config.hidden_size, config.rms_norm_eps, config.mamba_backend)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden_states, position_ids, cache=None, attention_mask=None, return_mixer: bool = False):
        """[batch, seq, hidden] -> [batch, seq, hidden]; return_mixer: (that, the mixer's output [batch, seq,
        hidden]), what ILD compares with the teacher's attention output (no hook, so a compiled layer keeps it)."""
        mixed = self.mixer(self.input_layernorm(hidden_states), position_ids, cache, attention_mask)
        hidden_states = hidden_states + mixed
        out = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return (out, mixed) if return_mixer else out


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile every ZebraDecoderLayer inside model, in place (nn.Module.compile: parameter names and
    state dicts unchanged): regional compilation, one graph per kind of layer (MLA, Mamba2) and input
    signature, shared by all layers of that kind. An eager training step of this model is bound by the
    host's launches at a micro-batch of 8 x 2048 (GPU busy ~35% of a KD step on an H200): a compiled layer
    is one autograd node with fused elementwise kernels. The Triton kernels stay whole inside (custom ops:
    kernels._eager). A model with a compile_layers(backend) method of its own compiles itself instead (the ILD
    pair of jobs.stages.ild: each layer with its loss). The number of layers compiled."""
    if hasattr(model, "compile_layers"):
        return model.compile_layers(backend)
    layers = [m for m in model.modules() if isinstance(m, ZebraDecoderLayer)]
    # every compiled layer's entries hang on nn.Module._call_impl's one code object: kinds x train/eval x
    # shapes x return_mixer, over dynamo's default of 8 recompilations before it falls back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


class ZebraPreTrainedModel(PreTrainedModel):
    config_class = ZebraConfig
    config: ZebraConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ZebraDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
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
        self.norm = ZebraRMSNorm(config.hidden_size, config.rms_norm_eps, config.mamba_backend)
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
        cache: ZebraCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids [batch, new] (or inputs_embeds [batch, new, hidden]) -> last_hidden_state [batch, new, hidden].

        cache (or past_key_values): a ZebraCache with batch_size == batch; the new tokens of row r take
        positions cache.lengths[r] + arange(new), and cache.lengths grows by `new` afterwards.
        attention_mask: 0/1 left-padding mask, one column per token (per cache position with a cache).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        (batch, new), device = hidden.shape[:2], hidden.device
        if use_cache and cache is None:
            cache = ZebraCache(self.config, batch, self.config.max_position_embeddings, device, hidden.dtype)
        if cache is not None:
            cache.begin(new, batch)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, cache, new, batch, device)
        states = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, position_ids, cache, attention_mask)
            if states is not None:
                states.append(hidden)
        if cache is not None:
            cache.advance(new)
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, hidden_states=tuple(states) if states is not None else None, **{CACHE_KEY: cache}
        )


def positions_from_mask(attention_mask, cache: ZebraCache | None, new: int, batch: int, device) -> torch.Tensor:
    """Position ids [batch, new]: the cache positions (cache.lengths + arange(new)) or arange(new); with a padding
    mask [batch, width], counted over its real tokens instead."""
    if attention_mask is None:
        return cache.positions(new) if cache is not None else torch.arange(new, device=device).expand(batch, new)
    counted = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return new_token_mask(counted, cache, new)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32 or wider) as Hugging Face computes it: logits [batch, seq, vocab],
    labels [batch, seq] (= input_ids, -100 where ignored); position t is scored on labels[:, t + 1].

    The labels are shifted (the last position gets -100) rather than the logits sliced, so the [batch, seq, vocab]
    logits are never copied into a [batch, seq - 1, vocab] slice, forward or backward."""
    shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    logits = logits.flatten(0, 1)
    return nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                                       shifted.flatten(), ignore_index=-100)


class ZebraForCausalLM(ZebraPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZebraConfig):
        super().__init__(config)
        self.model = ZebraModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: _prepare_cache_for_generation builds a ZebraCache.
        return False

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        # HF compiles the decode step of a compileable cache on its own; on an H200 (torch 2.11, transformers
        # 5.17) that failed for this model, so generate() compiles only when a compile_config asks for it.
        # zebra.decode.Decoder is the fast path: its step is captured in CUDA graphs.
        if generation_config.compile_config is None:
            return False
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length) -> None:
        """generate()'s hook: a static ZebraCache for batch_size x beams rows and max_cache_length tokens,
        unless the caller passed one or use_cache is off."""
        if model_kwargs.get("cache", model_kwargs.get("past_key_values")) is not None or not generation_config.use_cache:
            return
        if generation_config.cache_implementation not in (None, "static"):
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r}: a Zebra model "
                             "always uses its static ZebraCache; pass None or 'static'")
        rows = batch_size * max(generation_config.num_beams, generation_config.num_return_sequences or 1)
        model_kwargs[CACHE_KEY] = ZebraCache(self.config, rows, max_cache_length, self.device, self.dtype)

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
        cache: ZebraCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """logits [batch, new or logits_to_keep, vocab]; see ZebraModel.forward for the cache and the mask."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_KEY: getattr(out, CACHE_KEY)}
        )

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, use_cache=True, cache=None,
        **kwargs,
    ):
        """Feed only the tokens the cache has not seen. An all-ones attention mask is dropped (positions then
        come from the cache); a padding mask is widened to max_len columns, so every step has one shape."""
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if attention_mask is not None and cache is not None:
            attention_mask = nn.functional.pad(attention_mask, (0, cache.max_len - attention_mask.shape[1]))
        inputs = {CACHE_KEY: cache, "attention_mask": attention_mask, "use_cache": use_cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:] if past else input_ids
        inputs["logits_to_keep"] = kwargs.get("logits_to_keep") or 1
        return inputs

    def _reorder_cache(self, past_key_values: ZebraCache, beam_idx):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
