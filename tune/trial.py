"""One trial of `zebra tune`, a Ray Tune function trainable: a short KD run of the pipeline's own recipe.

The trial composes its arm's hybrid from the shared ILD students by the shared SMART scores, cuts
its MLA ranks (zebra.truncate), and trains it with jobs.context.kd_recipe (the kd stage's
TrainConfig, teacher and objective, with the tune section's steps, batch and learning rate) through
jobs.train.distill_in_tune: the recipe's worker loop in the trial's process, one DeepSpeed rank,
the teacher in-process. Every tune.eval_every steps it reports held-out KL and perplexity to Tune
with a checkpoint, so a trial restored after an interruption continues from its last report
(`resumed_from` in the metrics says where this launch began).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import tempfile

import numpy as np
import torch
from ray import tune
from torch import nn

from cluster.storage import LocalStorage, Storage
from jobs.context import batches, kd_recipe
from jobs.spec import JobSpec
from jobs.train import Objective, TrainConfig, distill_in_tune
from zebra.hybrid import compose_hybrid
from zebra.smart import select_mla_layers
from zebra.truncate import truncate_ranks

from .space import Arm

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SharedStudents:
    """What the shared sub-run of one qk_rope_dim left: its storage (ild/mla, ild/mamba) and SMART's scores."""

    storage: Storage
    scores: list[float]


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs besides its arm; Ray Tune ships it once through the object store."""

    spec: JobSpec  # its kd and tune sections make the recipe
    teacher_dir: str
    shared: dict[int, SharedStudents]  # by qk_rope_dim
    arms: dict[str, Arm]  # by Arm.key, the value Tune searches over
    train_ids: np.ndarray  # [n, seq_len] int64 packed token sequences
    held_ids: np.ndarray  # [n_held, seq_len] int64, never trained on


def trial_recipe(plan: TrialPlan) -> tuple[TrainConfig, functools.partial, Objective]:
    """The kd stage's recipe (jobs.context.kd_recipe) at the tune section's length, batch, learning
    rate and resources: one worker, the teacher in-process, a report and a checkpoint every eval_every steps,
    the student's layers eager unless kd.compile is True."""
    spec, t = plan.spec, plan.spec.tune
    use_gpu = t.gpus_per_trial > 0
    return kd_recipe(spec, plan.teacher_dir, workers=1, total_steps=t.steps, micro_batch=t.micro_batch,
                     seq_len=t.seq_len, lr=t.lr or spec.kd.lr, use_gpu=use_gpu, bf16=spec.kd.bf16 if use_gpu else False,
                     teacher_mode="inprocess", log_every=t.eval_every, checkpoint_every=t.eval_every,
                     # a trial is tens of steps, each arm's shapes its own graphs: kd.compile "auto" does not pay here
                     compile=spec.kd.compile is True, cuda_graphs=spec.kd.cuda_graphs is True)


def run_trial(config: dict, plan: TrialPlan) -> None:
    """The trainable: config {"arm": Arm.key}; reports kl, ppl, step, loss, kv_* and more to Ray Tune."""
    arm = plan.arms[config["arm"]]
    t = plan.spec.tune
    torch.set_num_threads(max(1, int(t.cpus_per_trial)))
    if t.gpus_per_trial > 0 and t.memory_budget_gb is not None:  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, t.memory_budget_gb * 2**30 / total), 0)
    layers = arm_layers(plan, arm)
    cfg, teacher_factory, objective = trial_recipe(plan)
    student_factory = functools.partial(build_hybrid, plan.shared[arm.qk_rope_dim].storage, layers, arm.kv_rank,
                                        arm.q_rank)
    tags = {"kv_bytes_per_token": arm.kv_bytes_per_token, "kv_fraction": arm.kv_fraction, "num_mla": arm.num_mla,
            "mla_layers": ",".join(map(str, layers))}
    data = functools.partial(batches, plan.train_ids, plan.spec.seed, cfg.micro_batch)
    distill_in_tune(cfg, student_factory, teacher_factory, objective, data, held_out=plan.held_ids, tags=tags)


def arm_layers(plan: TrialPlan, arm: Arm) -> list[int]:
    """The arm's MLA layers: SMART's choice of arm.num_mla layers by the shared scores."""
    st = plan.spec.student
    return select_mla_layers(plan.shared[arm.qk_rope_dim].scores, arm.num_mla, st.keep_terminal, st.min_spacing,
                             st.placement)


def build_hybrid(storage: Storage, layers: list[int], kv_rank: int, q_rank: int | None) -> nn.Module:
    """The hybrid of the shared students in storage with MLA at `layers`, its MLA ranks cut to
    kv_rank / q_rank where they are below the students' (at the students' ranks: the hybrid as composed)."""
    with _local_copy(storage, "ild/mla") as mla_dir, _local_copy(storage, "ild/mamba") as mamba_dir:
        full = compose_hybrid(str(mla_dir), str(mamba_dir), layers)
    if (kv_rank, q_rank) == (full.config.kv_rank, full.config.q_rank):
        return full
    return truncate_ranks(full, kv_rank, q_rank)


@contextlib.contextmanager
def _local_copy(storage: Storage, key: str):
    """A local folder holding key: the storage's own for local storage, else a download private to
    this trial (S3Storage.fetch_dir shares one cache folder, which trials running side by side would race on)."""
    if isinstance(storage, LocalStorage):
        yield storage.fetch_dir(key)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield storage.download_dir(key, tmp)


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
