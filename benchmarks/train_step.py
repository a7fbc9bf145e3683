"""Training-step throughput of the transformer student and the Zebra hybrid, and the SSD scan alone.

One process, one batch shape, one device. Rows:
  (a) transformer: HF LlamaForCausalLM of the SmolLM2-135M shape (30 layers, hidden 576, 9 heads, 3 KV heads)
  (b) hybrid, mamba_backend "torch": 3 MLA layers (0, 14, 29), the rest Mamba2 on the PyTorch references
  (c) hybrid, mamba_backend "triton": the same on the Triton kernels (kernels.ssd_scan, kernels.conv1d)
  (d) the SSD scan alone, forward + backward: our Triton kernel, the PyTorch reference, mamba_ssm's
      mamba_chunk_scan_combined where it imports
  (e) the Mamba2 gated RMSNorm alone, forward + backward: kernels.norm's Triton kernel and its reference
      (and one layer's ILD loss, zebra.losses.ild_loss: kernels.token_l2's Triton kernels against the float32
      PyTorch formula; and one MLA layer's forward + backward with kernels.mla_rope's kernel against PyTorch's ops)
  (f) kd_hybrid: a KD step as the KD stage takes it (jobs.train.kd_objective): the teacher of (a)'s shape
      (bf16 weights on CUDA, cluster.teacher.LocalTeacher.logits), then the hybrid student (kernel path on
      CUDA) forward, zebra.losses.kd_loss (full vocab by default), backward and fused AdamW (float32 weights,
      bf16 autocast as in (a)-(c)); the step split by CUDA events into teacher forward, student forward,
      loss forward + backward, student backward and optimizer
  (g) kd_deepspeed: the same step through the stage's machinery in one process, not Ray: jobs.train._engine
      (DeepSpeed ZeRO, GroupClippedAdamW, bf16 weights where the GPU has it, as resolve_bf16("auto")) and
      jobs.train._optimizer_step with a LocalTeacher, on a 1-rank process group (nccl on CUDA, gloo on the
      CPU); then the same step again split into its phases (a replica of _optimizer_step's body)
  (h) kd_deepspeed_checked: (g) with DeepSpeed's own grad-norm and bf16 overflow checks back on
      (CHECKED_DS_CONFIG): what jobs.train.deepspeed_config's switching them off saves
  (g'), (i') kd_deepspeed_graphed, ild_deepspeed_graphed: (g) and (i) with the engine's module replayed from CUDA
      graphs (jobs.train._graphed, as TrainSettings.cuda_graphs): a host-bound step's launches gone
  (i) ild_deepspeed: the ILD stage's step the same way (jobs.stages.ild: both pure students of (a)'s shape,
      30 MLA and 30 Mamba2 layers, random init, only the mixers trainable, in one engine; ILD_OBJECTIVE with
      LocalTeacher.hidden_states), split into teacher forward, students forward (layers and loss), engine
      backward and engine step. MFU counts 2 N_teacher_layers (no lm_head) + per student 4 N_layers (forward and
      the input gradients) + 2 N_trainable (weight gradients) per token: on SmolLM2's shape 9.4 N against KD's 8.4 N
      (N the teacher's parameters), before attention (see below)
  --profile: a few more steps of each selected model under torch.profiler; the top ops by self device
  time (self CPU time on the CPU) per step go into the JSON and the printout
A step is forward + backward + fused AdamW, under bf16 autocast on CUDA, random init and random tokens.
Model-FLOPs utilisation: a row's FLOPs per token (JSON flops_per_token) against --peak-flops. They are an N-linear
part, 6 N (N = the parameter count; KD rows add 2 N_teacher for the teacher's forward; ILD as row (i)), plus the causal
attention's score and value products, which N does not see (JSON attention_flops_per_token; the table's "attn" is its
share): per token and softmax-attention layer heads * (qk_head_dim + v_head_dim) * (seq + 1) forward (Q K^T and A V,
2 FLOPs a multiply-add, query t meets t + 1 keys), 3x that forward + backward (no recompute counted). Teacher and
transformer layers: 9 heads of 64 + 64; MLA layers: 9 heads, qk_nope_dim + qk_rope_dim = 64 + 32, v_head_dim 64;
Mamba2 layers: none (their scan is left in the N-linear part). Counted: (a) every layer forward + backward; (b), (c)
their MLA layers forward + backward; the KD rows the teacher's layers forward + the student's MLA layers forward +
backward; ILD the teacher's layers forward + the pure-MLA student's 30 layers forward + backward. On SmolLM2's shape at
seq 2048 (N = 134.5M, the teacher's; the hybrid with 3 MLA layers, kv_rank 128, rope 32), FLOPs per token:
    row              N-linear   attention       total   attn share
    transformer        807.1M      212.4M     1019.5M      20.8%      6.00 N -> 7.58 N
    hybrid             865.9M       26.6M      892.4M       3.0%      6.44 N -> 6.63 N
    kd_deepspeed      1134.9M       97.4M     1232.3M       7.9%      8.44 N -> 9.16 N
    ild_deepspeed     1263.0M      336.4M     1599.4M      21.0%      9.39 N -> 11.89 N
so an ILD token costs 1.30x a KD token with attention (1.11x without): at equal MFU, ILD runs at 0.77x KD's tokens/s.
Prints a table of ratios against (a) and writes JSON. Timings only: nothing is asserted.

    python -m benchmarks.train_step --out train_step.json            # 16 x 2048 on one GPU
    python -m benchmarks.train_step --tiny                           # CPU smoke run, tiny shapes, seconds
    python -m benchmarks.train_step --compile --models transformer hybrid_triton   # layers torch.compile'd
    python -m benchmarks.train_step --compile --models kd_deepspeed ild_deepspeed --batch 8   # as the stages on a GPU
    python -m benchmarks.train_step --compile --models kd_deepspeed kd_deepspeed_graphed --batch 8   # CUDA graphs
    python -m benchmarks.train_step --models transformer hybrid_triton kd_hybrid kd_deepspeed kd_deepspeed_checked \
        ild_deepspeed --profile --out kd.json      # the KD rows need ray, the DeepSpeed ones deepspeed (on the GPU: the stage bundle)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # CPU smoke runs: Triton reads this when it first decorates its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (kd_deepspeed) reads it at its first use

import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.mamba_ssm_ssd import ENV as MAMBA_SSM_ENV  # noqa: E402
from benchmarks.mamba_ssm_ssd import chunk_scan_combined  # noqa: E402
import kernels.norm  # noqa: E402
from kernels.norm import gated_rms_norm  # noqa: E402
from kernels.ssd import ssd_chunked_ref  # noqa: E402
from zebra.convert import hybrid_config  # noqa: E402
from zebra.losses import ild_loss, kd_loss  # noqa: E402
from zebra.cuda_graphs import is_graphed  # noqa: E402
from zebra.mla import MLAttention  # noqa: E402
from zebra.modeling import ZebraForCausalLM, compile_decoder_layers  # noqa: E402

log = logging.getLogger("benchmarks.train_step")

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
MLA_LAYERS = {"smollm2": [0, 14, 29], "tiny": [0, 3]}
LM_MODELS = ("transformer", "hybrid_torch", "hybrid_triton")
KD_MODELS = ("kd_hybrid", "kd_deepspeed", "kd_deepspeed_checked", "kd_deepspeed_graphed", "ild_deepspeed",
             "ild_deepspeed_graphed")  # the rows with a teacher
# kd_deepspeed_checked: jobs.train.deepspeed_config with DeepSpeed's own gradient checks back on, as before the
# stage turned them off: GroupClippedAdamW clips (and guards non-finite norms), so ZeRO's global norm (a
# per-parameter norm loop and an all-reduce) is unused, and a bf16 step needs no overflow check (a
# per-gradient inf/nan loop, an all-reduce and a host sync).
CHECKED_DS_CONFIG = {"zero_optimization": {"compute_grad_norm": True}, "bf16": {"check_grad_overflow": True}}
PROFILE_TOP = 15  # ops per model in the profile table


def build_models(tiny: bool, chunk_size: int) -> dict:
    """name -> a function building that model (random init, float32 weights)."""
    llama = LlamaConfig(**(TINY if tiny else SMOLLM2))
    mla = MLA_LAYERS["tiny" if tiny else "smollm2"]
    rank, rope = (32, 16) if tiny else (128, 32)

    def hybrid(backend):
        return lambda: ZebraForCausalLM(hybrid_config(llama, mla, kv_rank=rank, qk_rope_dim=rope,
                                                      chunk_size=chunk_size, mamba_backend=backend))
    return {"transformer": lambda: LlamaForCausalLM(llama), "hybrid_torch": hybrid("torch"),
            "hybrid_triton": hybrid("triton")}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train_step(model, batch: int, seq: int, steps: int, warmup: int, device, peak_flops: float,
                     profile_steps: int = 0) -> dict:
    """Time forward + backward + AdamW on random tokens [batch, seq] -> step_s, tokens_per_s, peak_gib, mfu
    (and with profile_steps > 0 the profile of that many more steps, see profile_ops)."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    step_s, loss, first_s = time_steps(step, steps, warmup, device)
    params = sum(p.numel() for p in model.parameters())
    tokens_per_s = batch * seq / step_s
    out = dict(step_s=step_s, first_step_s=first_s, tokens_per_s=tokens_per_s, params=params, peak_gib=peak_gib(device), loss=loss.item(),
               **flops_fields(6 * params, attention_flops(model.config, seq, backward=True), tokens_per_s,
                              peak_flops))
    if profile_steps:
        out["profile"] = profile_ops(step, profile_steps, device, step_s)
    return out


