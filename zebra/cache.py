"""The hybrid decode cache: preallocated, written in place, one row per sequence (gpt-fast style).

Per MLA layer the KV latent and the shared RoPE key (never decompressed K/V), per Mamba2 layer the
conv window and the SSM state, all in fixed buffers sized at construction:

    latent[i]  [batch, max_len, kv_rank]          k_pe[i] [batch, max_len, qk_rope_dim]    (MLA layer i)
    conv[i]    [batch, conv_dim, d_conv]          ssm[i]  [batch, heads, head_dim, d_state] (Mamba2 layer i;
                                                                                  ssm in float32 or wider)
    lengths    int64 [batch]   tokens held per row (rows may differ: continuous batching)

A model forward with a cache takes input [b, t] with b == batch: row r's new tokens sit at positions
lengths[r] + arange(t), an MLA layer attends to positions < lengths[r] plus the causal part of the new
tokens, and afterwards lengths[r] += t (at most max_len). A right-padded (varlen) forward sets `valid`
(int64 [b]: how many of the t new tokens of each row are real) before it runs: MLA writes all t positions
(the pads past a row's end are overwritten by its later tokens, and causal attention keeps real tokens from
seeing them), Mamba2 leaves its state untouched by the pads, and lengths[r] += valid[r]. Every row is
computed and updated: a row that holds no sequence simply collects state that reset_rows clears. Writes
past max_len never go out of bounds (they are dropped); a forward outside torch.compile / CUDA-graph capture
raises instead when a row would overflow.

The API the decoder and the serve engine build on:
    ZebraCache(config, batch_size, max_len, device=None, dtype=None)
    narrow(start, n) -> a view over rows start..start+n-1 sharing storage (lengths too)
    slot(i) = narrow(i, 1);  reset_rows(rows);  copy_row(src, dst);  nbytes();  lengths
nbytes() == batch * (max_len * zebra.kv.kv_bytes_per_token + zebra.kv.state_bytes_per_sequence).

The model calls begin(new, batch) before its layers and advance(new) after them. An eager forward reads
the lengths on the host once (overflow check; MLA reads only the positions in use); a traced one, or one
on a cache whose `static` is True (zebra.decode sets it for CUDA-graph capture), never does: it reads
the whole buffer, masked by lengths.
"""
from __future__ import annotations

import torch

from .kv import ssm_state_dtype


