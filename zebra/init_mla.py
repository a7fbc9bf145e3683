"""Initialise an MLAttention from a Llama (GQA) attention layer by SVD.

Teacher: W_q [H*d, D], W_k and W_v [n_kv*d, D], W_o [D, H*d]; query head h reads kv head
g = h // (H / n_kv); HF RoPE pairs dim j with j + d/2 at frequency index j mod d/2.

RoPE part (partial RoPE, MHA2MLA "2-norm" criterion, arXiv 2502.14837). The shared RoPE key holds
P = qk_rope_dim / 2 pairs; each pair is a slot (g, i): kv head g's dims (i, i + d/2), rotating at
frequency i (the layer's rope_freq_idx buffer) of the teacher's RoPE, scaled RoPE included
(zebra.rope). A query head of group g gets the teacher's query
dims (i, i + d/2) in the slots of its own group and zeros in the other groups' slots, so the
q_pe . k_pe product reproduces exactly the teacher's rotated score of the kept pairs. We keep the
P slots with the largest sum_h ||q_h,(i,i+d/2)|| * ||k_g,(i,i+d/2)|| (norms of weight rows, or of
activations on calibration hidden states): those pairs carry most of the logits, and their
position dependence is what the latent cannot hold (it is cached before any rotation). Every
other pair moves, unrotated, into the nope part. With qk_rope_dim = n_kv * d every slot is kept
and RoPE is exact.

Latent part (joint SVD over K and V, as MHA2MLA's SVD_joint). Stack the unique kv heads'
[k_nope_g; v_g] (kept RoPE dims zeroed) into W_kv [n_kv*2d, D] and factor it at rank r = kv_rank,
W_kv ~ U_r S_r V_r^T. We split S evenly: kv_a = S_r^1/2 V_r^T, kv_b = U_r S_r^1/2 (rows repeated
for the query heads of each group). The balanced split keeps both factors at the same scale, so
neither dominates the gradients of later training nor the range of a bf16 cache. With
kv_rank >= rank(W_kv) the factorisation is exact.

With calibration hidden states X [N, D] (the layer's normed inputs) the SVD is activation-aware:
it factors W L, where L L^T = X^T X + damping I (Cholesky), and maps the right factor back by
L^-1. This minimises ||(W - W_r) X^T|| instead of ||W - W_r||, the error the layer actually makes
on such inputs. The damping (relative to the mean diagonal of X^T X) keeps L well conditioned
when calibration tokens are few or collinear. The query factorisation (q_rank) uses the same.

The math runs in float64; the result is cast to the teacher's dtype and device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import ZebraConfig
from .mla import MLAttention
from .rope import CONFIG_ATTR as ROPE_ATTR
from .rope import inverse_frequencies, mla_frequencies, rope_parameters

CALIB_DAMPING = 1e-2


def mla_from_llama_attention(
    attn, config: ZebraConfig, layer_idx: int, calib: torch.Tensor | None = None
) -> MLAttention:
    """MLAttention initialised from a transformers LlamaAttention `attn`.

    calib: optional hidden states [..., D] entering the layer (after its input norm); they steer
    both the RoPE slot choice and the SVDs. Raises ValueError naming a config field that does
    not fit the teacher.
    """
    _check_teacher(attn, config)
    slots = select_rope_slots(attn, config, config.qk_rope_dim // 2, calib)
    wq, wk, wv = _head_weights(attn)
    q_nope, k_nope, q_pe, k_pe = _split_rope(wq, wk, slots)
    whiten = None if calib is None else _whitening_factor(_calib_matrix(calib, wq))
    heads, d, d_model = wq.shape
    group, r = heads // wk.shape[0], config.kv_rank
    kv_b, latent_a = _low_rank(torch.cat([k_nope, wv], dim=1).reshape(-1, d_model), r, whiten)
    weights = {
        "kv_a_proj": torch.cat([latent_a, k_pe]),
        "kv_b_proj": kv_b.view(-1, 2 * d, r).repeat_interleave(group, dim=0).reshape(-1, r),
        "o_proj": attn.o_proj.weight.detach(),
    }
    w_q = torch.cat([q_nope, q_pe], dim=1).reshape(-1, d_model)
    if config.q_rank is None:
        weights["q_proj"] = w_q
    else:
        weights["q_b_proj"], weights["q_a_proj"] = _low_rank(w_q, config.q_rank, whiten)
    ref = attn.q_proj.weight
    mla = MLAttention(config, layer_idx).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name, w in weights.items():
            getattr(mla, name).weight.copy_(w)
        mla.rope_freq_idx.copy_(torch.tensor([i for _, i in slots], dtype=torch.long))
    return mla


def select_rope_slots(
    attn, config: ZebraConfig, num_pairs: int, calib: torch.Tensor | None = None
) -> list[tuple[int, int]]:
    """The num_pairs (kv group g, frequency index i) slots with the largest attention-logit
    contribution sum_{h in g} ||q_h,(i,i+d/2)|| * ||k_g,(i,i+d/2)||, sorted by (g, i).

    Norms are over the pair's weight rows, or over its activations on calib [..., D] when given.
    """
    _check_teacher(attn, config)
    wq, wk, _ = _head_weights(attn)
    if calib is not None:
        x = _calib_matrix(calib, wq)
        wq, wk = wq @ x.T, wk @ x.T  # activations [heads, d, N]
    n_kv, half = wk.shape[0], wk.shape[1] // 2
    score = _pair_norms(wq).view(n_kv, -1, half).sum(dim=1) * _pair_norms(wk)  # [n_kv, d/2]
    top = score.flatten().argsort(descending=True, stable=True)[:num_pairs]
    return sorted((int(f) // half, int(f) % half) for f in top)


def _check_teacher(attn, config: ZebraConfig) -> None:
    """Raise ValueError naming the field when config cannot hold an exact copy of attn's shape."""
    tc, d = attn.config, attn.head_dim
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if getattr(attn, name).bias is not None:
            raise ValueError(f"teacher {name} has a bias (attention_bias=True); MLA conversion needs a bias-free one")
    expected = {
        "hidden_size": tc.hidden_size,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": d,
        "qk_nope_dim": d,
        "v_head_dim": d,
        "rope_theta": rope_parameters(tc)["rope_theta"],
        "attn_scale": attn.scaling,
    }
    for field, want in expected.items():
        have = getattr(config, field)
        if not math.isclose(have, want, rel_tol=1e-9):
            raise ValueError(f"config.{field} = {have}, but the teacher attention needs {want}")
    want_freq, want_scaling = inverse_frequencies(rope_parameters(tc), d, tc.max_position_embeddings)
    have_freq, have_scaling = mla_frequencies(config)
    if not torch.equal(have_freq, want_freq) or have_scaling != want_scaling:
        raise ValueError(f"config.{ROPE_ATTR} = {getattr(config, ROPE_ATTR, None)} rotates at other frequencies than "
                         f"the teacher's RoPE {rope_parameters(tc)}; build the config with zebra.convert.hybrid_config")
    if config.qk_rope_dim > tc.num_key_value_heads * d:
        raise ValueError(
            f"config.qk_rope_dim = {config.qk_rope_dim} exceeds num_key_value_heads * head_dim = "
            f"{tc.num_key_value_heads * d}, the teacher's number of rotary (group, frequency) dims"
        )


