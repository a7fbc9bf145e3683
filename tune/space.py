"""The search space of `zebra tune`: every choice ("arm") of the tune section's candidates, its KV
cache, which arms the KV budget allows, the shared students they need, and a trial's memory.

    space = search_space(spec, teacher_config)     # SpecError before any work when no arm fits
    space.arms, space.rejected                     # allowed / over tune.kv_budget
    shared_students(space.arms)                    # per qk_rope_dim: the student shape to train once
    check_memory(spec, teacher_config, space.arms) # SpecError when a trial cannot fit tune.memory_budget_gb

KV sizes come from zebra.kv (bf16 cache bytes per token), the definition every report uses.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import torch

from jobs.spec import JobSpec, SpecError
from zebra.config import ZebraConfig
from zebra.convert import hybrid_config
from zebra.kv import kv_bytes_per_token, kv_fraction
from zebra.mamba2 import Mamba2Mixer
from zebra.mla import MLAttention
from zebra.modeling import ZebraForCausalLM

FP32 = 4  # bytes: 4 x FP32 per parameter covers the recipe's states (float32 weights, gradients, AdamW
# moments; or under DeepSpeed bf16 on GPU: bf16 weights and gradients, float32 master weights and moments)
LOGIT_COPIES = 8  # float32-sized copies of a micro-batch's tokens x vocab alive at a step's peak (4 was 1.3 GiB short)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One choice of the search: MLA layer count and ranks, with the KV cache it implies."""

    num_mla: int
    kv_rank: int
    q_rank: int | None  # None: full-rank query
    qk_rope_dim: int
    kv_bytes_per_token: int
    kv_fraction: float  # of the teacher's KV bytes per token

    @property
    def key(self) -> str:
        """A readable unique name, the value Ray Tune searches over: e.g. "mla3-kv128-qfull-rope32"."""
        return f"mla{self.num_mla}-kv{self.kv_rank}-q{self.q_rank or 'full'}-rope{self.qk_rope_dim}"

    def fields(self) -> dict:
        return {**dataclasses.asdict(self), "key": self.key}


@dataclasses.dataclass(frozen=True)
class Space:
    arms: list[Arm]  # within the budget, sorted by KV then key
    rejected: list[Arm]  # over tune.kv_budget: never launched
    budget_bytes: float | None  # per token; None: no KV limit
    teacher_kv_bytes: int


def search_space(spec: JobSpec, teacher_config) -> Space:
    """Every arm of spec.tune, split by tune.kv_budget. Raises SpecError naming tune.qk_rope_dim when a
    candidate does not fit the teacher, and tune.kv_budget (with the smallest KV the space allows)
    when no arm fits."""
    tune = spec.tune
    _check_rope(spec, teacher_config)
    base = hybrid_config(teacher_config, [], 1, 2)
    teacher_bytes = kv_bytes_per_token(teacher_config)
    arms = [_arm(base, teacher_config, *choice)
            for choice in itertools.product(tune.num_mla_layers, tune.kv_rank, tune.q_rank, tune.qk_rope_dim)]
    arms.sort(key=lambda a: (a.kv_bytes_per_token, a.key))
    if tune.kv_budget is None:
        return Space(arms, [], None, teacher_bytes)
    budget = tune.kv_budget * teacher_bytes if tune.kv_budget <= 1 else tune.kv_budget
    space = Space([a for a in arms if a.kv_bytes_per_token <= budget],
                  [a for a in arms if a.kv_bytes_per_token > budget], budget, teacher_bytes)
    if not space.arms:
        low = arms[0]
        raise SpecError(
            f"{_where(spec)}tune.kv_budget: {tune.kv_budget} = {budget:.6g} bytes/token fits none of the "
            f"{len(arms)} configurations; the smallest KV the search space allows is {low.kv_bytes_per_token} "
            f"bytes/token ({low.kv_fraction:.2%} of the teacher's {teacher_bytes}), by {low.key}: raise "
            "tune.kv_budget or add smaller tune.num_mla_layers / kv_rank / qk_rope_dim candidates")
    return space


def _arm(base: ZebraConfig, teacher_config, num_mla: int, kv_rank: int, q_rank: int | None, rope: int) -> Arm:
    config = arm_config(base, num_mla, kv_rank, q_rank, rope)
    return Arm(num_mla, kv_rank, q_rank, rope, kv_bytes_per_token(config), kv_fraction(config, teacher_config))


