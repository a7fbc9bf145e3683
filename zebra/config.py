"""ZebraConfig: a Llama teacher's shape plus, per layer, which token mixer it uses (MLA or Mamba2)."""
from __future__ import annotations

from transformers import PretrainedConfig

LAYER_TYPES = ("mla", "mamba")


class ZebraConfig(PretrainedConfig):
    """Hybrid of MLA and Mamba2 layers; MLP, norms, embeddings and LM head are the teacher's.

    MLA (DeepSeek-V2 style, converted from GQA attention):
      kv_rank        width of the cached KV latent per token
      q_rank         low-rank query width (None: full-rank query projection)
      qk_rope_dim    width of the decoupled RoPE key, shared by all heads (cached per token)
      qk_nope_dim    per-head width of the non-rotary query/key part
      v_head_dim     per-head value width
      rope_freq_idx  per rotary pair of the RoPE key, which teacher frequency index it rotates at
                     (len = qk_rope_dim // 2); None means range(qk_rope_dim // 2)
      attn_scale     softmax scale; the teacher's head_dim ** -0.5 by default
    `mixer_types` (not `layer_types`: transformers validates that name against its own attention kinds)
    lists "mla" or "mamba" per layer.
    Mamba2 (SSD, MambaInLlama layout: C per head from W_q, B per group from W_k, x per group from W_v):
      mamba_heads, mamba_head_dim, d_state, mamba_groups (B and x groups), d_conv, chunk_size
    """

    model_type = "zebra"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 30,
        num_attention_heads: int = 9,
        num_key_value_heads: int = 3,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 100000.0,
        mlp_bias: bool = False,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        mixer_types: list[str] | None = None,
        # MLA
        kv_rank: int = 128,
        q_rank: int | None = None,
        qk_rope_dim: int = 32,
        qk_nope_dim: int | None = None,
        v_head_dim: int | None = None,
        rope_freq_idx: list[int] | None = None,
        attn_scale: float | None = None,
        mla_absorb: bool = True,
        # Mamba2
        mamba_heads: int | None = None,
        mamba_head_dim: int | None = None,
        d_state: int | None = None,
        mamba_groups: int | None = None,
        d_conv: int = 4,
        chunk_size: int = 64,
        mamba_backend: str = "auto",
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.mixer_types = list(mixer_types) if mixer_types is not None else ["mla"] * num_hidden_layers
        self.kv_rank = kv_rank
        self.q_rank = q_rank
        self.qk_rope_dim = qk_rope_dim
        self.qk_nope_dim = self.head_dim if qk_nope_dim is None else qk_nope_dim
        self.v_head_dim = v_head_dim or self.head_dim
        half = self.head_dim // 2
        self.rope_freq_idx = (list(rope_freq_idx) if rope_freq_idx is not None
                              else [p % half for p in range(qk_rope_dim // 2)])
        self.attn_scale = attn_scale if attn_scale is not None else self.head_dim**-0.5
        self.mla_absorb = mla_absorb
        self.mamba_heads = mamba_heads or num_attention_heads
        self.mamba_head_dim = mamba_head_dim or self.head_dim
        self.d_state = d_state or self.head_dim
        self.mamba_groups = mamba_groups or num_key_value_heads
        self.d_conv = d_conv
        self.chunk_size = chunk_size
        self.mamba_backend = mamba_backend
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when the shape is inconsistent."""
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries, num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.mixer_types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"mixer_types: unknown {bad}; allowed: {list(LAYER_TYPES)}")
        if self.qk_rope_dim % 2:
            raise ValueError(f"qk_rope_dim must be even, got {self.qk_rope_dim}")
        if len(self.rope_freq_idx) != self.qk_rope_dim // 2:
            raise ValueError(
                f"rope_freq_idx has {len(self.rope_freq_idx)} entries, expected qk_rope_dim // 2 = {self.qk_rope_dim // 2}"
            )
        if any(not 0 <= i < self.head_dim // 2 for i in self.rope_freq_idx):
            raise ValueError(f"rope_freq_idx entries must lie in [0, head_dim // 2 = {self.head_dim // 2})")
        if self.mamba_heads % self.mamba_groups:
            raise ValueError(f"mamba_heads ({self.mamba_heads}) must be a multiple of mamba_groups ({self.mamba_groups})")
        if self.mamba_backend not in ("auto", "torch", "cuda", "triton"):
            raise ValueError(f"mamba_backend must be 'auto', 'torch', 'cuda' or 'triton', got {self.mamba_backend!r}")

    @property
    def mla_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.mixer_types) if t == "mla"]

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.mixer_types) if t == "mamba"]
