"""The search space of `zebra tune` against plain arithmetic: KV bytes per arm, the budget split,
the shared students per rope candidate, the memory estimate's parameter counts (no Ray, no training)."""
import itertools

import pytest
import torch
from transformers import LlamaForCausalLM

from jobs.spec import SpecError, load_spec
from tests.conftest import tiny_llama_config
from tune.space import search_space, shared_students, trial_memory_bytes
from zebra.convert import hybrid_config
from zebra.modeling import ZebraForCausalLM

TEACHER = tiny_llama_config()  # 4 layers, 2 KV heads of 16: 4 * 2 * 2 * 16 = 256 values, 512 bytes per token
GRID = {"num_mla_layers": [1, 2, 4], "kv_rank": [8, 16, 32], "q_rank": [None, 24], "qk_rope_dim": [4, 8]}


def spec(**tune):
    return load_spec({"tune": {**GRID, **tune}})


@pytest.mark.parametrize("budget", [0.25, 200, None])
def test_arms_split_by_the_budget(budget):
    space = search_space(spec(kv_budget=budget), TEACHER)
    limit = {0.25: 128, 200: 200, None: float("inf")}[budget]
    every = list(itertools.product(*GRID.values()))
    size = {(a.num_mla, a.kv_rank, a.q_rank, a.qk_rope_dim): a for a in space.arms + space.rejected}
    assert len(size) == len(every) == len(space.arms) + len(space.rejected)
    for n, kv, q, rope in every:
        arm = size[(n, kv, q, rope)]
        assert arm.kv_bytes_per_token == n * (kv + rope) * 2 and arm.kv_fraction == n * (kv + rope) / 256
        assert (arm in space.arms) == (arm.kv_bytes_per_token <= limit)
    assert len({a.key for a in space.arms}) == len(space.arms)


def test_no_arm_within_budget_names_the_smallest():
    with pytest.raises(SpecError, match=r"tune.kv_budget: .* the smallest KV the search space allows is 24 "
                                        r"bytes/token \(4.69% of the teacher's 512\)"):
        search_space(spec(kv_budget=0.02), TEACHER)


def test_shared_students_take_the_largest_ranks_per_rope():
    space = search_space(spec(kv_budget=0.25), TEACHER)  # kv_rank 32 fits only with 1 MLA layer
    shapes = {s.qk_rope_dim: s for s in shared_students(space.arms)}
    assert set(shapes) == {4, 8}
    for rope, s in shapes.items():
        arms = [a for a in space.arms if a.qk_rope_dim == rope]
        assert s.kv_rank == max(a.kv_rank for a in arms) == 32 and s.q_rank is None and s.num_mla == 1
    only_low_rank_q = [a for a in space.arms if a.q_rank == 24]
    assert shared_students(only_low_rank_q)[0].q_rank == 24


def test_memory_estimate_counts_the_real_parameters():
    s = spec(micro_batch=2, seq_len=16)
    space = search_space(s, TEACHER)
    estimate = trial_memory_bytes(s, TEACHER, space.arms)
    teacher = sum(p.numel() for p in LlamaForCausalLM(TEACHER).parameters())
    tokens, c = 2 * 16, TEACHER
    activations = tokens * c.num_hidden_layers * (16 * c.hidden_size + 4 * c.intermediate_size)
    rest = teacher + 8 * tokens * c.vocab_size + activations  # 8 float32 copies of the logits
    for arm in space.arms[::5]:
        layers = [0, 3, 1, 2][: arm.num_mla]  # which layers are MLA does not change the count
        config = hybrid_config(TEACHER, layers, arm.kv_rank, arm.qk_rope_dim, arm.q_rank)
        with torch.device("meta"):
            params = sum(p.numel() for p in ZebraForCausalLM(config).parameters())
        assert estimate[arm.key] == 4 * (4 * params + rest), arm.key
