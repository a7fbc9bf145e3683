"""Multi-head latent attention (DeepSeek-V2 style, no biases), with a naive and an absorbed path.

Per token the layer caches a latent c = W_kv_a x  [kv_rank] and one RoPE key k_pe [qk_rope_dim]
shared by all heads. Head h sees
    k_h = [W_kb_h c ; k_pe]        v_h = W_vb_h c        (W_kb_h, W_vb_h: rows of kv_b_proj)
    q_h = [q_nope_h ; q_pe_h]      score = scale * (q_nope_h . W_kb_h c + q_pe_h . k_pe)
The naive path decompresses k_h, v_h for every cached token and calls SDPA (prefill, training).
The absorbed path folds W_kb_h into the query and W_vb_h into the output, so attention runs in
latent space against the cache as stored (decode). A one-token step over a ZebraCache goes through
kernels.decode.mla_decode (the Triton kernel on CUDA, its reference elsewhere).

There are no norms on the latents (DeepSeek has q_a/kv_a RMSNorms): a norm between the factors
would stop an SVD factorisation of the teacher's projections from being exact (zebra.init_mla).

RoPE: HF rotate_half layout over the qk_rope_dim dims (dim p pairs with p + qk_rope_dim/2); pair p
rotates at the teacher's frequency index rope_freq_idx[p], i.e. at inv_freq[rope_freq_idx[p]] of
zebra.rope.mla_frequencies: the teacher's frequencies, scaled as its rope type says (llama3, yarn, ...).
rope_freq_idx is a persistent per-layer buffer, initialised from ZebraConfig.rope_freq_idx and
overwritten by the conversion, because each layer keeps its own frequencies.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kernels import mla_rope
from kernels.decode import mla_decode
from kernels.dispatch import use_kernel

from .cache import ZebraCache, new_token_mask
from .config import ZebraConfig
from .rope import mla_frequencies

log = logging.getLogger(__name__)

def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """cos, sin [batch, seq, 2 * P] in float32 for position_ids [batch, seq] and inv_freq [P] float32;
    scaling (the rope type's attention scaling) multiplies both.

    The arithmetic repeats HF's Llama RoPE step by step, so a kept frequency matches the
    teacher's bit for bit.
    """
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., 2P] (rotate_half layout: dim p pairs with p + P); cos, sin broadcast to x."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_mask(new: int, total: int, device: torch.device) -> torch.Tensor:
    """bool [new, total]: query i (the i-th of the newest `new` tokens) may see key j iff j <= total - new + i."""
    rows = torch.arange(new, device=device)[:, None] + (total - new)
    return torch.arange(total, device=device)[None, :] <= rows


def attention_mask_4d(padding_mask: torch.Tensor | None, new: int, total: int, device) -> torch.Tensor | None:
    """bool [batch or 1, 1, new, total] (True: may attend) from a 0/1 padding mask [batch, total].

    None when the mask is plain causal over a fresh sequence (SDPA's is_causal covers it).
    A query row with no visible key (a left-pad position) is allowed every key instead, so it
    yields a finite, unused value rather than NaN; real tokens never see padded keys.
    """
    if padding_mask is None and new == total:
        return None
    allowed = causal_mask(new, total, device)[None, None]
    if padding_mask is not None:
        if padding_mask.shape[-1] != total:
            raise ValueError(
                f"attention_mask has {padding_mask.shape[-1]} columns; expected cached + new tokens = {total}"
            )
        allowed = allowed & padding_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def latent_attention(q_latent, q_pe, latent, k_pe, mask, scale: float) -> torch.Tensor:
    """Softmax attention in latent space. q_latent [b, h, t, r], q_pe [b, h, t, dr], latent [b, s, r],
    k_pe [b, s, dr], mask bool [b|1, 1, t, s] (True: may attend) -> [b, h, t, r] in latent's dtype."""
    scores = torch.einsum("bhtr,bsr->bhts", q_latent, latent) + torch.einsum("bhtp,bsp->bhts", q_pe, k_pe)
    scores = (scores * scale).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return torch.einsum("bhts,bsr->bhtr", probs.to(latent.dtype), latent)


class MLAttention(nn.Module):
    """MLA token mixer of one ZebraForCausalLM layer. Linear weights are [out, in], no biases."""

    def __init__(self, config: ZebraConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_rank, self.q_rank = config.kv_rank, config.q_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_dim, config.qk_rope_dim, config.v_head_dim
        self.scale = config.attn_scale
        self.absorb = config.mla_absorb
        # kernels.mla_rope on the training path: "cuda" (mamba_ssm's kernels for Mamba2) means the Triton one here
        self.backend = "auto" if config.mamba_backend == "cuda" else config.mamba_backend
        inv_freq, self.rope_scaling = mla_frequencies(config)
        # A constant, not a buffer: from_pretrained leaves non-persistent buffers uninitialised.
        self.rope_inv_freq = tuple(inv_freq.tolist())
        self._inv_freq_memo: tuple = (None, None)  # ((device, rope_inv_freq), that tensor on the device)
        d_model, heads = config.hidden_size, config.num_attention_heads
        q_out = heads * (self.nope_dim + self.rope_dim)
        if config.q_rank is None:
            self.q_proj = nn.Linear(d_model, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, config.q_rank, bias=False)
            self.q_b_proj = nn.Linear(config.q_rank, q_out, bias=False)
        self.kv_a_proj = nn.Linear(d_model, self.kv_rank + self.rope_dim, bias=False)
        self.kv_b_proj = nn.Linear(self.kv_rank, heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, d_model, bias=False)
        self.register_buffer("rope_freq_idx", torch.tensor(config.rope_freq_idx, dtype=torch.long))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        cache: ZebraCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [batch, new, d_model], position_ids [batch, new] (long) -> [batch, new, d_model].

        cache: writes this call's latent and RoPE key at each row's positions (cache.lengths + arange(new))
        and attends to the row's history plus the causal part of the new tokens. attention_mask: 0/1 padding
        mask (left padding), [batch, new] without a cache, one column per cache position with one; or None.
        """
        q = self._q_proj(hidden_states)
        latent, k_pe = self.kv_a_proj(hidden_states).split([self.kv_rank, self.rope_dim], dim=-1)
        inv_freq = self._inv_freq_on(position_ids.device)
        cos, sin = rope_cos_sin(position_ids, inv_freq[self.rope_freq_idx], self.rope_scaling)
        if cache is None and attention_mask is None and self._fused_inputs(q, k_pe):
            return self.o_proj(self._fused_attention(q, latent, k_pe, cos, sin))
        q_nope, q_pe = self._split_heads(q, hidden_states.shape[:2])
        cos, sin = cos.to(hidden_states.dtype), sin.to(hidden_states.dtype)
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None])
        k_pe = apply_rope(k_pe, cos, sin)
        new = hidden_states.shape[1]
        if cache is None or cache.fresh:  # no history: attend to the new tokens themselves
            padding = None if attention_mask is None else new_token_mask(attention_mask, cache, new)
            mask = attention_mask_4d(padding, new, new, hidden_states.device)
        elif self.absorb and new == 1 and attention_mask is None:  # a decode step: the kernel masks by length
            mask, lengths = None, (cache.lengths + 1).clamp(max=cache.read_len)
        else:
            mask = cache.mla_mask(new, attention_mask)
        if cache is not None:
            latent, k_pe = cache.update_mla(self.layer_idx, latent, k_pe)
        if mask is None and cache is not None and not cache.fresh:
            return self.o_proj(self.absorbed_attention(q_nope, q_pe, latent, k_pe, None, decode_lengths=lengths))
        attend = self.absorbed_attention if self._use_absorbed(new, latent.shape[1]) else self.naive_attention
        return self.o_proj(attend(q_nope, q_pe, latent, k_pe, mask))

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """rope_inv_freq as float32 [head_dim // 2] on `device`, copied there once per device and value:
        a CUDA graph cannot record a host-to-device copy, and a decode step should not pay one per layer."""
        key = (device, self.rope_inv_freq)
        if self._inv_freq_memo[0] == key:
            return self._inv_freq_memo[1]
        inv_freq = torch.tensor(self.rope_inv_freq, dtype=torch.float32, device=device)
        # not while torch.compile traces: the write would change the memo that the graph's guards read, and
        # every layer of this kind would compile a second graph at its next call
        if not torch.compiler.is_compiling():
            self._inv_freq_memo = (key, inv_freq)
        return inv_freq

    def _use_absorbed(self, new: int, total: int) -> bool:
        # Absorbed attention costs ~new*total*(2 kv_rank + rope) per head; the naive path pays
        # ~total*kv_rank*(nope + v) to decompress the history. So absorb only when a cache holds
        # history and the step is short (decode), never on a fresh prefill.
        return self.absorb and total > new and new <= self.kv_rank

    def _q_proj(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, new, d_model] -> the query projection [batch, new, heads * (nope + rope)]."""
        return self.q_proj(x) if self.q_rank is None else self.q_b_proj(self.q_a_proj(x))

    def _split_heads(self, q: torch.Tensor, batch_new) -> tuple[torch.Tensor, torch.Tensor]:
        """The query projection [batch, new, heads * (nope + rope)] -> q_nope [batch, heads, new, nope], q_pe
        [batch, heads, new, rope] (unrotated views); batch_new: (batch, new)."""
        q = q.view(*batch_new, self.num_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        return q.split([self.nope_dim, self.rope_dim], dim=-1)

    def _fused_inputs(self, q: torch.Tensor, k_pe: torch.Tensor) -> bool:
        """Whether a fresh causal pass (training, a prefill without cache) takes kernels.mla_rope's kernel: RoPE and
        the assembly of Q, K and V in one pass each way (the dispatch point; logged once). Never under
        torch.compile, which fuses the PyTorch path's ops itself (and would trace into the autograd Function)."""
        if torch.compiler.is_compiling():
            return False
        reason = "backend='torch'" if self.backend == "torch" else mla_rope.unsupported(q, k_pe, self.backend)
        return use_kernel(log, "mla_qkv", "kernels.mla_rope.mla_qkv_triton", reason, self.backend)

    def _fused_attention(self, q, latent, k_pe, cos, sin) -> torch.Tensor:
        """naive_attention's result for a fresh causal pass, its inputs built by kernels.mla_rope: q the query
        projection [b, t, heads * (nope + rope)] (unrotated), latent [b, t, kv_rank], k_pe [b, t, rope] (unrotated),
        cos, sin [b, t, rope] float32 -> [b, t, heads * v]."""
        (b, t), heads = q.shape[:2], self.num_heads
        big_q, big_k, big_v = mla_rope.mla_qkv_triton(q, self.kv_b_proj(latent), k_pe, cos, sin, heads,
                                                     self.nope_dim, self.v_dim)
        out = F.scaled_dot_product_attention(big_q, big_k, big_v, is_causal=True, scale=self.scale)
        return out.transpose(1, 2).reshape(b, t, heads * self.v_dim)

    def naive_attention(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """Decompress K/V from the latent and run SDPA.

        q_nope [b, h, t, nope], q_pe [b, h, t, rope] (rotated), latent [b, s, kv_rank],
        k_pe [b, s, rope] (rotated), mask bool [b|1, 1, t, s] or None (causal, s == t) -> [b, t, h * v].
        """
        (b, s), heads, t = latent.shape[:2], self.num_heads, q_nope.shape[2]
        kv = self.kv_b_proj(latent).view(b, s, heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(b, heads, s, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return out.transpose(1, 2).reshape(b, t, heads * self.v_dim)

    def absorbed_attention(self, q_nope, q_pe, latent, k_pe, mask, decode_lengths=None) -> torch.Tensor:
        """Attention in latent space: same arguments and result as naive_attention, K/V never formed.

        decode_lengths int [b]: one query per row (t == 1) over a cache whose row r holds decode_lengths[r]
        valid positions; the step then runs through kernels.decode.mla_decode and mask is unused.
        """
        (b, s), t = latent.shape[:2], q_nope.shape[2]
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        if decode_lengths is not None:
            out_lat = mla_decode(q_lat[:, :, 0], q_pe[:, :, 0], latent, k_pe, decode_lengths, self.scale)[:, :, None]
        else:
            mask = causal_mask(t, s, latent.device) if mask is None else mask
            out_lat = latent_attention(q_lat, q_pe, latent, k_pe, mask, self.scale)
        return torch.einsum("bhtr,hvr->bthv", out_lat, w_uv).reshape(b, t, self.num_heads * self.v_dim)
