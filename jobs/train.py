"""The one training recipe: DeepSpeed ZeRO on Ray Train, for ILD, KD, DPO and Tune trials alike.

    result = distill(cfg, student_factory, teacher_factory, objective, data_factory, storage_path, run_name)
    distill_in_tune(cfg, student_factory, teacher_factory, objective, data_factory, held_out)  # a Tune trial

What differs between the stages is the data and the Objective (ILD: the teacher's hidden states,
KD: its logits, DPO: the reference model's log-probs in the teacher's role). A Tune trial runs the
same worker loop (train_worker) in its own process as one DeepSpeed rank and reports to Tune.

Each Ray Train worker builds the student, wraps it in a DeepSpeed engine (ZeRO-2 or 3), starts a
teacher beside itself (cluster.teacher), and takes `total_steps` optimizer steps over its shard
of the data. Every `checkpoint_every` steps, and at the end, all ranks write a DeepSpeed
checkpoint into one Ray Train checkpoint; a restarted worker group (FailureConfig) or a rerun of
the same run_name loads the latest and continues at its step and data position. The final
checkpoint also holds the student's full float32 state_dict (STUDENT_STATE_FILE).

A checkpoint is staged in a temporary folder ($TMPDIR) and copied by Ray Train into the run's storage;
only a copy that completed is recorded (checkpoint_manager_snapshot.json), so a write that fails
leaves the previous checkpoint the one to resume from. A write that fails for want of space raises
cluster.storage.StorageFull naming the folder, its free bytes and the fix; distill re-raises it.

A checkpoint counts once Ray Train's controller has committed it (its next poll of the workers,
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a worker lost inside that window restarts from the one before.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import deepspeed
import numpy as np
import ray
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Empty, Queue
from torch import Tensor, nn
from tqdm import tqdm

from cluster.placement import teacher_cpus_that_fit, worker_resources
from cluster.preflight import check_shared_storage
from cluster.storage import StorageFull, explain_disk_full
from cluster.teacher import TEACHER_MODES, RemoteTeacher, map_tensors, start_teacher
from jobs.relay import RelayReports
from zebra.cuda_graphs import graph_forward
from zebra.hybrid import held_out_ce, held_out_kl
from zebra.losses import kd_loss
from zebra.modeling import compile_decoder_layers

log = logging.getLogger(__name__)

STUDENT_STATE_FILE = "student_fp32.pt"
DS_TAG = "deepspeed"  # the DeepSpeed checkpoint's folder inside a Ray Train checkpoint
FAULT_STEP_ENV = "ZEBRA_FAULT_AT_STEP"  # test hook: the last rank exits at the start of this step ...
COMPILE_BACKEND_ENV = "ZEBRA_COMPILE_BACKEND"  # torch.compile's backend for compiled layers (default inductor)
FAULT_MARKER_ENV = "ZEBRA_FAULT_MARKER"  # ... once: it creates this file first and never fires if it exists
STAGING_FIX = ("free space there, or start Ray with TMPDIR set to a folder on a larger disk (each worker stages its "
               "checkpoint there before Ray Train copies it into the run's storage)")

Batch = dict[str, Tensor]  # "input_ids" [micro_batch, seq_len] int64, plus whatever the objective reads
DataFactory = Callable[[int, int, int], Iterable[Batch]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One distillation run. Steps are optimizer steps; a step takes grad_accum micro-batches per worker."""

    workers: int = 2
    use_gpu: bool = False
    zero_stage: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.1  # of total_steps, linear warmup (lr_ratio: the first step is never at lr 0)
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio (the official configs: to zero)
    grad_clip: float = 1.0  # max gradient norm, per optimizer parameter group (ILD: per student)
    total_steps: int = 100
    micro_batch: int = 4
    seq_len: int = 128
    grad_accum: int = 1
    bf16: bool | str = False  # GPU only; "auto": where the worker's GPU supports it (decided in the worker)
    # torch.compile the student's decoder layers (zebra.modeling.compile_decoder_layers); "auto": on GPU
    # workers (on the CPU the compile takes longer than the short runs it would speed up). ZeRO-2 only:
    # ZeRO-3 gathers parameters in hooks on every submodule, which a compiled layer would trace into.
    compile: bool | str = False
    # Replay the student's forward and backward from CUDA graphs (zebra.cuda_graphs.graph_forward), captured at
    # the first step: one launch instead of thousands a micro-batch, for a step bound by the host. "auto": on
    # GPU workers under ZeRO-2 (ZeRO-3 gathers parameters in hooks that a graph cannot replay).
    cuda_graphs: bool | str = False
    teacher_mode: str = "actor"  # "actor" | "inprocess"
    teacher_cpus: float = 0.5  # CPUs Ray reserves for each teacher actor
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    seed: int = 0
    # Report (and log) every this many steps, and at each checkpoint; metrics average the steps between.
    # Ray Train consumes one report per controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by
    # default) and blocks the next, so reports closer together than that stall training.
    log_every: int = 10

    def __post_init__(self):
        _require(self.zero_stage in (2, 3), "zero_stage", self.zero_stage, "2 or 3")
        _require(self.teacher_mode in TEACHER_MODES, "teacher_mode", self.teacher_mode, f"one of {TEACHER_MODES}")
        _require(self.bf16 in (True, False, "auto"), "bf16", self.bf16, 'True, False or "auto"')
        _require(self.bf16 is not True or self.use_gpu, "bf16", self.bf16, "False or \"auto\" when use_gpu is False")
        _require(self.compile in (True, False, "auto"), "compile", self.compile, 'True, False or "auto"')
        _require(self.compile is not True or self.zero_stage == 2, "compile", self.compile,
                 'False or "auto" with zero_stage 3')
        _require(self.cuda_graphs in (True, False, "auto"), "cuda_graphs", self.cuda_graphs, 'True, False or "auto"')
        _require(self.cuda_graphs is not True or (self.use_gpu and self.zero_stage == 2), "cuda_graphs",
                 self.cuda_graphs, 'False or "auto" without use_gpu or with zero_stage 3')
        _require(0.0 <= self.warmup_frac < 1.0, "warmup_frac", self.warmup_frac, "in [0, 1)")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _require(self.grad_clip > 0.0, "grad_clip", self.grad_clip, "> 0")
        for name in ("workers", "total_steps", "micro_batch", "seq_len", "grad_accum", "checkpoint_every", "log_every"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all workers."""
        return self.workers * self.grad_accum * self.micro_batch * self.seq_len

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_frac * self.total_steps)


def _require(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{field}={value!r}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a stage trains the student on; both callables must pickle (module-level or partials).

    teacher_targets(teacher, batch) -> targets     asks the teacher (LocalTeacher or RemoteTeacher)
    loss(student, targets, batch) -> scalar Tensor runs the student (the DeepSpeed engine, called
                                                   like the module) and scores it
    """

    teacher_targets: Callable[[Any, Batch], Any]
    loss: Callable[[nn.Module, Any, Batch], Tensor]


def kd_objective(temperature: float = 1.0, top_k: int | None = None, ce_weight: float = 0.0,
                 backend: str = "auto") -> Objective:
    """Logit distillation: zebra.losses.kd_loss of the student's logits against the teacher's
    (top_k: the teacher sends only its k most likely tokens per position; backend: kd_loss's)."""
    return Objective(
        functools.partial(_kd_targets, top_k=top_k, temperature=temperature),
        functools.partial(_kd_loss, temperature=temperature, ce_weight=ce_weight, backend=backend),
    )


def _kd_targets(teacher, batch: Batch, top_k: int | None, temperature: float):
    return teacher.logits(batch["input_ids"], top_k, temperature)


def _kd_loss(student: nn.Module, targets, batch: Batch, temperature: float, ce_weight: float,
             backend: str = "auto") -> Tensor:
    logits = student(batch["input_ids"]).logits
    labels = batch.get("labels", batch["input_ids"]) if ce_weight > 0 else None
    return kd_loss(logits, targets, temperature, ce_weight, labels, backend=backend)


@dataclasses.dataclass
class DistillResult:
    """Ray Train's Result (final checkpoint, path, error) and every metrics report of rank 0, in
    order, across worker-group restarts (a restart repeats the steps after its checkpoint)."""

    result: ray.train.Result
    history: list[dict]

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's full float32 state_dict from the final checkpoint."""
        with self.result.checkpoint.as_directory() as d:
            return torch.load(Path(d) / STUDENT_STATE_FILE, map_location="cpu", weights_only=True)


def distill(
    cfg: TrainConfig,
    student_factory: Callable[[], nn.Module],
    teacher_factory: Callable[[], nn.Module],
    objective: Objective,
    data_factory: DataFactory,
    storage_path: str,
    run_name: str,
) -> DistillResult:
    """Train the student on `objective` with cfg.workers Ray Train workers; call with Ray connected.

    student_factory()   the student in float32 on CPU, identical on every call (seed it)
    teacher_factory()   the teacher in eval mode on CPU (cluster.teacher moves it to the device)
    data_factory(rank, world_size, start) -> iterable of this rank's micro-batches, beginning after
                        the first `start` of them (start = optimizer steps done * grad_accum), each
                        {"input_ids": [micro_batch, seq_len] int64, ...}
    storage_path, run_name  where Ray Train keeps checkpoints: storage_path/run_name; a rerun with
                        the same pair resumes from the latest checkpoint
    """
    if cfg.teacher_mode == "actor":  # where the workers fill the cluster's CPUs, the teachers' share shrinks
        cfg = dataclasses.replace(cfg, teacher_cpus=teacher_cpus_that_fit(cfg.workers, worker_resources(cfg.use_gpu),
                                                                          cfg.teacher_cpus))
    queue = Queue(actor_options={"num_cpus": 0})
    loop_config = dict(cfg=cfg, student_factory=student_factory, teacher_factory=teacher_factory,
                       objective=objective, data_factory=data_factory)
    trainer = _trainer(cfg, loop_config, storage_path, run_name, RelayReports(queue))
    history: list[dict] = []
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(queue, cfg.total_steps, history, stop), daemon=True)
    follower.start()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        full = disk_full_cause(e)
        if full is None:
            raise
        raise full from e  # the worker's message, not Ray's traceback of it
    finally:
        stop.set()
        follower.join()
        queue.shutdown()
    return DistillResult(result, history)