def attention_flops_per_token(heads: int, qk_head_dim: int, v_head_dim: int, seq: int, layers: int = 1,
                              backward: bool = False) -> int:
    """FLOPs per token of the score and value products (Q K^T and A V, 2 FLOPs a multiply-add) of `layers`
    causal softmax-attention layers of `heads` heads at length seq: query t meets t + 1 keys, (seq + 1) / 2
    on average, so forward = layers * heads * (qk_head_dim + v_head_dim) * (seq + 1); with backward 3x that
    (the backward 2x the forward; no recompute counted). Not proportional to the parameter count."""
    forward = layers * heads * (qk_head_dim + v_head_dim) * (seq + 1)
    return 3 * forward if backward else forward


def attention_dims(config) -> dict[str, int]:
    """The softmax-attention shape of a model config: layers, heads, qk_head_dim, v_head_dim. A ZebraConfig
    (it has mixer_types): its MLA layers, qk = qk_nope_dim + qk_rope_dim, v = v_head_dim (Mamba2 layers have no
    such term: their scan is left in the N-linear count); any other (a LlamaConfig): every layer, head_dim."""
    if hasattr(config, "mixer_types"):
        return dict(layers=len(config.mla_layers), heads=config.num_attention_heads,
                    qk_head_dim=config.qk_nope_dim + config.qk_rope_dim, v_head_dim=config.v_head_dim)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return dict(layers=config.num_hidden_layers, heads=config.num_attention_heads, qk_head_dim=head_dim,
                v_head_dim=head_dim)


