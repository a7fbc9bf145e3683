"""What the stages (and Tune) share: the run context, the run's token data, and the spec -> recipe mapping.

    ctx.output(SmartOutput)           a typed output of an earlier stage (jobs.outputs)
    ctx.model_dir("ild/mla")          a local folder holding a model the run stored
    train, held = sequences(spec, ctx, seq_len, "kd")  # a stage's slice (ild, kd) and the held-out rows
    train_config(spec, spec.kd)       the recipe's TrainConfig (jobs.train) for a stage's section
    kd_recipe(spec, teacher_dir)      KD's TrainConfig, teacher and objective (the kd stage's and Tune's)
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import deque
from pathlib import Path
from typing import TypeVar

import numpy as np
import ray
import torch
from torch import nn
from transformers import AutoTokenizer

from cluster.storage import Storage, fetch_uri
from jobs.outputs import StageOutput
from jobs.spec import JobSpec, TrainSettings
from jobs.tokenise import tokenize_chunk_at
from jobs.train import Objective, TrainConfig, kd_objective
from zebra.data import (ChunkMap, PackedDataset, iter_texts, packed_sequences, rows_of, store_token_stream, token_slices,
                        stream_dtype, tokenize_until)
from zebra.teacher import load_teacher_model, teacher_folder

log = logging.getLogger(__name__)

T = TypeVar("T", bound=StageOutput)


@dataclasses.dataclass
class Context:
    """One run: its storage, a local scratch folder (the storage root itself for local storage),
    the teacher's local HF folder, how many MLA layers the student gets (jobs.run's preflight),
    the outputs of the stages done so far (by type; jobs.run fills them), and the models saved by this run."""

    storage: Storage
    scratch: Path
    teacher_dir: str
    local_storage: bool
    num_mla: int
    outputs: dict[type, StageOutput] = dataclasses.field(default_factory=dict)
    saved: set[str] = dataclasses.field(default_factory=set)  # keys save_model wrote in this process

    def output(self, kind: type[T]) -> T:
        """The output of the stage that makes `kind`; jobs.run's preflight makes sure it is there."""
        if kind not in self.outputs:
            raise LookupError(f"no {kind.__name__} in this run: its stage neither ran nor was stored")
        return self.outputs[kind]

    def save_model(self, model: nn.Module, key: str) -> Path:
        """save_pretrained (with the teacher's tokenizer) at scratch/key and store it under key."""
        out = self.scratch / key
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(self.teacher_dir).save_pretrained(out)
        if not self.local_storage:
            self.storage.upload_dir(out, key)
        self.saved.add(key)
        return out

    def model_dir(self, key: str) -> str:
        """A local folder holding the model stored under key: this run's own copy, else storage's (for
        S3 a fresh download; a scratch copy left by an earlier run may hold another run's model)."""
        return str(self.scratch / key if key in self.saved else self.storage.fetch_dir(key))

    def ray_storage(self) -> str:
        """Where Ray Train keeps the checkpoints of ild, kd and dpo (local: mid-stage resume needs this disk)."""
        return str((self.scratch / "_ray").resolve())


DATA_SLICES = ("held_out", "ild", "kd")  # the corpus's disjoint token ranges, in this order


def held_out_device() -> torch.device:
    """Where the driver computes its held-out figures (and init its conversion): its GPU where it has
    one (the embedded Ray on a GPU host: seconds), else the CPU (minutes at real sizes)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def release_cuda_cache() -> None:
    """Give the driver's cached CUDA blocks back before the training workers start on the same GPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def token_budgets(spec: JobSpec) -> dict[str, int]:
    """Tokens each slice of the corpus needs: held_out, data.held_out_sequences rows of the longest
    seq_len any stage packs at; ild, the ild stage's tokens (at least init's calibration); kd, the
    kd stage's tokens (at least one Tune trial's). A disabled stage's slice is only what others need."""
    tune = spec.tune  # None: no tune section
    trial = tune.steps * tune.micro_batch * tune.seq_len if tune else 0
    budgets = {
        "held_out": spec.data.held_out_sequences * longest_seq_len(spec),
        "ild": max(spec.ild.tokens if spec.ild.enabled else 0, spec.init.calibration_sequences * spec.init.seq_len),
        "kd": spec.kd.tokens if spec.kd.enabled else trial,
    }
    return {name: tokens for name, tokens in budgets.items() if tokens > 0}