def disk_full_cause(error: BaseException) -> StorageFull | None:
    """The StorageFull a training worker raised, if one did; Ray Train hands worker errors to the driver
    in WorkerGroupError.worker_failures, each wrapped with its traceback (the wrapper's _base_exc)."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        base = getattr(failure, "_base_exc", failure)
        if isinstance(base, StorageFull):
            return base
    return None


def _trainer(cfg: TrainConfig, loop_config: dict, storage_path: str, run_name: str, relay: UserCallback):
    return TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=worker_resources(cfg.use_gpu)
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": _worker_env(cfg)},
            callbacks=[relay],
        ),
    )


def _worker_env(cfg: TrainConfig) -> dict[str, str]:
    """DeepSpeed picks its accelerator when imported: tell CPU workers before they import it."""
    env = {} if cfg.use_gpu else {"DS_ACCELERATOR": "cpu"}
    env.update({k: os.environ[k] for k in (FAULT_STEP_ENV, FAULT_MARKER_ENV, COMPILE_BACKEND_ENV) if k in os.environ})
    return env


def distill_in_tune(
    cfg: TrainConfig,
    student_factory: Callable[[], nn.Module],
    teacher_factory: Callable[[], nn.Module],
    objective: Objective,
    data_factory: DataFactory,
    held_out: np.ndarray | None = None,
    tags: dict | None = None,
) -> None:
    """Inside a Ray Tune function trainable: train_worker in this process as the only DeepSpeed rank
    (cfg.workers must be 1), reporting each report's metrics (and checkpoints) to Tune, and resuming
    from the trial's checkpoint when Tune restores it. held_out [n, seq_len] int64: token sequences
    whose KL(teacher || student) and perplexity every report carries ("kl", "ppl"); tags: constant
    metrics added to every report."""
    from ray import tune

    _require(cfg.workers == 1, "workers", cfg.workers, "1 in a Tune trial (one process, one DeepSpeed rank)")
    if not dist.is_initialized():  # one rank: a process group of its own (reused when Tune reuses the actor)
        dist.init_process_group("nccl" if cfg.use_gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it (Ray Train sets it for its workers)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    session = Session(rank=0, world=1, device=device, get_checkpoint=tune.get_checkpoint,
                      report=lambda metrics, folder: tune.report(
                          {**metrics, **(tags or {})},
                          checkpoint=None if folder is None else tune.Checkpoint.from_directory(folder)))
    config = dict(cfg=cfg, student_factory=student_factory, teacher_factory=teacher_factory, objective=objective,
                  data_factory=data_factory, held_out=held_out)
    train_worker(config, session)


def _follow(queue: Queue, total_steps: int, history: list[dict], stop: threading.Event) -> None:
    """Driver thread: collect the relayed metrics into `history` and show them on a progress bar."""
    with tqdm(total=total_steps, desc="distill", unit="step") as bar:
        while not (stop.is_set() and queue.empty()):
            try:
                metrics = queue.get(timeout=0.5)
            except Empty:
                continue
            history.append(metrics)
            bar.n = metrics["step"]
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")


# -- the worker loop: in each Ray Train worker, or in a Tune trial's process ----------------------


@dataclasses.dataclass(frozen=True)
class Session:
    """Where the worker loop runs: its rank among `world`, its device, and where it reports.

    get_checkpoint() -> the Checkpoint to resume from, or None
    report(metrics, folder)  hands metrics, and a checkpoint folder or None, to Ray Train or Tune
    storage_dir              the local folder report copies checkpoints into (for a disk-full message), or None
    """

    rank: int
    world: int
    device: torch.device
    get_checkpoint: Callable[[], Checkpoint | None]
    report: Callable[[dict, str | None], None]
    storage_dir: str | None = None


def _train_loop(config: dict) -> None:
    """Ray Train's entry point in each worker."""
    ctx = ray.train.get_context()
    storage = ctx.get_storage()  # checkpoints go there: every worker must write it and see the others' files
    session = Session(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=_device(config["cfg"].use_gpu),
                      get_checkpoint=ray.train.get_checkpoint,
                      report=lambda metrics, folder: ray.train.report(
                          metrics, checkpoint=None if folder is None else Checkpoint.from_directory(folder)),
                      storage_dir=storage.experiment_fs_path)
    check_shared_storage(storage.storage_filesystem, storage.experiment_fs_path, session.rank, session.world,
                         dist.barrier)
    train_worker(config, session)