def attention_flops(config, seq: int, backward: bool) -> int:
    """attention_flops_per_token of a model config's attention layers (attention_dims)."""
    return attention_flops_per_token(seq=seq, backward=backward, **attention_dims(config))


def flops_fields(dense: int, attention: int, tokens_per_s: float, peak_flops: float) -> dict:
    """A row's FLOPs per token, dense (the N-linear part) + attention (as attention_flops counts it), and its MFU."""
    total = dense + attention
    return dict(flops_per_token=total, attention_flops_per_token=attention, mfu=total * tokens_per_s / peak_flops)


def time_steps(step, steps: int, warmup: int, device) -> tuple[float, Tensor, float]:
    """(seconds per step() over `steps` calls after `warmup` untimed ones, the last call's result, seconds of
    the first call: its compiles, Triton's and with --compile torch.compile's, what a stage pays once)."""
    sync(device)
    begin = time.perf_counter()
    first = None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        result = step()
        if first is None:
            sync(device)
            first = time.perf_counter() - begin
    sync(device)
    return (time.perf_counter() - start) / steps, result, first


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


class PhaseTimer:
    """Time spent in named phases of a step, summed over steps: CUDA events on the GPU (read after a
    synchronize; the device time from a phase's start to its end), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = self._mark()
        yield
        self.marks.append((name, start, self._mark()))

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms_per_step(self, steps: int) -> dict[str, float]:
        """phase -> milliseconds per step, in the order the phases first ran (call after a sync)."""
        totals: dict[str, float] = {}
        for name, start, end in self.marks:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            totals[name] = totals.get(name, 0.0) + ms / steps
        return totals


def time_phases(step, steps: int, device) -> dict:
    """step(timer) run `steps` times (after the caller's warm-up) -> phases {name: {ms, pct}} per step,
    phase_sum_ms and step_ms (wall clock per step over the same steps, the split's own overhead included)."""
    timer = PhaseTimer(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(timer)
    sync(device)
    step_ms = (time.perf_counter() - start) / steps * 1e3
    ms = timer.ms_per_step(steps)
    return dict(step_ms=step_ms, phase_sum_ms=sum(ms.values()),
                phases={name: dict(ms=v, pct=100 * v / step_ms) for name, v in ms.items()})


def profile_ops(step, steps: int, device, step_s: float, top: int = PROFILE_TOP) -> dict:
    """step() run `steps` times under torch.profiler (CPU and CUDA activities), per step:
    ops      the `top` host-side ops (aten::*, autograd nodes, record_function ranges) by self device time
             (on the CPU: self CPU time): name, ms_per_step, pct_of_step (of step_s, the unprofiled step),
             calls_per_step
    kernels  on CUDA, the `top` device events (kernels, copies) by device time, same fields: Triton
             kernels launched from autograd Functions show here, not under an aten op
    busy_ms_per_step  on CUDA the device events summed (the rest of the step the GPU waits on the
             host); on the CPU every op's self time summed."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    averages = list(prof.key_averages())
    key = "self_cpu_time_total"
    if cuda:
        key = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    host = [e for e in averages if e.device_type == DeviceType.CPU]
    device_events = [e for e in averages if e.device_type != DeviceType.CPU]
    step_ms = step_s * 1e3

    def ranked(events):
        rows = [(e.key, getattr(e, key) / 1e3 / steps, e.count / steps) for e in events]
        return [dict(name=name, ms_per_step=ms, pct_of_step=100 * ms / step_ms, calls_per_step=calls)
                for name, ms, calls in sorted(rows, key=lambda r: r[1], reverse=True)[:top]]
    busy = sum(getattr(e, key) for e in (device_events if cuda else host)) / 1e3 / steps
    return dict(time=key, steps=steps, step_ms=step_ms, busy_ms_per_step=busy, ops=ranked(host),
                kernels=ranked(device_events) if cuda else [], python=python_profile(step, steps, device, step_ms, top))


def python_profile(step, steps: int, device, step_ms: float, top: int) -> list[dict]:
    """step() run `steps` more times under cProfile: the `top` Python functions by own time per step (what the
    host spends outside the ops: hooks, autograd's Python, DeepSpeed's bookkeeping), same fields as profile_ops'
    (cProfile's own overhead inflates them: compare them with one another, not with the step)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    sync(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, ncalls, tottime, cumtime, callers)}
    rows = sorted(((f"{Path(f).name}:{line}({name})", tt * 1e3 / steps, n / steps)
                   for (f, line, name), (_, n, tt, _, _) in stats.items()), key=lambda r: r[1], reverse=True)
    return [dict(name=name, ms_per_step=ms, pct_of_step=100 * ms / step_ms, calls_per_step=calls)
            for name, ms, calls in rows[:top]]


@dataclasses.dataclass(frozen=True)
class KDSetup:
    """What a KD row times: the objective's knobs (jobs.train.kd_objective's), the batch, the steps."""

    batch: int
    seq: int
    steps: int
    warmup: int
    peak_flops: float
    temperature: float = 1.0
    top_k: int | None = None
    ce_weight: float = 0.0
    profile_steps: int = 0
    cuda_graphs: bool = False  # the DeepSpeed rows: the engine's module replayed from CUDA graphs (as the stages)


def bench_kd_hybrid(student, teacher_factory, kd: KDSetup, device) -> dict:
    """A KD step of the stage's objective with a plain training loop: LocalTeacher.logits, the student
    forward under bf16 autocast (float32 weights, as bench_train_step), kd_loss, backward, fused AdamW.
    Timed whole, then split into phases (time_phases), then optionally profiled."""
    from cluster.teacher import LocalTeacher

    teacher = LocalTeacher(teacher_factory, device)
    student.to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, student.config.vocab_size, (kd.batch, kd.seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(timer=None):
        loss = kd_forward_backward(student, teacher, ids, kd, autocast, timer)
        with (timer or _no_phase)("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss
    step_s, loss, first_s = time_steps(step, kd.steps, kd.warmup, device)
    out = kd_result(student, teacher.model, kd, step_s, device, loss.item()) | {"first_step_s": first_s}
    out["teacher"] = type(teacher).__name__
    out["split"] = time_phases(step, kd.steps, device)
    if kd.profile_steps:
        out["profile"] = profile_ops(step, kd.profile_steps, device, step_s)
    return out


def kd_forward_backward(student, teacher, ids: Tensor, kd: KDSetup, autocast, timer=None) -> Tensor:
    """The KD stage's loss on ids [batch, seq] (jobs.train._kd_targets of teacher, a LocalTeacher, then
    _kd_loss) and its backward into the student's .grad, in phases (timer(name) contexts, optional):
    teacher_forward, student_forward, loss_forward_backward (kd_loss against the detached logits: it
    computes their gradient in its forward), student_backward. -> the loss (scalar)."""
    timer = timer or _no_phase
    labels = ids if kd.ce_weight > 0 else None  # as _kd_loss: the batch's own ids
    with timer("teacher_forward"):
        targets = teacher.logits(ids, kd.top_k, kd.temperature)
    with timer("student_forward"), autocast:
        logits = student(ids).logits  # [batch, seq, vocab]
    with timer("loss_forward_backward"):
        leaf = logits.detach().requires_grad_()
        loss = kd_loss(leaf, targets, kd.temperature, kd.ce_weight, labels)
        loss.backward()
    with timer("student_backward"):
        logits.backward(leaf.grad)
    return loss


def _no_phase(name: str):
    return contextlib.nullcontext()


def kd_result(student, teacher, kd: KDSetup, step_s: float, device, loss: float) -> dict:
    """A KD row's figures: tokens/s of the student's tokens, MFU counting 6 N_student + 2 N_teacher per token
    plus the attention of the teacher's layers (forward) and the student's MLA layers (forward + backward)."""
    params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    tokens_per_s = kd.batch * kd.seq / step_s
    attention = (attention_flops(teacher.config, kd.seq, backward=False)
                 + attention_flops(student.config, kd.seq, backward=True))
    return dict(step_s=step_s, tokens_per_s=tokens_per_s, params=params, teacher_params=teacher_params,
                **flops_fields(6 * params + 2 * teacher_params, attention, tokens_per_s, kd.peak_flops),
                peak_gib=peak_gib(device), loss=float(loss),  # _optimizer_step's loss is a device scalar
                kd=dict(temperature=kd.temperature, top_k=kd.top_k, ce_weight=kd.ce_weight))


def bench_kd_deepspeed(student, teacher_factory, kd: KDSetup, device, zero_stage: int,
                       ds_overrides: dict | None = None) -> dict:
    """The KD step of the stage's own code in one process: jobs.train._engine (DeepSpeed, GroupClippedAdamW,
    bf16 as resolve_bf16("auto") decides on this device) and jobs.train._optimizer_step with a LocalTeacher,
    batches of CPU ids as the stage's data gives them. Timed whole; then a replica of _optimizer_step's
    body split into phases; then optionally profiled (the real _optimizer_step). ds_overrides: merged
    into jobs.train.deepspeed_config's dict (section by section) while the engine is built."""
    from unittest import mock

    import jobs.train
    from cluster.teacher import LocalTeacher
    from jobs.train import TargetsAhead, TrainConfig, _engine, _graphed, _next_batch, _optimizer_step, kd_objective

    cuda = device.type == "cuda"
    cfg = TrainConfig(workers=1, use_gpu=cuda, zero_stage=zero_stage, micro_batch=kd.batch, seq_len=kd.seq,
                      bf16="auto" if cuda else False, lr=1e-4, total_steps=10_000,
                      cuda_graphs="auto" if kd.cuda_graphs else False)
    objective = kd_objective(kd.temperature, kd.top_k, kd.ce_weight)
    ids = torch.randint(0, student.config.vocab_size, (kd.batch, kd.seq))
    batches = itertools.repeat({"input_ids": ids})
    with one_rank_group(device):
        teacher = LocalTeacher(teacher_factory, device)
        stage_config = jobs.train.deepspeed_config
        with mock.patch.object(jobs.train, "deepspeed_config",
                               lambda c, w: merge_sections(stage_config(c, w), ds_overrides or {})):
            engine = _graphed(_engine(cfg, student, world=1), cfg)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        targets = TargetsAhead(batches, teacher, objective, cfg, device, cfg.total_steps)  # in-process: none ahead

        def step():
            return _optimizer_step(engine, objective, targets, cfg, device)

        def split_step(timer):  # _optimizer_step's body (grad_accum 1) with _kd_targets and _kd_loss opened up
            with timer("teacher_forward"):
                batch = _next_batch(batches, cfg, device)
                targets = objective.teacher_targets(teacher, batch)
            with timer("student_forward"):
                logits = engine(batch["input_ids"]).logits
            with timer("loss_forward"):  # computes the logits' gradient too
                labels = batch["input_ids"] if kd.ce_weight > 0 else None
                loss = kd_loss(logits, targets, kd.temperature, kd.ce_weight, labels)
            engine_update(engine, loss, timer)
        step_s, loss, first_s = time_steps(step, kd.steps, kd.warmup, device)
        out = kd_result(engine.module, teacher.model, kd, step_s, device, loss) | {"first_step_s": first_s}
        out.update(bf16=engine.bfloat16_enabled(), zero_stage=zero_stage, cuda_graphs=is_graphed(engine.module),
                   ds_overrides=ds_overrides or {},
                   compute_grad_norm=engine.zero_compute_grad_norm() if hasattr(engine, "zero_compute_grad_norm")
                   else None)
        out["split"] = time_phases(split_step, kd.steps, device)
        if kd.profile_steps:
            out["profile"] = profile_ops(step, kd.profile_steps, device, step_s)
        engine.destroy()
    return out


def ild_students(tiny: bool, chunk_size: int, device):
    """jobs.stages.ild's StudentPair of random pure students of (a)'s shape: every layer MLA, every layer Mamba2
    (the kernel path on CUDA, the PyTorch reference on the CPU), float32 weights as the stage loads them."""
    from jobs.stages.ild import StudentPair

    llama = LlamaConfig(**(TINY if tiny else SMOLLM2))
    rank, rope = (32, 16) if tiny else (128, 32)
    backend = "triton" if device.type == "cuda" else "torch"
    torch.manual_seed(0)
    mla, mamba = (ZebraForCausalLM(hybrid_config(llama, layers, kv_rank=rank, qk_rope_dim=rope, chunk_size=chunk_size,
                                                 mamba_backend=backend))
                  for layers in (list(range(llama.num_hidden_layers)), []))
    return StudentPair(mla, mamba)


def ild_flops_per_token(pair, teacher, seq: int) -> tuple[int, int]:
    """(dense, attention) FLOPs per token of an ILD step: dense 2 N_teacher_layers (hidden states only: no lm_head)
    + per student 4 N_layers + 2 N_trainable; attention the teacher's layers forward + each student's MLA layers
    forward and backward (the pure Mamba2 student has none). See the module docstring's row (i)."""
    dense = 2 * sum(p.numel() for p in teacher.model.layers.parameters())
    attention = attention_flops(teacher.config, seq, backward=False)
    for student in (pair.mla, pair.mamba):
        dense += 4 * sum(p.numel() for p in student.model.layers.parameters())
        dense += 2 * sum(p.numel() for p in student.parameters() if p.requires_grad)
        attention += attention_flops(student.config, seq, backward=True)
    return dense, attention


def bench_ild_deepspeed(pair, teacher_factory, kd: KDSetup, device, zero_stage: int) -> dict:
    """The ILD stage's step in one process, as bench_kd_deepspeed times KD's: jobs.train._engine over the
    StudentPair (one parameter group per student) and jobs.train._optimizer_step with ILD_OBJECTIVE and a
    LocalTeacher. Timed whole; then a replica of _optimizer_step's body split into phases; then optionally
    profiled."""
    from cluster.teacher import LocalTeacher
    from jobs.stages.ild import ILD_OBJECTIVE
    from jobs.train import TargetsAhead, TrainConfig, _engine, _graphed, _next_batch, _optimizer_step

    cuda = device.type == "cuda"
    cfg = TrainConfig(workers=1, use_gpu=cuda, zero_stage=zero_stage, micro_batch=kd.batch, seq_len=kd.seq,
                      bf16="auto" if cuda else False, lr=1e-4, total_steps=10_000,
                      cuda_graphs="auto" if kd.cuda_graphs else False)
    ids = torch.randint(0, pair.mla.config.vocab_size, (kd.batch, kd.seq))
    batches = itertools.repeat({"input_ids": ids})
    with one_rank_group(device):
        teacher = LocalTeacher(teacher_factory, device)
        engine = _graphed(_engine(cfg, pair, world=1), cfg)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        targets = TargetsAhead(batches, teacher, ILD_OBJECTIVE, cfg, device, cfg.total_steps)  # in-process: none ahead

        def step():
            return _optimizer_step(engine, ILD_OBJECTIVE, targets, cfg, device)

        def split_step(timer):  # _optimizer_step's body (grad_accum 1), opened up
            with timer("teacher_forward"):
                batch = _next_batch(batches, cfg, device)
                targets = ILD_OBJECTIVE.teacher_targets(teacher, batch)
            with timer("students_forward_loss"):
                loss = ILD_OBJECTIVE.loss(engine, targets, batch)
            engine_update(engine, loss, timer)
        step_s, loss, first_s = time_steps(step, kd.steps, kd.warmup, device)
        tokens_per_s = kd.batch * kd.seq / step_s
        out = dict(step_s=step_s, first_step_s=first_s, tokens_per_s=tokens_per_s, params=sum(p.numel() for p in pair.parameters()),
                   trainable=sum(p.numel() for p in pair.parameters() if p.requires_grad),
                   **flops_fields(*ild_flops_per_token(engine.module, teacher.model, kd.seq), tokens_per_s,
                                  kd.peak_flops),
                   peak_gib=peak_gib(device), loss=float(loss), bf16=engine.bfloat16_enabled(), zero_stage=zero_stage,
                   cuda_graphs=is_graphed(engine.module))
        out["split"] = time_phases(split_step, kd.steps, device)
        if kd.profile_steps:
            out["profile"] = profile_ops(step, kd.profile_steps, device, step_s)
        engine.destroy()
    return out


def engine_update(engine, loss: Tensor, timer) -> None:
    """The end of jobs.train._optimizer_step's body in phases: engine backward, engine step, the loss's
    all-reduce and host read."""
    import torch.distributed as dist

    with timer("engine_backward"):
        engine.backward(loss)
    with timer("engine_step"):
        engine.step()
    with timer("loss_all_reduce_item"):
        total = loss.detach().float()
        dist.all_reduce(total)
        total.item()


def merge_sections(config: dict, overrides: dict) -> dict:
    """config with each overrides section merged into its own (dicts one level deep), other keys replaced."""
    merged = dict(config)
    for key, value in overrides.items():
        merged[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


@contextlib.contextmanager
def one_rank_group(device):
    """A torch.distributed group of this process alone (nccl on CUDA, gloo on the CPU) over 127.0.0.1 and
    a free port, as Ray Train would set up for one worker; destroyed on exit if it was created here."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_WORLD_SIZE="1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def scan_functions() -> dict:
    """name -> scan(x, dt, A, B, C, chunk, D, s0) -> (y, final) for every SSD scan that can run here."""
    fns = {"torch_ref": lambda x, dt, A, B, C, chunk, D, s0: ssd_chunked_ref(x, dt, A, B, C, chunk, D=D,
                                                                             initial_state=s0)}
    try:
        from kernels.ssd_scan import ssd_scan_triton

        fns["triton"] = lambda x, dt, A, B, C, chunk, D, s0: ssd_scan_triton(x, dt, A, B, C, chunk, D=D,
                                                                             initial_state=s0)
    except ImportError as err:
        log.warning("kernels.ssd_scan does not import: %s", err)
    mamba_chunk_scan_combined = chunk_scan_combined()
    if mamba_chunk_scan_combined is None:
        log.info("mamba_ssm is not importable and $%s is unset; its scan is left out", MAMBA_SSM_ENV)
    else:
        fns["mamba_ssm"] = lambda x, dt, A, B, C, chunk, D, s0: mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk, D=D, initial_states=s0, return_final_states=True)
    return fns


def bench_scan(fn, shape, chunk: int, steps: int, warmup: int, device, dtype) -> dict:
    """Forward + backward of one scan on x [b, l, h, p] (dtype), B, C [b, l, h, n] -> ms per call."""
    b, l, h, p, n = shape
    leaves = [torch.randn(b, l, h, p, device=device).to(dtype), F.softplus(torch.randn(b, l, h, device=device) - 4),
              -torch.exp(torch.rand(h, device=device)), torch.randn(b, l, h, n, device=device).to(dtype),
              torch.randn(b, l, h, n, device=device).to(dtype), torch.ones(h, device=device),
              torch.zeros(b, h, p, n, device=device)]
    leaves = [t.requires_grad_() for t in leaves]
    dy = torch.randn(b, l, h, p, device=device).to(dtype)

    def call():
        y, final = fn(*leaves[:5], chunk, leaves[5], leaves[6])
        torch.autograd.backward([y, final], [dy.to(y.dtype), torch.zeros_like(final)])
    return dict(ms=time_ms(call, steps, warmup, device))


def bench_norm(backend: str, shape, steps: int, warmup: int, device, dtype) -> dict:
    """Forward + backward of the gated RMSNorm on y, z [b, l, h * p] (dtype, z a slice of a wider tensor as
    in the mixer), groups of p channels -> ms per call."""
    b, l, h, p, _ = shape
    y = torch.randn(b, l, h * p, device=device).to(dtype).requires_grad_()
    z = torch.randn(b, l, 3 * h * p, device=device).to(dtype).requires_grad_()
    weight = torch.ones(h * p, device=device, requires_grad=True)
    dout = torch.randn_like(y)

    def call():
        torch.autograd.backward(gated_rms_norm(y, z[..., : h * p], weight, p, 1e-5, backend), dout)
    return dict(ms=time_ms(call, steps, warmup, device))


def bench_ild_loss(backend: str, shape, steps: int, warmup: int, device, dtype) -> dict:
    """Forward + backward of one layer's ILD loss (zebra.losses.ild_loss: layer and mixer output, [b, l, h * p],
    dtype) -> ms per call; the ILD step makes 60 such calls (30 layers x 2 students)."""
    b, l, h, p, _ = shape
    student = [torch.randn(b, l, h * p, device=device).to(dtype).requires_grad_() for _ in range(2)]
    teacher = [torch.randn(b, l, h * p, device=device).to(dtype) for _ in range(2)]

    def call():
        ild_loss(student[0], teacher[0], student[1], teacher[1], backend=backend).backward()
    return dict(ms=time_ms(call, steps, warmup, device))


def bench_mla_layer(backend: str, tiny: bool, batch: int, seq: int, steps: int, warmup: int, device) -> dict:
    """Forward + backward of one MLA layer (zebra.mla.MLAttention of the hybrid's shape, float32 weights, bf16
    autocast on CUDA) on a fresh causal pass -> ms per call: backend "triton" builds its attention inputs with
    kernels.mla_rope, "torch" with the PyTorch ops (RoPE, cats, views)."""
    llama = LlamaConfig(**(TINY if tiny else SMOLLM2))
    rank, rope = (32, 16) if tiny else (128, 32)
    config = hybrid_config(llama, [0], kv_rank=rank, qk_rope_dim=rope, mamba_backend=backend)
    layer = MLAttention(config, 0).to(device)
    x = torch.randn(batch, seq, llama.hidden_size, device=device, requires_grad=True)
    pos = torch.arange(seq, device=device).expand(batch, seq)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def call():
        with autocast:
            out = layer(x, pos)
        out.float().sum().backward()
    return dict(ms=time_ms(call, steps, warmup, device))


def time_ms(call, steps: int, warmup: int, device) -> float:
    """Milliseconds per call() over `steps` calls after `warmup` untimed ones."""
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        call()
    sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def run_or_skip(name: str, fn) -> dict:
    """fn()'s result, or {"skipped": why} when this path cannot run here (logged)."""
    try:
        return fn()
    except (RuntimeError, ValueError, ImportError) as err:
        log.warning("%s skipped: %s", name, err)
        return {"skipped": f"{type(err).__name__}: {err}"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup, args.chunk_size = 2, 32, 1, 1, 16
        args.profile_steps = min(args.profile_steps, 1)
    if args.profile_steps < 1:
        raise ValueError(f"--profile-steps={args.profile_steps}: expected >= 1")
    kernels.norm.FORMULA_UNDER_COMPILE = args.compiled_norms == "formula"
    results = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", batch=args.batch,
                   seq=args.seq, chunk_size=args.chunk_size, compile=args.compile, peak_flops=args.peak_flops,
                   compiled_norms=args.compiled_norms,
                   torch=torch.__version__, train_step={}, ssd_scan={}, gated_rms_norm={}, ild_loss={}, mla_layer={})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (2, 32, 2, 16, 16) if args.tiny else (args.batch, args.seq, 9, 64, 64)
    for name, fn in scan_functions().items():  # first: a CUDA error in a model step ends the process's CUDA use
        results["ssd_scan"][name] = run_or_skip(name, lambda fn=fn: bench_scan(
            fn, shape, args.chunk_size, args.steps, args.warmup, device, dtype))
    for backend in ("triton", "torch"):
        results["gated_rms_norm"][backend] = run_or_skip(f"gated_rms_norm {backend}", lambda b=backend: bench_norm(
            b, shape, args.steps, args.warmup, device, dtype))
        results["ild_loss"][backend] = run_or_skip(f"ild_loss {backend}", lambda b=backend: bench_ild_loss(
            b, shape, args.steps, args.warmup, device, dtype))
        results["mla_layer"][backend] = run_or_skip(f"mla_layer {backend}", lambda b=backend: bench_mla_layer(
            b, args.tiny, args.batch, args.seq, args.steps, args.warmup, device))
    profile_steps = args.profile_steps if args.profile else 0
    for name, build in build_models(args.tiny, args.chunk_size).items():
        if args.models and name not in args.models:
            continue

        def step(build=build):
            torch.manual_seed(0)
            model = build()
            if args.compile:
                compile_layers(model)
            out = bench_train_step(model, args.batch, args.seq, args.steps, args.warmup, device, args.peak_flops,
                                   profile_steps)
            del model
            free_memory(device)
            return out
        results["train_step"][name] = run_or_skip(name, step)
        save(results, args.out, name)
    kd = KDSetup(args.batch, args.seq, args.steps, args.warmup, args.peak_flops, args.kd_temperature, args.kd_top_k,
                 args.kd_ce_weight, profile_steps)
    kd_names = [name for name in KD_MODELS if args.models and name in args.models]
    # One process group for every DeepSpeed row: DeepSpeed keeps the groups it made of the first one.
    deepspeed = any("deepspeed" in name for name in kd_names)
    with one_rank_group(device) if deepspeed else contextlib.nullcontext():
        for name in kd_names:
            results["train_step"][name] = run_or_skip(name, lambda name=name: kd_row(name, args, kd, device))
            save(results, args.out, name)
    print(table(results))
    save(results, args.out)
    return results


def save(results: dict, out: str | None, row: str | None = None) -> None:
    """Write the results so far as JSON to `out` (if given), after each train-step row too, so that a run
    cut short by a timeout still leaves the rows it finished; log the row just done."""
    if row is not None and "tokens_per_s" in results["train_step"][row]:
        log.info("%s: %.0f tokens/s", row, results["train_step"][row]["tokens_per_s"])
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


def kd_row(name: str, args, kd: KDSetup, device) -> dict:
    """One row with a teacher (kd_hybrid, kd_deepspeed*, ild_deepspeed): a fresh student (seed 0) and teacher
    (seed 1)."""
    student_factory, teacher_factory = kd_models(args.tiny, args.chunk_size, device)
    torch.manual_seed(0)
    ild = name.startswith("ild_deepspeed")
    student = ild_students(args.tiny, args.chunk_size, device) if ild else student_factory()
    kd = dataclasses.replace(kd, cuda_graphs=name.endswith("_graphed"))
    if args.compile:
        compile_layers(student)
    try:
        if ild:
            return bench_ild_deepspeed(student, teacher_factory, kd, device, args.zero_stage)
        if name == "kd_hybrid":
            return bench_kd_hybrid(student, teacher_factory, kd, device)
        overrides = None
        if name == "kd_deepspeed_checked":  # compute_grad_norm is a ZeRO-1/2 switch
            overrides = {k: v for k, v in CHECKED_DS_CONFIG.items() if args.zero_stage == 2 or k != "zero_optimization"}
        return bench_kd_deepspeed(student, teacher_factory, kd, device, args.zero_stage, overrides)
    finally:
        del student
        free_memory(device)


def compile_layers(model: nn.Module) -> None:
    """Regional torch.compile as the stages do it (TrainSettings.compile): compile_decoder_layers for a hybrid or
    the ILD pair, each LlamaDecoderLayer in place for the transformer. The warm-up steps take the compile."""
    if compile_decoder_layers(model) == 0:
        for layer in model.model.layers:
            layer.compile()


def kd_models(tiny: bool, chunk_size: int, device) -> tuple:
    """(student factory, teacher factory) of the KD rows: the hybrid on the kernel path on CUDA (the
    PyTorch reference on the CPU, where the Triton interpreter would take minutes), and the transformer
    of row (a)'s shape as the teacher, in bf16 on CUDA as the GPU spec loads it (teacher.dtype), seed 1."""
    student = build_models(tiny, chunk_size)["hybrid_triton" if device.type == "cuda" else "hybrid_torch"]
    llama = LlamaConfig(**(TINY if tiny else SMOLLM2))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def teacher():
        torch.manual_seed(1)
        return LlamaForCausalLM(llama).to(dtype)
    return student, teacher


def free_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(results: dict) -> str:
    """The train-step rows with ratios against the transformer (attn: the attention share of the row's FLOPs per
    token), then the scan and norm rows against Triton's."""
    w = max([16] + [len(name) + 1 for name in results["train_step"]])  # the name column
    rows = [f"train step, batch {results['batch']} x {results['seq']}, {results['device']}",
            f"{'model':<{w}}{'step s':>9}{'tokens/s':>12}{'x transf.':>10}{'peak GiB':>10}{'MFU':>7}{'attn':>7}"
            f"{'1st step s':>11}"]
    base = results["train_step"].get("transformer", {}).get("tokens_per_s")
    for name, r in results["train_step"].items():
        if "skipped" in r:
            rows.append(f"{name:<{w}}skipped: {r['skipped'][:100]}")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        attn = 100 * r["attention_flops_per_token"] / r["flops_per_token"]
        rows.append(f"{name:<{w}}{r['step_s']:>9.3f}{r['tokens_per_s']:>12,.0f}{ratio:>10}{peak:>10}"
                    f"{r['mfu'] * 100:>6.1f}%{attn:>6.1f}%{r['first_step_s']:>11.1f}")
    for key, title in (("ssd_scan", f"SSD scan forward + backward (chunk {results['chunk_size']})"),
                       ("gated_rms_norm", "gated RMSNorm forward + backward"),
                       ("ild_loss", "ILD loss of one layer (layer + mixer output) forward + backward"),
                       ("mla_layer", "one MLA layer forward + backward (triton: kernels.mla_rope's inputs)")):
        rows += [title, f"{'path':<16}{'ms':>9}{'x triton':>10}"]
        ours = results[key].get("triton", {}).get("ms")
        for name, r in results[key].items():
            if "skipped" in r:
                rows.append(f"{name:<16}skipped: {r['skipped'][:100]}")
                continue
            ratio = f"{r['ms'] / ours:>10.2f}" if ours else f"{'-':>10}"
            rows.append(f"{name:<16}{r['ms']:>9.2f}{ratio}")
    return "\n".join(rows + split_rows(results["train_step"]) + profile_rows(results["train_step"]))


def split_rows(rows_by_model: dict) -> list[str]:
    """The phase split of each KD row: ms per step and % of the split run's wall-clock step."""
    rows = []
    for name, r in rows_by_model.items():
        if "split" not in r:
            continue
        split = r["split"]
        rows += [f"{name}: phases of one step (wall {split['step_ms']:.1f} ms, "
                 f"phases sum {split['phase_sum_ms']:.1f} ms)",
                 f"{'phase':<24}{'ms':>9}{'% step':>8}"]
        rows += [f"{phase:<24}{v['ms']:>9.2f}{v['pct']:>7.1f}%" for phase, v in split["phases"].items()]
    return rows


def profile_rows(rows_by_model: dict) -> list[str]:
    """The profile of each profiled row: its top ops by self device (CPU) time per step."""
    rows = []
    for name, r in rows_by_model.items():
        if "profile" not in r:
            continue
        prof = r["profile"]
        rows += [f"{name}: profile by {prof['time']} per step (step {prof['step_ms']:.1f} ms, "
                 f"busy {prof['busy_ms_per_step']:.1f} ms)", f"{'op':<60}{'ms':>9}{'% step':>8}{'calls':>7}"]
        for what in ("ops", "kernels", "python"):
            if prof[what]:
                rows.append(f"{name}: top {what}")
            rows += [f"{op['name'][:59]:<60}{op['ms_per_step']:>9.2f}{op['pct_of_step']:>7.1f}%"
                     f"{op['calls_per_step']:>7.0f}" for op in prof[what]]
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config, batch 2 x 32, 1 step, on whatever device is here")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=64, help="SSD chunk (the ZebraConfig default is 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-flops", type=float, default=790e12, help="peak FLOP/s for the utilisation")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each model's decoder layers (regional, as the stages on a GPU)")
    parser.add_argument("--compiled-norms", choices=("formula", "kernel"), default="formula",
                        help="with --compile: the RMSNorms as inductor's fused formula (the stages) or our kernels")
    parser.add_argument("--models", nargs="+", choices=LM_MODELS + KD_MODELS,
                        help=f"train-step rows to run (default: {' '.join(LM_MODELS)}; the KD rows only when named)")
    parser.add_argument("--profile", action="store_true",
                        help="profile --profile-steps more steps of each row: top ops by self device time")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--kd-temperature", type=float, default=1.0, help="KD rows: kd_loss temperature")
    parser.add_argument("--kd-top-k", type=int, default=None, help="KD rows: teacher top-k (default: full vocab)")
    parser.add_argument("--kd-ce-weight", type=float, default=0.0, help="KD rows: kd_loss ce_weight")
    parser.add_argument("--zero-stage", type=int, choices=(2, 3), default=2, help="kd_deepspeed: ZeRO stage")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
