"""One trial of `zebra tune`, a Ray Tune function trainable: compose the arm's hybrid from the shared
ILD students by the shared SMART scores, cut its MLA ranks (zebra.truncate), distil it from the
teacher with plain AdamW in this process, and report held-out KL and perplexity every eval_every steps.

Every report carries a checkpoint (weights, optimizer, step), so a trial restored after an
interruption continues from its last report instead of starting over; `start_step` in the
metrics says where this launch began.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ray import tune
from torch import Tensor, nn

from cluster.storage import LocalStorage, Storage
from jobs.stages.common import compose_hybrid, held_out_kl, load_teacher_model, teacher_logits
from zebra.data import PackedDataset
from zebra.losses import kd_loss
from zebra.smart import select_mla_layers
from zebra.truncate import truncate_ranks

from .space import Arm

log = logging.getLogger(__name__)

GRAD_CLIP = 1.0  # as jobs.train
BETAS = (0.9, 0.95)
STATE_FILE = "trial.pt"


@dataclasses.dataclass(frozen=True)
class SharedStudents:
    """What the shared sub-run of one qk_rope_dim left: its storage (ild/mla, ild/mamba) and SMART's scores."""

    storage: Storage
    scores: list[float]


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs besides its arm; Ray Tune ships it once through the object store."""

    teacher_dir: str
    teacher_dtype: str
    shared: dict[int, SharedStudents]  # by qk_rope_dim
    arms: dict[str, Arm]  # by Arm.key, the value Tune searches over
    train_ids: np.ndarray  # [n, seq_len] int64 packed token sequences
    held_ids: np.ndarray  # [n_held, seq_len] int64, never trained on
    steps: int
    eval_every: int
    micro_batch: int
    lr: float
    temperature: float
    ce_weight: float
    seed: int
    keep_terminal: bool
    min_spacing: int | None
    threads: int
    use_gpu: bool
    memory_bytes: int | None  # on GPU: the CUDA allocation cap of the trial


def run_trial(config: dict, plan: TrialPlan) -> None:
    """The trainable: config {"arm": Arm.key}; reports kl, ppl, step, kv_* and more to Ray Tune."""
    arm = plan.arms[config["arm"]]
    device = _device(plan)
    torch.manual_seed(plan.seed)
    hybrid, layers = build_hybrid(plan, arm)
    hybrid = hybrid.to(device).train()
    teacher = load_teacher_model(plan.teacher_dir, plan.teacher_dtype).to(device)
    optimizer = torch.optim.AdamW(hybrid.parameters(), lr=plan.lr, betas=BETAS, weight_decay=0.0)
    start = _restore(hybrid, optimizer, device)
    data = PackedDataset(plan.train_ids, seed=plan.seed)
    data.position = start * plan.micro_batch
    held = torch.tensor(plan.held_ids, device=device)  # a copy: arrays from Ray's object store are read-only
    with _autocast(device):
        held_logits = teacher_logits(teacher, held)
    fixed = {"kv_bytes_per_token": arm.kv_bytes_per_token, "kv_fraction": arm.kv_fraction, "num_mla": arm.num_mla,
             "mla_layers": ",".join(map(str, layers)), "start_step": start}
    for step in range(start + 1, plan.steps + 1):
        batch = torch.from_numpy(data.next_batch(plan.micro_batch)).to(device)
        loss = _train_step(hybrid, teacher, optimizer, batch, plan)
        if step % plan.eval_every == 0 or step == plan.steps:
            metrics = {**evaluate(hybrid, held_logits, held), "step": step, "loss": loss,
                       "tokens": step * plan.micro_batch * batch.shape[1], **fixed}
            if device.type == "cuda":  # against tune.memory_budget_gb and the estimate of tune.space
                metrics["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            _report(metrics, hybrid, optimizer, step)


def build_hybrid(plan: TrialPlan, arm: Arm) -> tuple[nn.Module, list[int]]:
    """(the arm's hybrid at its ranks, its MLA layers), from the shared students of its qk_rope_dim."""
    shared = plan.shared[arm.qk_rope_dim]
    layers = select_mla_layers(shared.scores, arm.num_mla, plan.keep_terminal, plan.min_spacing)
    with _local_copy(shared.storage, "ild/mla") as mla_dir, _local_copy(shared.storage, "ild/mamba") as mamba_dir:
        full = compose_hybrid(str(mla_dir), str(mamba_dir), layers)
    return truncate_ranks(full, arm.kv_rank, arm.q_rank), layers


@contextlib.contextmanager
def _local_copy(storage: Storage, key: str):
    """A local folder holding key: the storage's own for local storage, else a download private to
    this trial (S3Storage.fetch_dir shares one cache folder, which trials running side by side would race on)."""
    if isinstance(storage, LocalStorage):
        yield storage.fetch_dir(key)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield storage.download_dir(key, tmp)


def _train_step(hybrid: nn.Module, teacher: nn.Module, optimizer, batch: Tensor, plan: TrialPlan) -> float:
    """One AdamW step on the KD loss of batch [micro_batch, seq_len]; returns the loss."""
    with _autocast(batch.device):
        with torch.no_grad():
            target = teacher(batch).logits
        logits = hybrid(batch).logits
    labels = batch if plan.ce_weight > 0 else None
    loss = kd_loss(logits, target.float(), plan.temperature, plan.ce_weight, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(hybrid.parameters(), GRAD_CLIP)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate(model: nn.Module, held_logits: Tensor, held: Tensor) -> dict[str, float]:
    """{"kl": KL(teacher || model) per token, "ppl": exp(next-token cross-entropy)} on held [n, seq]."""
    model.eval()
    with _autocast(held.device):
        kl = held_out_kl(model, held_logits, held)
        ce = held_out_ce(model, held)
    model.train()
    return {"kl": kl, "ppl": math.exp(ce)}


@torch.no_grad()
def held_out_ce(model: nn.Module, ids: Tensor, batch: int = 4) -> float:
    """Mean cross-entropy (nats) of the next token over ids [n, seq] (seq - 1 predictions per row)."""
    total = 0.0
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch]
        logits = model(chunk).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    return total / (len(ids) * (ids.shape[1] - 1))


def _report(metrics: dict, hybrid: nn.Module, optimizer, step: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = {"model": hybrid.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        torch.save(state, Path(tmp) / STATE_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _restore(hybrid: nn.Module, optimizer, device: torch.device) -> int:
    """Load the trial's last checkpoint, if this launch resumes one; returns the step to continue after."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
    hybrid.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("trial resumes after step %d", state["step"])
    return state["step"]


class TrialLog(tune.Callback):
    """One log line per finished trial (Ray Tune calls it in the driver)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result
        early = " (stopped early by ASHA)" if r.get("step", 0) < self.steps else ""
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials) + 1  # this one is not marked yet
        log.info("trial %s %s: held-out KL %.4f, perplexity %.2f, KV %.2f%% at step %d%s [%d/%d done]",
                 trial.trial_id, trial.config.get("arm"), r.get("kl", math.nan), r.get("ppl", math.nan),
                 100 * r.get("kv_fraction", math.nan), r.get("step", 0), early, done, len(trials))


def _device(plan: TrialPlan) -> torch.device:
    torch.set_num_threads(plan.threads)
    if not plan.use_gpu:
        return torch.device("cpu")
    device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU
    if plan.memory_bytes is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, plan.memory_bytes / total), device)
    return device


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (weights and optimizer states stay float32); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