def _head_weights(attn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 W_q [H, d, D], W_k [n_kv, d, D], W_v [n_kv, d, D]."""
    d = attn.head_dim
    return tuple(
        getattr(attn, name).weight.detach().double().view(-1, d, attn.config.hidden_size)
        for name in ("q_proj", "k_proj", "v_proj")
    )


def _calib_matrix(calib: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """calib [..., D] -> float64 [N, D] on like's device."""
    d_model = like.shape[-1]
    if calib.shape[-1] != d_model:
        raise ValueError(f"calib has last dim {calib.shape[-1]}; expected hidden_size = {d_model}")
    return calib.detach().reshape(-1, d_model).to(device=like.device, dtype=torch.float64)


def _pair_norms(t: torch.Tensor) -> torch.Tensor:
    """t [heads, d, K] -> [heads, d/2]: 2-norm of rows (i, i + d/2) of each head."""
    half = t.shape[1] // 2
    return (t[:, :half].square().sum(-1) + t[:, half:].square().sum(-1)).sqrt()


def _split_rope(wq: torch.Tensor, wk: torch.Tensor, slots: list[tuple[int, int]]):
    """Move the kept (group, frequency) pairs out of the teacher's query/key heads.

    wq [H, d, D], wk [n_kv, d, D] -> q_nope [H, d, D], k_nope [n_kv, d, D] (kept dims zeroed),
    q_pe [H, 2P, D] (zero in other groups' slots), k_pe [2P, D]; RoPE rows in rotate_half layout
    (pair p: rows p and p + P).
    """
    (n_kv, d, _), heads = wk.shape, wq.shape[0]
    g = torch.tensor([s[0] for s in slots], dtype=torch.long, device=wq.device)
    i = torch.tensor([s[1] for s in slots], dtype=torch.long, device=wq.device)
    groups, dims = torch.cat([g, g]), torch.cat([i, i + d // 2])
    own = torch.arange(heads, device=wq.device)[:, None] // (heads // n_kv) == groups[None]  # [H, 2P]
    keep = torch.ones(n_kv, d, dtype=torch.bool, device=wq.device)
    keep[groups, dims] = False
    q_nope = wq * keep.repeat_interleave(heads // n_kv, dim=0)[..., None]
    return q_nope, wk * keep[..., None], wq[:, dims] * own[..., None], wk[groups, dims]


def _whitening_factor(x: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor L [D, D] of x^T x + damping * I for x [N, D]."""
    gram = x.T @ x
    damping = CALIB_DAMPING * gram.diagonal().mean()
    return torch.linalg.cholesky(gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def _low_rank(w: torch.Tensor, rank: int, whiten: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [m, D] ~ b @ a with b [m, rank] = U S^1/2, a [rank, D] = S^1/2 V^T (of w, or of w L then a L^-1).

    Components past the rank of w are zero columns/rows, so any rank >= rank(w) is exact.
    """
    u, s, vh = torch.linalg.svd(w if whiten is None else w @ whiten, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b, a = u[:, :k] * root, root[:, None] * vh[:k]
    if whiten is not None:
        a = torch.linalg.solve_triangular(whiten, a, upper=False, left=False)
    return F.pad(b, (0, rank - k)), F.pad(a, (0, 0, 0, rank - k))