def longest_seq_len(spec: JobSpec) -> int:
    """The longest seq_len any stage (or Tune) packs the corpus at."""
    tune = spec.tune
    return max(spec.init.seq_len, spec.ild.seq_len, spec.smart.seq_len, spec.kd.seq_len, tune.seq_len if tune else 0)


PARALLEL_TOKENS = 4_000_000  # a corpus prefix at least this long is tokenised by Ray tasks (parallel_chunk_map)


@functools.lru_cache(maxsize=4)
def _texts(source: str, split: str, text_field: str, name: str | None, endpoint: str | None, tokenizer_dir: str,
           tokens: int, cache_dir: str) -> tuple[str, ...]:
    """The first documents of the corpus holding `tokens` tokens (zebra.data.tokenize_until): no more is
    read, and their token stream goes to the token cache in cache_dir as it is computed, so packing
    them at any seq_len tokenises nothing again. With Ray up and `tokens` >= PARALLEL_TOKENS the chunks
    are tokenised by Ray tasks in parallel. An s3:// source is fetched through cluster.storage and read
    as the local copy."""
    if source.startswith("s3://"):
        source = str(fetch_uri(source, endpoint))
    tok = _tokenizer(tokenizer_dir)
    chunk_map = parallel_chunk_map(tokenizer_dir) if tokens >= PARALLEL_TOKENS and ray.is_initialized() else None
    parallel = chunk_map is not None
    start = time.perf_counter()
    texts, stream = tokenize_until(iter_texts(source, split, text_field, name=name), tok, tokens, map_chunks=chunk_map)
    log.info("data: %d documents, %d tokens tokenised in %.1f s (%s)", len(texts), len(stream),
             time.perf_counter() - start, "Ray tasks" if parallel else "in the driver")
    store_token_stream(texts, tok, stream, cache_dir)
    return tuple(texts)


def parallel_chunk_map(tokenizer_dir: str, in_flight: int | None = None) -> ChunkMap | None:
    """A zebra.data.tokenize_until chunk map over Ray tasks (jobs.tokenise: HF `tokenizers` on the folder's
    tokenizer.json, one core each), or None where the folder has no tokenizer.json. Results come in order;
    at most in_flight chunks (default: the cluster's CPUs) are read ahead; the tasks still in flight are
    cancelled when the consumer stops. The tasks reserve no CPU, so they also run while trainers hold
    every CPU of the cluster."""
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return None
    tok = _tokenizer(tokenizer_dir)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir!r} has no eos_token_id; packing needs one")
    eos, dtype = tok.eos_token_id, np.dtype(stream_dtype(tok)).name
    task = ray.remote(num_cpus=0, max_retries=2)(tokenize_chunk_at)
    in_flight = in_flight or min(64, max(2, int(ray.cluster_resources().get("CPU", 2))))

    def chunk_map(chunks):
        pending: deque = deque()
        try:
            for chunk in chunks:
                pending.append(task.remote(chunk, tokenizer_dir, eos, dtype))
                if len(pending) >= in_flight:
                    yield ray.get(pending.popleft())
            while pending:
                yield ray.get(pending.popleft())
        finally:
            for ref in pending:
                ray.cancel(ref)

    return chunk_map


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_dir: str):
    """The run's tokenizer, loaded once per process (every stage's sequences() asks for it)."""
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def sequences(spec: JobSpec, ctx: Context, seq_len: int, stage: str = "ild") -> tuple[np.ndarray, np.ndarray]:
    """(the stage's training rows, the held-out rows), each [n, seq_len] int64.

    The corpus is read only as far as token_budgets needs (plus a few rows of slack) and cut into
    disjoint token ranges held_out | ild | kd (zebra.data.token_slices; the same ranges at every
    seq_len, so the held-out text is in no stage's training rows and ILD and KD train on different
    text); stage picks "ild" or "kd". The held-out rows are the first data.held_out_sequences whole
    rows of the held-out range. A corpus shorter than the budgets keeps the held-out range whole and shrinks
    the training ranges in proportion (token_slices warns; each stage repeats its rows over epochs),
    measured at this seq_len.
    """
    if stage not in DATA_SLICES[1:]:
        raise ValueError(f"sequences: stage {stage!r} has no data slice; expected one of {DATA_SLICES[1:]}")
    d = spec.data
    budgets = token_budgets(spec)
    if stage not in budgets:
        raise ValueError(f"sequences: no tokens are budgeted for {stage!r} (its stage is disabled)")
    slack = 2 * len(budgets) * longest_seq_len(spec)  # rows_of drops a partial row at each end of each range
    texts = _texts(d.source, d.split, d.text_field, d.hub_config, spec.storage.s3_endpoint_url, ctx.teacher_dir,
                   sum(budgets.values()) + slack, str(ctx.scratch / "data"))
    tok = _tokenizer(ctx.teacher_dir)
    seqs = packed_sequences(list(texts), tok, seq_len, cache_dir=ctx.scratch / "data").astype(np.int64)
    ranges = token_slices(budgets, len(seqs) * seq_len, fixed=("held_out",))
    n_held = d.held_out_sequences
    held = seqs[rows_of(ranges["held_out"], seq_len)][:n_held] if n_held else seqs[:0]
    if len(held) < n_held:
        raise ValueError(f"data.source {d.source!r}: data.held_out_sequences={n_held} but the corpus's held-out "
                         f"range packs into {len(held)} sequences of {seq_len} tokens")
    train = seqs[rows_of(ranges[stage], seq_len)]
    if len(train) == 0:
        raise ValueError(f"data.source {d.source!r} leaves no {stage} sequence of {seq_len} tokens to train on")
    return train, held