def train_worker(config: dict, session: Session) -> None:
    """The recipe, read top to bottom: the teacher beside this worker, the student in a DeepSpeed
    engine, resume, then total_steps optimizer steps with a report every log_every steps and a
    checkpoint every checkpoint_every steps and at the end."""
    cfg: TrainConfig = config["cfg"]
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(cfg.seed)
    # A teacher actor starts up while DeepSpeed sets up the student.
    teacher = start_teacher(config["teacher_factory"], cfg.teacher_mode, device, cfg.teacher_cpus)
    engine = _engine(cfg, _compiled(config["student_factory"](), cfg), world)
    done = _resume(engine, session.get_checkpoint())
    batches = iter(config["data_factory"](rank, world, done * cfg.grad_accum))
    left = (cfg.total_steps - done) * cfg.grad_accum  # micro-batches this worker still takes
    targets = TargetsAhead(batches, teacher, config["objective"], cfg, device, left)
    _graphed(engine, cfg, targets)
    held_out = _HeldOut(config.get("held_out"), teacher, device)
    window = _Window()
    try:  # a failed step leaves no request of the thread running on
        for step in range(done + 1, cfg.total_steps + 1):
            _maybe_fault(step, rank, world, cfg.checkpoint_every)
            window.add(_optimizer_step(engine, config["objective"], targets, cfg, device))
            checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.total_steps
            report = checkpoint or step % cfg.log_every == 0
            if step == done + 1:
                _first_step(window, step, rank, cfg, clock_restart=not report)
            if not report:
                continue
            metrics = {**window.flush(step, cfg, engine.get_lr()[0], resumed_from=done), **held_out.metrics(engine)}
            if rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step, cfg.total_steps, metrics["loss"],
                         metrics["lr"], metrics["tokens_per_s"])
            if checkpoint:
                _report_checkpoint(engine, metrics, session, final=step == cfg.total_steps)
            else:
                session.report(metrics, None)
            window.restart()  # the held-out figures and the checkpoint are no step's time
    finally:
        targets.close()


