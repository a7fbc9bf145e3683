"""The hybrid decode cache: per MLA layer the KV latent and the shared RoPE key (never decompressed
K/V), per Mamba2 layer the conv window and the SSM state."""
from __future__ import annotations

import torch


class ZebraCache:
    """Decode state of a ZebraForCausalLM.

    MLA layer i:   latent[i] [batch, seq, kv_rank], k_pe[i] [batch, seq, qk_rope_dim]   (grows per token)
    Mamba2 layer i: conv[i] [batch, conv_dim, d_conv], ssm[i] [batch, heads, head_dim, d_state]  (fixed size)
    """

    is_compileable = False

    def __init__(self, config):
        self.config = config
        self.latent: dict[int, torch.Tensor] = {}
        self.k_pe: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        self._seen_tokens = 0

    # -- MLA ---------------------------------------------------------------------------------
    def update_mla(self, layer_idx: int, latent: torch.Tensor, k_pe: torch.Tensor):
        """Append this step's [batch, new, *] latent and RoPE key; return the whole [batch, seq, *] history."""
        if layer_idx in self.latent:
            latent = torch.cat([self.latent[layer_idx], latent], dim=1)
            k_pe = torch.cat([self.k_pe[layer_idx], k_pe], dim=1)
        self.latent[layer_idx], self.k_pe[layer_idx] = latent, k_pe
        return latent, k_pe

    # -- Mamba2 ------------------------------------------------------------------------------
    def mamba_state(self, layer_idx: int):
        """(conv [batch, conv_dim, d_conv], ssm [batch, heads, head_dim, d_state]) or None before prefill."""
        if layer_idx not in self.ssm:
            return None
        return self.conv[layer_idx], self.ssm[layer_idx]

    def set_mamba_state(self, layer_idx: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.conv[layer_idx], self.ssm[layer_idx] = conv, ssm

    # -- bookkeeping used by the model and by generate() ---------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self._seen_tokens

    def advance(self, num_tokens: int) -> None:
        """Called once per model forward, after all layers ran, with the number of new tokens."""
        self._seen_tokens += num_tokens

    def tensors(self) -> list[torch.Tensor]:
        return [*self.latent.values(), *self.k_pe.values(), *self.conv.values(), *self.ssm.values()]

    def nbytes(self) -> int:
        """Bytes held by every cache tensor (what a KV-cache budget is charged)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for store in (self.latent, self.k_pe, self.conv, self.ssm):
            for k, t in store.items():
                store[k] = t.index_select(0, beam_idx.to(t.device))
