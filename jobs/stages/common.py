"""What the stages share: the run context, models in storage, the run's token data, and KL on held-out data.

Model loaders here are module-level functions so that `functools.partial`s of them pickle into
Ray Train workers and Ray tasks (the factories of jobs.train.distill).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.storage import Storage
from jobs.spec import JobSpec, TrainSettings
from jobs.train import TrainConfig
from zebra import ZebraForCausalLM
from zebra.data import PackedDataset, load_texts, packed_sequences
from zebra.losses import kd_loss

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Context:
    """One run: its storage, a local scratch folder (the storage root itself for local storage),
    the teacher's local HF folder, how many MLA layers the student gets (jobs.run's preflight),
    the info of every stage done so far (jobs.run fills it), and the models saved by this run."""

    storage: Storage
    scratch: Path
    teacher_dir: str
    local_storage: bool
    num_mla: int
    infos: dict = dataclasses.field(default_factory=dict)
    saved: set[str] = dataclasses.field(default_factory=set)  # keys save_model wrote in this process

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
        """Where Ray Train keeps the checkpoints of ild and kd (local: mid-stage resume needs this disk)."""
        return str((self.scratch / "_ray").resolve())


def load_teacher_model(folder: str, dtype: str = "float32") -> nn.Module:
    """The teacher as an HF causal LM in eval mode (a distill teacher_factory)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).eval()


def load_student(folder: str) -> ZebraForCausalLM:
    return ZebraForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def compose_hybrid(mla_dir: str, mamba_dir: str, mla_layers: list[int]) -> ZebraForCausalLM:
    """The hybrid whose layers in mla_layers come from the MLA student and the rest from the Mamba2
    student (embeddings, norms and MLPs are the teacher's in both)."""
    mla, mamba = load_student(mla_dir), load_student(mamba_dir)
    config = copy.deepcopy(mamba.config)
    config.mixer_types = ["mla" if i in mla_layers else "mamba" for i in range(config.num_hidden_layers)]
    state = mamba.state_dict()
    for i in mla_layers:
        prefix = f"model.layers.{i}."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state.update({k: v for k, v in mla.state_dict().items() if k.startswith(prefix)})
    hybrid = ZebraForCausalLM(config)
    hybrid.load_state_dict(state)
    return hybrid.eval()


@functools.lru_cache(maxsize=4)
def _texts(source: str, split: str, text_field: str, name: str | None) -> tuple[str, ...]:
    return tuple(load_texts(source, split, text_field, name=name))


def sequences(spec: JobSpec, ctx: Context, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) packed sequences [n, seq_len] int64; the last data.held_out_sequences
    rows are held out (at this seq_len: another seq_len packs the same text into other rows)."""
    d = spec.data
    texts = _texts(d.source, d.split, d.text_field, d.hub_config)
    tok = AutoTokenizer.from_pretrained(ctx.teacher_dir)
    seqs = packed_sequences(list(texts), tok, seq_len, cache_dir=ctx.scratch / "data").astype(np.int64)
    n_held = d.held_out_sequences
    if len(seqs) <= n_held:
        raise ValueError(f"data.source {d.source!r} packs into only {len(seqs)} sequences of {seq_len} tokens; "
                         f"data.held_out_sequences={n_held} leaves none to train on")
    return seqs[: len(seqs) - n_held], seqs[len(seqs) - n_held:]


def data_factory(spec: JobSpec, ctx: Context, stage: str, section: TrainSettings):
    """A picklable distill data_factory over this stage's training sequences (saved as .npy in scratch)."""
    train, _ = sequences(spec, ctx, section.seq_len)
    path = ctx.scratch / "data" / f"{stage}-{section.seq_len}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, train)
    return functools.partial(_batches, str(path), spec.seed, section.micro_batch)


def _batches(path: str, seed: int, micro_batch: int, rank: int, world: int, start: int):
    data = PackedDataset(np.load(path, mmap_mode="r"), seed=seed, rank=rank, world_size=world)
    data.position = start * micro_batch  # a resumed worker continues where its checkpoint left off
    while True:
        yield {"input_ids": torch.from_numpy(data.next_batch(micro_batch))}


def train_config(spec: JobSpec, section: TrainSettings) -> TrainConfig:
    """jobs.train's TrainConfig from a stage's section of the spec."""
    use_gpu = section.gpus_per_worker > 0
    bf16 = section.bf16 if use_gpu else False  # "auto" is decided in each worker (jobs.train.resolve_bf16)
    return TrainConfig(
        workers=section.workers, use_gpu=use_gpu, zero_stage=section.zero_stage, lr=section.lr,
        warmup_frac=section.warmup_frac, total_steps=section.total_steps, micro_batch=section.micro_batch,
        seq_len=section.seq_len, grad_accum=section.grad_accum, bf16=bf16, teacher_mode=section.teacher_mode,
        checkpoint_every=section.checkpoint_every, keep_checkpoints=spec.storage.keep_checkpoints,
        seed=spec.seed, log_every=section.log_every,
    )


def curve(history: list[dict]) -> list[dict]:
    """The loss curve of a distill history: [{"step", "loss", "tokens", "resumed_from", "tokens_per_s",
    "step_s", and on GPU "peak_gpu_gib"}] (resumed_from:
    the checkpoint step the reporting worker group started from; it changes where a restart happened)."""
    keys = ("step", "loss", "tokens", "resumed_from", "tokens_per_s", "step_s", "peak_gpu_gib")
    return [{k: h[k] for k in keys if k in h} for h in history]


@torch.no_grad()
def held_out_kl(student: nn.Module, teacher_logits: Tensor, ids: Tensor, batch: int = 4) -> float:
    """Mean KL(teacher || student) per token on ids [n, seq] (teacher_logits [n, seq, vocab], on any
    device: a batch at a time moves to the student's, so the logits of many sequences may stay in host memory)."""
    total = 0.0
    for s in range(0, len(ids), batch):
        logits = student(ids[s:s + batch]).logits
        total += kd_loss(logits, teacher_logits[s:s + batch].to(logits.device)).item() * len(ids[s:s + batch])
    return total / len(ids)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, ids: Tensor, batch: int = 4) -> Tensor:
    """[n, seq, vocab] float32 logits of the teacher, in host memory (n x seq x vocab x 4 bytes: 1.6 GB
    for 16 x 512 tokens of a 49k vocabulary, which a GPU shared by several trials or tasks should not hold)."""
    return torch.cat([teacher(ids[s:s + batch]).logits.float().cpu() for s in range(0, len(ids), batch)])