def data_factory(spec: JobSpec, ctx: Context, stage: str, section: TrainSettings):
    """A picklable distill data_factory over this stage's training sequences (saved as .npy in scratch)."""
    train, _ = sequences(spec, ctx, section.seq_len, stage)
    path = ctx.scratch / "data" / f"{stage}-{section.seq_len}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, train)
    return functools.partial(batches, str(path), spec.seed, section.micro_batch)


def batches(rows: str | np.ndarray, seed: int, micro_batch: int, rank: int, world: int, start: int):
    """The distill data_factory: this rank's micro-batches {"input_ids": [micro_batch, seq_len] int64}
    of rows [n, seq_len] (an array, or a .npy file of one) in a seeded order, from its `start`-th
    micro-batch on (a resumed worker continues where its checkpoint left off)."""
    data = PackedDataset(np.load(rows, mmap_mode="r") if isinstance(rows, str) else rows, seed=seed, rank=rank,
                         world_size=world)
    data.position = start * micro_batch
    while True:
        yield {"input_ids": torch.from_numpy(data.next_batch(micro_batch))}


def train_config(spec: JobSpec, section: TrainSettings, **changes) -> TrainConfig:
    """jobs.train's TrainConfig from a stage's section of the spec (changes: fields to override)."""
    use_gpu = section.gpus_per_worker > 0
    bf16 = section.bf16 if use_gpu else False  # "auto" is decided in each worker (jobs.train.resolve_bf16)
    fields = dict(
        workers=section.workers, use_gpu=use_gpu, zero_stage=section.zero_stage, lr=section.lr,
        warmup_frac=section.warmup_frac, min_lr_ratio=section.min_lr_ratio, grad_clip=section.grad_clip,
        total_steps=section.total_steps, micro_batch=section.micro_batch,
        seq_len=section.seq_len, grad_accum=section.grad_accum, bf16=bf16, teacher_mode=section.teacher_mode,
        compile=section.compile, cuda_graphs=section.cuda_graphs,
        checkpoint_every=section.checkpoint_every, keep_checkpoints=spec.storage.keep_checkpoints,
        seed=spec.seed, log_every=section.log_every,
    )
    return TrainConfig(**{**fields, **changes})


def kd_recipe(spec: JobSpec, teacher_dir: str, **changes) -> tuple[TrainConfig, functools.partial, Objective]:
    """(TrainConfig, teacher_factory, objective) of KD under this spec: what the kd stage and every
    Tune trial train with. teacher_dir: the run's teacher folder (kd.teacher replaces it); changes
    override TrainConfig fields (a Tune trial's steps, batch and learning rate)."""
    kd = spec.kd
    teacher = teacher_folder(kd.teacher) if kd.teacher else teacher_dir
    teacher_factory = functools.partial(load_teacher_model, teacher, spec.teacher.dtype)
    return train_config(spec, kd, **changes), teacher_factory, kd_objective(kd.temperature, kd.top_k, kd.ce_weight, kd.loss_backend)


def curve(history: list[dict]) -> list[dict]:
    """The loss curve of a distill history: [{"step", "loss", "tokens", "resumed_from", "tokens_per_s",
    "step_s", and on GPU "peak_gpu_gib"}] (resumed_from:
    the checkpoint step the reporting worker group started from; it changes where a restart happened)."""
    keys = ("step", "loss", "tokens", "resumed_from", "tokens_per_s", "step_s", "peak_gpu_gib")
    return [{k: h[k] for k in keys if k in h} for h in history]