class _HeldOut:
    """KL(teacher || student) per token and perplexity on held-out sequences [n, seq_len] (none: no
    metrics). The teacher's logits are taken once and kept in host memory. Every rank evaluates
    (under ZeRO-3 a forward pass is collective)."""

    def __init__(self, ids: np.ndarray | None, teacher, device: torch.device):
        self.ids = None if ids is None else torch.tensor(np.asarray(ids), dtype=torch.int64, device=device)
        self.teacher, self.logits = teacher, None

    def metrics(self, engine) -> dict[str, float]:
        if self.ids is None:
            return {}
        if self.logits is None:
            self.logits = torch.cat([self.teacher.logits(self.ids[s:s + 4]).float().cpu()
                                     for s in range(0, len(self.ids), 4)])
        module = engine.module
        module.eval()
        with _autocast(engine):
            kl, ce = held_out_kl(module, self.logits, self.ids), held_out_ce(module, self.ids)
        module.train()
        return {"kl": kl, "ppl": math.exp(ce)}


def _autocast(engine):
    """bf16 autocast for evaluation when the engine trains in bf16 (its weights are bf16 then)."""
    if engine.bfloat16_enabled():
        return torch.autocast(engine.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _first_step(window: _Window, step: int, rank: int, cfg: TrainConfig, clock_restart: bool) -> None:
    """After a worker group's first step: wait for it, log its time (set-up work that no later step repeats:
    Triton's and torch.compile's compiles, cuDNN's and cuBLAS's first calls) and, unless the step is reported
    now, restart the window's clock, so that the first report's speed is the steady steps' (its loss still
    averages every step)."""
    window.losses[-1].item()
    seconds = time.perf_counter() - window.start
    if rank == 0:
        extra = "".join(text for on, text in (
            (resolve_compile(cfg.compile, cfg.use_gpu, cfg.zero_stage), ", torch.compile of the layers"),
            (resolve_cuda_graphs(cfg.cuda_graphs, cfg.use_gpu, cfg.zero_stage), ", the CUDA graphs' capture")) if on)
        log.info("step %d took %.1f s: the first of these workers (first calls, kernel compiles%s); speeds count "
                 "from the next", step, seconds, extra)
    if clock_restart:
        window.restart()


class _Window:
    """The steps since the last report: their losses, kept on the device until the report reads them all at
    once (a host read every step would drain the GPU's queue every step, and a host-bound step then pays
    its launch time in full), and the wall time from the clock's (re)start to that read, over the steps
    added since then."""

    def __init__(self):
        self.losses: list[Tensor] = []
        self.restart()

    def restart(self) -> None:
        """Restart the clock; the losses stay until the report reads them."""
        self.start, self.timed = time.perf_counter(), 0

    def add(self, loss: Tensor) -> None:
        self.losses.append(loss)
        self.timed += 1

    def flush(self, step: int, cfg: TrainConfig, lr: float, resumed_from: int) -> dict:
        """The report's metrics (loss over the window's steps, speed over the steps since the clock's
        restart); starts a new window's losses."""
        n, losses = len(self.losses), torch.stack(self.losses).tolist()  # waits for the window's steps
        seconds = time.perf_counter() - self.start
        metrics = {
            "step": step, "loss": sum(losses) / n, "lr": lr, "tokens": step * cfg.tokens_per_step,
            "tokens_per_s": self.timed * cfg.tokens_per_step / seconds, "step_s": seconds / self.timed,
            "resumed_from": resumed_from,
        }
        if cfg.use_gpu:  # this worker's peak allocated GPU memory so far (the teacher's too when in-process)
            metrics["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.losses = []
        return metrics


def _device(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    return device


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed config of a run: ZeRO stage and bf16. The optimizer (GroupClippedAdamW, which
    also clips and guards against non-finite gradients) and the LR schedule (lr_ratio) are handed to
    deepspeed.initialize by _engine, so DeepSpeed's own clipping is off, and where the installed
    DeepSpeed has the switches, so are its global gradient norm (ZeRO-1/2: a float64 pass over every
    gradient and an all-reduce that nothing reads) and its bf16 overflow check (an all-reduce and a host
    sync every step). ZeRO-1/2 packs the weights into one flat buffer, each right after the one before: a
    hybrid's 9-element vectors (dt_bias, A_log, D) leave the matrices after them off 16-byte alignment, and
    cuBLAS then runs their products on slow fallback kernels (measured on an H200: the student forward
    110 ms instead of 69 ms); parameter_alignment pads each weight to 16 bytes. (A checkpoint saved without
    it does not resume with it: DeepSpeed says so.) DeepSpeed's throughput timer, which we do not read, is
    off: it synchronised the device at every engine forward and step, so the host could not queue the
    student's kernels while the GPU ran the teacher's (two drains a step of a partly host-bound step)."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2) and _deepspeed_has("zero", "compute_grad_norm"):
        zero["compute_grad_norm"] = False
    if cfg.zero_stage in (1, 2) and _deepspeed_has("zero", "parameter_alignment"):
        zero["parameter_alignment"] = True  # every weight 16-byte aligned in ZeRO's flat buffer (see below)
    bf16: dict = {"enabled": resolve_bf16(cfg.bf16, cfg.use_gpu)}
    if _deepspeed_has("bf16", "check_grad_overflow"):
        bf16["check_grad_overflow"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # GroupClippedAdamW: torch's AdamW plus clipping
        "bf16": bf16,
        "steps_per_print": cfg.total_steps + 1,  # we log; keep DeepSpeed's own step lines out
        "timers": {"throughput": {"enabled": False}},  # it synchronises the device at every forward and step
    }


@functools.cache
def _deepspeed_has(section: str, key: str) -> bool:
    """Whether the installed DeepSpeed's config section ("zero" or "bf16") knows `key` (it rejects unknown keys)."""
    if section == "zero":
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig as model
    else:
        try:
            from deepspeed.runtime.precision_config import DeepSpeedBF16Config as model
        except ImportError:  # older DeepSpeed: no bf16 config model, and no such switch
            return False
    return key in model.model_fields


def lr_ratio(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based) over the peak: linear warmup over
    `warmup` steps starting at 1/warmup (never 0: a one-step warmup is the peak), then a cosine
    from 1 at step `warmup` to min_ratio at step `total` (the official configs: AdamW, warmup,
    cosine to zero; as transformers' get_cosine_schedule_with_warmup with min_ratio 0, whose
    warmup starts at 0; DeepSpeed's WarmupCosineLR would warm up over at least 2 steps, by default
    on a log curve)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR scheduler DeepSpeed steps once per optimizer step (and checkpoints)."""
    ratio = functools.partial(lr_ratio, warmup=cfg.warmup_steps, total=cfg.total_steps, min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, ratio)


class GroupClippedAdamW(torch.optim.AdamW):
    """torch's AdamW that first clips each parameter group's gradient to norm max_norm on its own
    (ILD: one group per student, as the official code clips each student separately; one group:
    ordinary global-norm clipping).

    Under DeepSpeed ZeRO a group's parameters are one flat fp32 partition per rank, and ZeRO calls
    step() one group at a time: a group's norm is the all-reduced (sum over ranks) square sum of
    the partitions this process holds. (ZeRO-3 splits a group over 1e12 elements into sub-groups,
    clipped apart.) Each group's norm before clipping is left in group["grad_norm"] (a 0-d tensor: reading
    it is the caller's host sync, not every step's). A group whose norm is not finite steps with a zero
    gradient (its weights only decay) instead of spreading NaN into the weights and moments: the guard
    DeepSpeed's bf16 overflow check gave, without its host sync.
    torch's AdamW everywhere: DeepSpeed's FusedAdam needs a CUDA JIT build and its CPUAdam a C++
    one; torch's fused kernel covers the GPU and its foreach path the CPU.
    """

    def __init__(self, params, max_norm: float, **adamw):
        super().__init__(params, **adamw)
        self.max_norm = max_norm

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not group["params"]:
                continue  # ZeRO-3 empties the groups it is not stepping (the same ones on every rank)
            device = group["params"][0].device
            square = sum((g.float().square().sum() for g in grads), torch.zeros((), device=device))
            if dist.is_initialized():
                dist.all_reduce(square)
            norm = square.sqrt()
            group["grad_norm"] = norm
            finite = torch.isfinite(norm)
            scale = torch.where(finite, (self.max_norm / (norm + 1e-6)).clamp(max=1.0), 0.0)
            for g in grads:  # in place: a finite group has nothing to replace; a non-finite one ends all zeros
                g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(scale.to(g.dtype))
        return super().step(closure)


def resolve_bf16(setting: bool | str, use_gpu: bool) -> bool:
    """A bf16 setting (True, False, "auto") for this process: "auto" asks its GPU, so call it in the
    worker (the driver may have no GPU, or another one). Never bf16 without a GPU."""
    return use_gpu and (setting is True or (setting == "auto" and torch.cuda.is_bf16_supported()))


def resolve_compile(setting: bool | str, use_gpu: bool, zero_stage: int) -> bool:
    """Whether a worker compiles its student's layers: True, or "auto" on GPU workers under ZeRO-2."""
    return setting is True or (setting == "auto" and use_gpu and zero_stage == 2)


def resolve_cuda_graphs(setting: bool | str, use_gpu: bool, zero_stage: int) -> bool:
    """Whether a worker replays its student from CUDA graphs: True, or "auto" on GPU workers under ZeRO-2."""
    return use_gpu and zero_stage == 2 and setting in (True, "auto")


def _graphed(engine, cfg: TrainConfig, targets: TargetsAhead | None = None):
    """The engine, its module's forward replayed from CUDA graphs when cfg.cuda_graphs resolves to it (captured
    at the first micro-batch: zebra.cuda_graphs.graph_forward, with `targets`' look-ahead thread idle)."""
    if resolve_cuda_graphs(cfg.cuda_graphs, cfg.use_gpu, cfg.zero_stage):
        graph_forward(engine.module, before_capture=None if targets is None else targets.settle)
    return engine


def _compiled(student: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The student with its decoder layers compiled when cfg.compile resolves to it (in place; logged once)."""
    if resolve_compile(cfg.compile, cfg.use_gpu, cfg.zero_stage):
        backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
        count = compile_decoder_layers(student, backend)
        log.info("student: %d decoder layers compiled (torch.compile, backend %s)", count, backend)
    return student


def _without_cpu_shm_op() -> None:
    """On the CPU DeepSpeed JIT-compiles a shared-memory all-reduce op (C++, ~35 s on 2 cores, in every
    fresh virtualenv) when its comm backend starts. Only its inference all-reduce uses it; training's
    collectives go through the gloo process group Ray Train set up. Mark it unavailable so that the
    backend skips the build (DeepSpeed's own switch for ops a machine cannot build)."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def _engine(cfg: TrainConfig, student: nn.Module, world: int):
    """The student inside a DeepSpeed engine (uses the process group Ray Train set up), with
    GroupClippedAdamW over the student's param_groups() where it has them (else one group of its
    trainable parameters) and the lr_ratio schedule.

    Built with gradients off: ZeRO-1/2 keep, per parameter, a view of it (`_hp_mapping.lp_fragment`, made by
    `param.flatten().narrow(...)`), which with gradients on carries an autograd graph holding the parameter's
    gradient accumulator alive for the run, tied to the CUDA stream current at the build. A CUDA-graph capture
    (zebra.cuda_graphs) runs its backward on a side stream, and autograd then makes that old stream wait for it:
    "operation would make the legacy stream depend on a capturing blocking stream" (notes/GPU.md, session 14)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not cfg.use_gpu:
        _without_cpu_shm_op()
    groups = (student.param_groups() if hasattr(student, "param_groups")
              else [{"params": [p for p in student.parameters() if p.requires_grad]}])
    optimizer = GroupClippedAdamW(groups, max_norm=cfg.grad_clip, lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay, fused=True if cfg.use_gpu else None)
    with torch.no_grad():
        engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=deepspeed_config(cfg, world),
                                          lr_scheduler=functools.partial(_schedule, cfg=cfg))
    return engine


def _resume(engine, checkpoint: Checkpoint | None) -> int:
    """Load the checkpoint (the session's latest, if any) into the engine; the optimizer steps it had done."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d, torch.no_grad():  # the load re-links the views _engine made: see there
        path, client_state = engine.load_checkpoint(d, tag=DS_TAG)
    if path is None:
        raise RuntimeError(f"checkpoint {checkpoint.path} has no DeepSpeed state under tag {DS_TAG!r}")
    log.info("resumed from %s at step %d", checkpoint.path, client_state["step"])
    return client_state["step"]


def _optimizer_step(engine, objective: Objective, targets: TargetsAhead, cfg: TrainConfig, device) -> Tensor:
    """grad_accum micro-batches forward/backward and one optimizer step; the loss averaged over ranks, a
    float32 scalar on the device (read at the report: _Window)."""
    total = torch.zeros((), device=device)
    for _ in range(cfg.grad_accum):
        batch, teacher_targets = targets.next()
        loss = objective.loss(engine, teacher_targets, batch)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer and LR only at the accumulation boundary
        total += loss.detach().float()
    dist.all_reduce(total)
    return total / (cfg.grad_accum * dist.get_world_size())


class TargetsAhead:
    """This worker's micro-batches on its device, each with its teacher targets (objective.teacher_targets).

    With the teacher in this process, each is asked for when it is taken. With a teacher actor, the request for
    the next micro-batch is sent before this one is handed back, from a thread: the actor computes it while
    this process queues the student's kernels for this one, where a blocking request held the host until the
    teacher was done and the GPU then waited for the step's first kernels. On a GPU the thread works on a CUDA
    stream of its own, so that its copies (the batch to the device, its ids to the host for the actor) wait
    for nothing the student queued; the student's stream waits for that stream before using what it made.
    The micro-batches and their targets are the same, in the same order, either way; none is asked for beyond
    the `count` this worker takes.
    """

    def __init__(self, batches, teacher, objective: Objective, cfg: TrainConfig, device: torch.device, count: int):
        self.batches, self.teacher, self.objective, self.cfg, self.device = batches, teacher, objective, cfg, device
        self.count, self.left = count, count  # micro-batches in all, not yet asked for
        self.ahead = isinstance(teacher, RemoteTeacher)
        self.stream = torch.cuda.Stream(device) if self.ahead and device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="teacher-ahead") if self.ahead else None
        self.pending: Future | None = None

    def next(self) -> tuple[Batch, Any]:
        """(micro-batch, its teacher targets); raises RuntimeError when the data runs out."""
        if not self.ahead:
            return self._fetch()
        pending = self.pending or self._ask()
        if pending is None:
            raise RuntimeError(f"TargetsAhead: all {self.count} micro-batches were taken")
        self.pending = self._ask()  # the next one's request goes out now
        batch, targets = pending.result()
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            used = list(batch.values())
            map_tensors(used.append, targets)  # each tensor of the teacher's output, whatever its nesting
            for t in used:
                t.record_stream(current)  # memory the thread's stream allocated, used on this one
        return batch, targets

    def settle(self) -> None:
        """Wait until the look-ahead thread is idle (the request under way, if any, answered and kept for next()):
        what a CUDA graph capture needs of the other threads of its process."""
        if self.pending is not None:
            concurrent.futures.wait([self.pending])

    def close(self) -> None:
        """Stop the thread: a request not yet started is dropped, one under way is waited for (there is none
        once all `count` were taken)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _ask(self) -> Future | None:
        if self.left == 0:
            return None
        self.left -= 1
        return self.pool.submit(self._fetch)

    def _fetch(self) -> tuple[Batch, Any]:
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            batch = _next_batch(self.batches, self.cfg, self.device)
            return batch, self.objective.teacher_targets(self.teacher, batch)


def _next_batch(batches, cfg: TrainConfig, device) -> Batch:
    batch = next(batches, None)
    if batch is None:
        raise RuntimeError("data_factory's iterator ran out before TrainConfig.total_steps")
    shape = tuple(batch["input_ids"].shape)
    if shape != (cfg.micro_batch, cfg.seq_len):
        raise ValueError(f"batch input_ids shape {shape} != (TrainConfig.micro_batch, TrainConfig.seq_len) "
                         f"= {(cfg.micro_batch, cfg.seq_len)}")
    if device.type == "cuda":  # from pinned memory, asynchronously: a pageable copy first drains the stream
        return {k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True)
                for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def _report_checkpoint(engine, metrics: dict, session: Session, final: bool) -> None:
    """Every rank writes its DeepSpeed shards into one checkpoint; at the end rank 0 adds the full
    float32 state_dict (gathered by all ranks). A full disk raises StorageFull naming the folder."""
    state = _full_state_dict(engine) if final else None
    with tempfile.TemporaryDirectory() as d:
        with explain_disk_full(d, STAGING_FIX):
            engine.save_checkpoint(d, tag=DS_TAG, client_state={"step": metrics["step"]})
            if state is not None and dist.get_rank() == 0:
                torch.save(state, Path(d) / STUDENT_STATE_FILE)
        with explain_disk_full(session.storage_dir) if session.storage_dir else contextlib.nullcontext():
            session.report(metrics, d)


def _full_state_dict(engine) -> dict[str, Tensor]:
    """The student's state_dict in float32 on CPU, from DeepSpeed's fp32 master weights where it
    keeps them (ZeRO-2/3 partitions), else from the module. Collective: every rank must call."""
    module = engine.module
    params = dict(module.named_parameters(remove_duplicate=False))
    state = {}
    for name, value in module.state_dict().items():
        full = _full_param(params[name]) if name in params else value
        state[name] = full.detach().float().cpu()
    return state


def _full_param(param: nn.Parameter) -> Tensor:
    full = safe_get_full_fp32_param(param)
    if full is not None:
        return full
    with deepspeed.zero.GatheredParameters([param]):  # frozen params have no fp32 master copy
        return param.detach().clone()


def _maybe_fault(step: int, rank: int, world: int, checkpoint_every: int) -> None:
    """Test hook: with ZEBRA_FAULT_AT_STEP=step, the last rank dies here once per marker file.

    It first waits until Ray Train has committed the newest checkpoint before `step`, so that the
    test sees the documented contract (a restart resumes from the last committed checkpoint)
    rather than the window of one controller poll in which a just-reported checkpoint is not yet
    committed and a crash falls back to the one before.
    """
    if os.environ.get(FAULT_STEP_ENV) != str(step) or rank != world - 1:
        return
    marker = os.environ.get(FAULT_MARKER_ENV)
    if not marker:
        raise ValueError(f"{FAULT_STEP_ENV} is set but {FAULT_MARKER_ENV} (a file path, fires once) is not")
    try:
        Path(marker).touch(exist_ok=False)
    except FileExistsError:
        return
    expected = (step - 1) // checkpoint_every * checkpoint_every
    deadline = time.monotonic() + 60.0
    while expected and committed_step() < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    log.warning("fault injection: rank %d exits at step %d (committed checkpoint: step %d)", rank, step,
                committed_step())
    os._exit(1)


def committed_step() -> int:
    """In a worker: the step of the newest checkpoint Ray Train has committed for this run (0: none),
    read from the checkpoint manager's snapshot in the run's storage."""
    storage = ray.train.get_context().get_storage()
    path = f"{storage.experiment_fs_path}/checkpoint_manager_snapshot.json"
    try:
        with storage.storage_filesystem.open_input_stream(path) as f:
            latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, OSError, ValueError):
        return 0
    return int(latest.get("metrics", {}).get("step", 0))