def _tracing() -> bool:
    """True under torch.compile or CUDA-graph capture, where a forward must not read tensors on the host."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def new_token_mask(padding_mask: torch.Tensor, cache: ZebraCache | None, new: int) -> torch.Tensor:
    """The entries [b, new] of a padding mask (or any per-position tensor) [b, width] for this forward's tokens:
    columns cache.positions(new) with a cache (one column per cache position), the last `new` without."""
    if cache is None:
        return padding_mask[:, -new:]
    return padding_mask.gather(1, cache.positions(new).clamp(max=padding_mask.shape[1] - 1))


class ZebraCache:
    """Static decode state of a ZebraForCausalLM (see the module docstring for the buffers)."""

    is_compileable = True

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype: torch.dtype | None = None):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"ZebraCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        dtype = dtype or torch.get_default_dtype()
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        conv_dim = config.mamba_groups * (config.mamba_head_dim + config.d_state) + config.mamba_heads * config.d_state
        zeros = lambda *shape, dt=dtype: torch.zeros(batch_size, *shape, device=device, dtype=dt)  # noqa: E731
        self.latent = {i: zeros(max_len, config.kv_rank) for i in config.mla_layers}
        self.k_pe = {i: zeros(max_len, config.qk_rope_dim) for i in config.mla_layers}
        self.conv = {i: zeros(conv_dim, config.d_conv) for i in config.mamba_layers}
        ssm_shape = (config.mamba_heads, config.mamba_head_dim, config.d_state)
        self.ssm = {i: zeros(*ssm_shape, dt=ssm_state_dtype(dtype)) for i in config.mamba_layers}
        self.lengths = zeros(dt=torch.int64)
        self.static = False  # True: forwards never read lengths on the host (set by zebra.decode for CUDA graphs)
        self._traced_defaults()
        if not _tracing():  # torch.compile's CUDA graphs keep static-address inputs in place (as HF's StaticCache)
            for t in self.tensors() + [self.lengths]:
                torch._dynamo.mark_static_address(t)

    def _traced_defaults(self) -> None:
        # read_len: cache positions an MLA layer reads this forward; fresh: no row holds a token.
        # A traced or static forward sees these defaults (whole buffer, not fresh); an eager one narrows them in begin().
        # valid: int64 [batch] real new tokens per row of a right-padded forward (set by its caller), None: all.
        self.read_len, self.fresh, self.valid = self.max_len, False, None

    # -- views and row management (the serve engine's API) ---------------------------------------
    def _map(self, fn) -> ZebraCache:
        """A new cache object whose tensors are fn(tensor) (views of this cache's)."""
        view = object.__new__(ZebraCache)
        view.config, view.max_len = self.config, self.max_len
        for name in ("latent", "k_pe", "conv", "ssm"):
            setattr(view, name, {i: fn(t) for i, t in getattr(self, name).items()})
        view.lengths = fn(self.lengths)
        view.batch_size, view.static = view.lengths.shape[0], False
        view._traced_defaults()
        return view

    def narrow(self, start: int, n: int) -> ZebraCache:
        """A cache over rows start..start+n-1 that shares this cache's storage (lengths included)."""
        if not (0 <= start and n >= 1 and start + n <= self.batch_size):
            raise ValueError(f"narrow(start={start}, n={n}) is outside the cache's {self.batch_size} rows")
        return self._map(lambda t: t.narrow(0, start, n))

    def slot(self, i: int) -> ZebraCache:
        """The one-row view of row i."""
        return self.narrow(i, 1)

    def reset_rows(self, rows) -> None:
        """Empty rows (ints or an index tensor): lengths 0 and zero Mamba2 state. Latents past lengths are never read."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device).reshape(-1)
        for t in [*self.conv.values(), *self.ssm.values(), self.lengths]:
            t.index_fill_(0, rows, 0)

    def copy_row(self, src: int, dst: int) -> None:
        """Row dst becomes a copy of row src (its tokens, state and length)."""
        for t in self.tensors() + [self.lengths]:
            t[dst].copy_(t[src])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows become rows beam_idx of the current cache (beam search), in place."""
        for t in self.tensors() + [self.lengths]:
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    # -- the forward's bookkeeping ----------------------------------------------------------------
    def begin(self, new: int, batch: int) -> None:
        """Called by the model before its layers run on `new` tokens of `batch` rows.

        Eagerly (not traced, not static) it reads the lengths once: it raises when a row would pass max_len
        and narrows the MLA read to the longest row (and marks a prefill of empty rows as fresh).
        """
        if batch != self.batch_size:
            raise ValueError(f"input batch {batch} != cache batch_size {self.batch_size}; pass cache.narrow(start, n)")
        if self.valid is not None and tuple(self.valid.shape) != (batch,):
            raise ValueError(f"cache.valid has shape {tuple(self.valid.shape)}; expected one count per row ({batch},)")
        if self.static or _tracing():
            return
        longest = int(self.lengths.max())
        if longest + new > self.max_len:
            raise ValueError(f"a cache row holding {longest} tokens cannot take {new} more: max_len is {self.max_len}; "
                             "build the ZebraCache with a larger max_len")
        self.read_len, self.fresh = longest + new, longest == 0

    def advance(self, new: int) -> None:
        """Called by the model after all layers ran: lengths += new, or += valid when set (at most max_len)."""
        added = new if self.valid is None else self.valid.clamp(max=new)
        self.lengths.copy_(torch.clamp(self.lengths + added, max=self.max_len))
        self._traced_defaults()

    def positions(self, new: int) -> torch.Tensor:
        """Cache positions [batch, new] of this forward's tokens: lengths[r] + arange(new)."""
        return self.lengths[:, None] + torch.arange(new, device=self.lengths.device)

    def _write(self, buf: torch.Tensor, values: torch.Tensor) -> None:
        """buf[r, lengths[r] + j] = values[r, j] where that position is < max_len; other writes are dropped."""
        pos = self.positions(values.shape[1])
        keep = (pos < self.max_len)[..., None]
        index = pos.clamp(max=self.max_len - 1)[..., None].expand_as(values)
        buf.scatter_(1, index, torch.where(keep, values.to(buf.dtype), buf.gather(1, index)))

    def update_mla(self, layer_idx: int, latent: torch.Tensor, k_pe: torch.Tensor):
        """Write this forward's latent [b, t, kv_rank] and RoPE key [b, t, rope] at each row's positions;
        return (latent, k_pe) to attend to: the new ones on a fresh prefill, else the buffers [b, read_len, *]."""
        self._write(self.latent[layer_idx], latent)
        self._write(self.k_pe[layer_idx], k_pe)
        if self.fresh:
            return latent, k_pe
        return self.latent[layer_idx][:, : self.read_len], self.k_pe[layer_idx][:, : self.read_len]

    def mla_mask(self, new: int, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """bool [b, 1, new, read_len]: key j is visible to new token i of row r iff j <= lengths[r] + i (and, with
        a 0/1 padding mask [b, >= read_len] over cache positions, not padding). A query seeing no key (a pad
        position) may see every key instead: a finite, unused value rather than NaN."""
        keys = torch.arange(self.read_len, device=self.lengths.device)
        allowed = keys[None, None, None, :] <= self.positions(new)[:, None, :, None]
        if padding_mask is None:
            return allowed
        if padding_mask.shape[-1] < self.read_len:
            raise ValueError(f"attention_mask has {padding_mask.shape[-1]} columns; expected one per cache position "
                             f"in use ({self.read_len}) or max_len ({self.max_len})")
        allowed = allowed & padding_mask[:, None, None, : self.read_len].to(torch.bool)
        return allowed | ~allowed.any(dim=-1, keepdim=True)

    def mamba_state(self, layer_idx: int):
        """(conv [b, conv_dim, d_conv], ssm [b, heads, P, N]): the buffers themselves (a step may update them in
        place); None on a fresh prefill, which starts from zeros."""
        return None if self.fresh else (self.conv[layer_idx], self.ssm[layer_idx])

    def set_mamba_state(self, layer_idx: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        """Store a layer's new conv window [b, conv_dim, d_conv] and SSM state [b, heads, P, N] in place."""
        self.conv[layer_idx].copy_(conv)
        self.ssm[layer_idx].copy_(ssm)

    # -- what generate() and budgets read ---------------------------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens held by the longest row (generate() feeds only the tokens past this)."""
        return int(self.lengths.max())

    def get_max_cache_shape(self, layer_idx: int | None = 0) -> int:
        return self.max_len

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: True for a Mamba2 layer (fixed-size state), False for MLA (generate() reads this)."""
        return [t == "mamba" for t in self.config.mixer_types]

    def tensors(self) -> list[torch.Tensor]:
        """The state buffers (latents, RoPE keys, conv windows, SSM states), not the row bookkeeping."""
        return [*self.latent.values(), *self.k_pe.values(), *self.conv.values(), *self.ssm.values()]

    def nbytes(self) -> int:
        """Bytes held by the state buffers (what a KV-cache budget is charged; equals zebra.kv's count)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())
