"""benchmarks.train_step: the KD rows compute the KD stage's loss and gradients, the phase split and the
profile are filled in, the attention FLOPs match a direct count, and the --tiny run writes every figure.
Timings are never asserted."""
import contextlib
import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.llama.modeling_llama import LlamaAttention

from benchmarks.train_step import (CHECKED_DS_CONFIG, KDSetup, attention_flops, attention_flops_per_token,
                                   kd_forward_backward, main, profile_ops, time_phases)
from cluster.teacher import LocalTeacher
from jobs.train import _kd_loss, _kd_targets
from tests.conftest import tiny_llama
from zebra.convert import hybrid_config
from zebra.mla import MLAttention
from zebra.modeling import ZebraForCausalLM


@pytest.mark.parametrize("top_k, ce_weight", [(None, 0.3), (8, 0.0)])
def test_kd_step_matches_the_stage_objective(top_k, ce_weight):
    """Float64, fresh random ids: the benchmark's phase-split KD step (loss against detached logits, then the
    student's backward) gives the loss and every gradient of jobs.train's _kd_targets + _kd_loss + backward."""
    teacher = LocalTeacher(lambda: tiny_llama(seed=3), "cpu")
    torch.manual_seed(4)
    student = ZebraForCausalLM(hybrid_config(teacher.model.config, [0], kv_rank=8, qk_rope_dim=4, chunk_size=8,
                                             mamba_backend="torch")).double()
    kd = KDSetup(batch=2, seq=16, steps=1, warmup=0, peak_flops=1.0, temperature=2.0, top_k=top_k,
                 ce_weight=ce_weight)
    ids = torch.randint(0, student.config.vocab_size, (kd.batch, kd.seq))
    loss = kd_forward_backward(student, teacher, ids, kd, contextlib.nullcontext())
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    batch = {"input_ids": ids}
    ref = _kd_loss(student, _kd_targets(teacher, batch, top_k, kd.temperature), batch, kd.temperature, ce_weight)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert loss.item() > 0
    for name, p in student.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert any(g.abs().sum() > 0 for g in ours.values())


def prefix_attention(q, k, v):
    """Causal attention one query at a time against only the keys it may see: q, k [heads, seq, qk], v [heads, seq,
    v] -> [heads, seq, v]. Every matmul it runs is one the causal triangle needs, so FlopCounterMode counts it."""
    outs = []
    for t in range(q.shape[1]):
        scores = q[:, t : t + 1] @ k[:, : t + 1].transpose(1, 2) * q.shape[-1] ** -0.5  # [heads, 1, t + 1]
        outs.append(scores.softmax(-1) @ v[:, : t + 1])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("heads, qk, v, seq", [(3, 12, 8, 7), (2, 16, 16, 1), (1, 5, 9, 13)])
def test_attention_flops_match_a_causal_count(heads, qk, v, seq):
    """Float64, fresh random inputs: an attention that multiplies only the causal triangle (its output SDPA's with
    is_causal) counts, forward, seq x attention_flops_per_token's forward FLOPs, and forward + backward 3x that."""
    q, k = (torch.randn(heads, seq, qk, dtype=torch.float64, requires_grad=True) for _ in range(2))
    value = torch.randn(heads, seq, v, dtype=torch.float64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = prefix_attention(q, k, value)
    forward = counter.get_total_flops()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, value, is_causal=True), rtol=1e-12, atol=1e-12)
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.randn_like(out))
    layers = 2  # two identical layers count twice
    assert layers * forward == seq * attention_flops_per_token(heads, qk, v, seq, layers=layers)
    assert layers * (forward + counter.get_total_flops()) == seq * attention_flops_per_token(
        heads, qk, v, seq, layers=layers, backward=True)
    assert forward > 0


def counted_attention(model, ids) -> int:
    """FLOPs FlopCounterMode counts in the model's forward inside its attention modules (LlamaAttention,
    MLAttention) beyond their nn.Linear layers; SDPA on its math path, which the counter sees (as full squares)."""
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(ids)
    counts = counter.get_flop_counts()
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, (LlamaAttention, MLAttention)):
            linear = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
            total += sum(counts[f"{type(model).__name__}.{name}"].values()) - 2 * ids.numel() * linear
    return total


@pytest.mark.parametrize("kind", ["llama", "hybrid", "pure_mla", "pure_mamba"])
def test_attention_flops_read_the_model_config(kind):
    """attention_flops of a model's config (which layers attend, heads, qk and v widths) against the attention
    FLOPs FlopCounterMode counts in that model's forward: the counter multiplies the full seq x seq square, the
    causal count (seq + 1) / 2 keys a query, so the ratio is 2 seq / (seq + 1). MLA widths unequal on purpose."""
    llama = tiny_llama(dtype=torch.float32, seed=0)
    layers = {"hybrid": [1, 3], "pure_mla": [0, 1, 2, 3], "pure_mamba": []}
    model = llama if kind == "llama" else ZebraForCausalLM(hybrid_config(
        llama.config, layers[kind], kv_rank=8, qk_rope_dim=4, qk_nope_dim=10, v_head_dim=8, chunk_size=8,
        mamba_backend="torch"))
    batch, seq = 2, 16
    ids = torch.randint(0, llama.config.vocab_size, (batch, seq))
    ours = attention_flops(model.config, seq, backward=False)
    assert counted_attention(model, ids) == ours * batch * seq * 2 * seq // (seq + 1)
    assert (ours == 0) == (kind == "pure_mamba")