def arm_config(base: ZebraConfig, num_mla: int, kv_rank: int, q_rank: int | None, rope: int) -> ZebraConfig:
    """base (a hybrid_config of the teacher) with the first num_mla layers MLA at these ranks (which
    layers are MLA changes neither the KV size nor the parameter count)."""
    n = base.num_hidden_layers
    return ZebraConfig(**{**base.to_dict(), "mixer_types": ["mla"] * num_mla + ["mamba"] * (n - num_mla),
                          "kv_rank": kv_rank, "q_rank": q_rank, "qk_rope_dim": rope, "rope_freq_idx": None})


def _check_rope(spec: JobSpec, teacher_config) -> None:
    c = teacher_config
    most = c.num_key_value_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    over = [d for d in spec.tune.qk_rope_dim if d > most]
    if over:
        raise SpecError(f"{_where(spec)}tune.qk_rope_dim: {over} exceed the teacher's num_key_value_heads x "
                        f"head_dim = {most} rotary dimensions")


def _where(spec: JobSpec) -> str:
    return f"job spec {spec.source}: " if spec.source else "job spec: "


@dataclasses.dataclass(frozen=True)
class SharedShape:
    """The pure students trained once for all arms of one qk_rope_dim: the largest ranks they need
    (arms truncate them), and the fewest MLA layers (the sub-run's SMART choice, unused by trials)."""

    qk_rope_dim: int
    kv_rank: int
    q_rank: int | None
    num_mla: int


def shared_students(arms: list[Arm]) -> list[SharedShape]:
    """One SharedShape per qk_rope_dim among arms; a full-rank query (None) outranks any q_rank."""
    out = []
    for rope in sorted({a.qk_rope_dim for a in arms}):
        group = [a for a in arms if a.qk_rope_dim == rope]
        q_ranks = [a.q_rank for a in group]
        out.append(SharedShape(rope, max(a.kv_rank for a in group), None if None in q_ranks else max(q_ranks),
                               min(a.num_mla for a in group)))
    return out


# ---- memory --------------------------------------------------------------------------------------

def trial_memory_bytes(spec: JobSpec, teacher_config, arms: list[Arm]) -> dict[str, int]:
    """Per arm key, a rough upper estimate of one trial's peak memory while it trains, in bytes.

    The hybrid's training states (4 x FP32 bytes per parameter, see FP32), the teacher's weights,
    the logits of a micro-batch (the teacher's logits, their float32 copy and log-softmax; the
    student's logits, float32 copy and log-softmax; the KL terms; the gradients: LOGIT_COPIES
    float32 copies of tokens x vocab) and the activations kept for backward (about 16 x hidden +
    4 x intermediate values per token and layer). The held-out teacher logits stay in host memory
    (jobs.train's held-out evaluation). Composing the hybrid
    briefly holds the two pure students and the hybrid instead, less than the training states.
    Measured on an H100 (notes/GPU.md, SmolLM2, 4 x 512 tokens): peak 9.00 GiB allocated, estimate 9.18.
    """
    from transformers import AutoModelForCausalLM

    c, tokens = teacher_config, spec.tune.micro_batch * spec.tune.seq_len
    base = hybrid_config(c, [], 1, 2)
    logits = LOGIT_COPIES * tokens * c.vocab_size
    activations = tokens * c.num_hidden_layers * (16 * c.hidden_size + 4 * c.intermediate_size)
    fixed = _count(functools.partial(AutoModelForCausalLM.from_config, c)) + logits + activations
    all_mamba = _count(functools.partial(ZebraForCausalLM, base))
    mamba = _count(functools.partial(Mamba2Mixer, base, 0))
    out = {}
    for a in arms:
        mla = _count(functools.partial(MLAttention, arm_config(base, 1, a.kv_rank, a.q_rank, a.qk_rope_dim), 0))
        out[a.key] = FP32 * (fixed + 4 * (all_mamba + a.num_mla * (mla - mamba)))
    return out


def check_memory(spec: JobSpec, teacher_config, arms: list[Arm]) -> int:
    """The largest trial_memory_bytes over arms; SpecError naming tune.memory_budget_gb when it exceeds it."""
    need = max(trial_memory_bytes(spec, teacher_config, arms).values())
    budget = spec.tune.memory_budget_gb
    if budget is not None and need > budget * 2**30:
        raise SpecError(f"{_where(spec)}tune.memory_budget_gb: {budget} GiB is below the estimated "
                        f"{need / 2**30:.2f} GiB a trial needs (float32 weights, AdamW states, teacher, "
                        "activations); raise it or lower tune.micro_batch / tune.seq_len")
    return need


def _count(build) -> int:
    """Parameters of the module build() makes, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())