def test_phase_split_covers_the_step_and_profile_ranks_ops():
    """Phases of known length are all reported, in order, and sum to about the wall-clock step; the profile
    lists the step's ops by self time, largest first."""
    device = torch.device("cpu")
    a, b = torch.randn(256, 256, dtype=torch.float64), torch.randn(256, 256, dtype=torch.float64)

    def step(timer):
        with timer("sleep"):
            time.sleep(0.02)
        with timer("matmul"):
            (a @ b).sum()
    split = time_phases(step, 3, device)
    assert list(split["phases"]) == ["sleep", "matmul"]
    assert split["phases"]["sleep"]["ms"] >= 19
    assert 0.8 * split["step_ms"] <= split["phase_sum_ms"] <= split["step_ms"] * 1.001
    prof = profile_ops(lambda: a @ b, 2, device, step_s=1e-3, top=3)
    names = [op["name"] for op in prof["ops"]]
    assert "aten::mm" in names and len(names) <= 3
    ms = [op["ms_per_step"] for op in prof["ops"]]
    assert ms == sorted(ms, reverse=True) and ms[0] > 0 and prof["kernels"] == []


def test_tiny_run_of_the_kd_rows(tmp_path, monkeypatch, capsys):
    """The CPU smoke run with the KD rows and --profile writes every row with positive tokens/s, a phase
    split that sums to about its step, and a non-empty profile; every row, the transformer too, its FLOPs per
    token with the attention's counted as the module docstring says (seq 32, tiny: 4 layers of 4 heads of 16;
    the hybrid's MLA layers 0 and 3, qk 16 + 16, v 16) and the MFU they give. In this process: main makes its own
    one-rank gloo group for both DeepSpeed rows (DeepSpeed's group caches cleared of earlier tests'
    groups first, as tests/conftest.py's one_rank_group does) and destroys it at the end."""
    import deepspeed.utils.groups as ds_groups
    import torch.distributed as dist

    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        monkeypatch.setattr(ds_groups, name, None)
    if dist.is_initialized():
        pytest.skip("a process group of another test is still up")
    out = tmp_path / "kd.json"
    main(["--tiny", "--models", "transformer", "kd_hybrid", "kd_deepspeed", "kd_deepspeed_checked", "ild_deepspeed",
          "--profile", "--out", str(out)])
    results = json.loads(out.read_text())
    rows = results["train_step"]
    teacher, mla = 4 * 4 * (16 + 16) * 33, 4 * (16 + 16 + 16) * 33  # forward a token: all 4 layers, one MLA layer
    attention = dict(transformer=3 * teacher, kd_hybrid=teacher + 3 * 2 * mla,
                     kd_deepspeed=teacher + 3 * 2 * mla, kd_deepspeed_checked=teacher + 3 * 2 * mla,
                     ild_deepspeed=teacher + 3 * 4 * mla)
    assert set(rows) == set(attention)
    for name, r in rows.items():
        assert r["attention_flops_per_token"] == attention[name], name
        assert r["flops_per_token"] > r["attention_flops_per_token"], name
        mfu = r["flops_per_token"] * r["tokens_per_s"] / results["peak_flops"]
        assert r["mfu"] == pytest.approx(mfu, rel=1e-12), name
    del rows["transformer"]
    for name, r in rows.items():
        assert "skipped" not in r, (name, r)
        assert r["tokens_per_s"] > 0 and r["loss"] > 0 and r["mfu"] > 0, name
        assert name == "ild_deepspeed" or r["teacher_params"] > 0, name
        split = r["split"]
        assert len(split["phases"]) >= 5, name
        assert 0.5 * split["step_ms"] <= split["phase_sum_ms"] <= 1.01 * split["step_ms"], (name, split)
        assert r["profile"]["ops"] and all(op["ms_per_step"] >= 0 for op in r["profile"]["ops"]), name
        assert r["profile"]["python"] and all(f["calls_per_step"] > 0 for f in r["profile"]["python"]), name
        assert r["first_step_s"] > 0, name  # the first warm-up step, timed on its own
    assert rows["kd_deepspeed"]["bf16"] is False and rows["kd_deepspeed"]["zero_stage"] == 2
    assert rows["kd_deepspeed"]["ds_overrides"] == {} and rows["kd_deepspeed_checked"]["ds_overrides"] == CHECKED_DS_CONFIG
    assert rows["kd_deepspeed"]["compute_grad_norm"] is False and rows["kd_deepspeed_checked"]["compute_grad_norm"] is True
    assert rows["kd_hybrid"]["teacher"] == "LocalTeacher"
    ild = rows["ild_deepspeed"]  # two students, only their mixers train
    assert 0 < ild["trainable"] < ild["params"] / 2 and ild["zero_stage"] == 2
    assert list(ild["split"]["phases"])[:4] == ["teacher_forward", "students_forward_loss", "engine_backward",
                                                "engine_step"]
    for micro in ("ild_loss", "mla_layer"):
        assert set(results[micro]) == {"triton", "torch"} and results[micro]["torch"]["ms"] > 0, micro
    printed = capsys.readouterr().out
    assert "kd_deepspeed: phases of one step" in printed and "1st step s" in printed
    assert "kd_deepspeed: top python" in printed
    assert not dist.is_initialized()
