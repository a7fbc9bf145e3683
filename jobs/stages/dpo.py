"""Stage dpo (optional): preference tuning of the KD hybrid, one more objective of the recipe (jobs.train).

    check(spec)              jobs.run's preflight: refuses what cannot work, before any stage runs
    out = run(spec, ctx)     dpo/model; held-out preference metrics before and after; the loss curve

The policy starts from kd/model; the frozen reference, a second copy of kd/model, takes the
teacher's role (beside each worker, as dpo.teacher_mode says) and gives the log-probs the DPO loss
(zebra.dpo) compares against. Pairs come from dpo.dataset (a local .jsonl/.json/.parquet file or
folder, or a hub dataset): columns prompt/chosen/rejected as text or as chat messages, or
chosen/rejected chats whose common first turns are the prompt (HuggingFaceH4/ultrafeedback_binarized),
tokenized as TRL's DPOTrainer does. The last dpo.held_out_pairs are kept out of training. Training
is jobs.train.distill (DeepSpeed ZeRO-dpo.zero_stage, checkpoints of the Ray Train run
dpo-<section hash>, so an interrupted stage resumes from the latest one).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl.data_utils import common_prefix_length, extract_prompt, is_conversational

from jobs.context import Context, curve, train_config
from jobs.outputs import DpoOutput
from jobs.spec import BUILTIN_DATA, JobSpec, SpecError
from jobs.train import Objective, distill
from zebra.data import PackedDataset
from zebra.dpo import completion_logps, dpo_loss, preference_metrics
from zebra.hybrid import load_student

log = logging.getLogger(__name__)

PAIR_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # suffix -> datasets builder


def check(spec: JobSpec) -> None:
    """Refuse an enabled dpo section that cannot run: kd disabled, or a dataset that cannot hold
    preference pairs. Loads nothing."""
    d = spec.dpo
    if not d.enabled:
        return
    where = f"job spec {spec.source}: " if spec.source else "job spec: "
    if not spec.kd.enabled:
        raise SpecError(f"{where}dpo.enabled: true needs kd.enabled: true (DPO tunes the KD model, kd/model); "
                        "got kd.enabled: false")
    problem = _dataset_problem(d.dataset)
    if problem:
        raise SpecError(f"{where}dpo.dataset: {problem} (got {d.dataset!r})")


def _dataset_problem(source: str) -> str | None:
    """Why dpo.dataset cannot hold preference pairs, or None. Files only by name: no loading here."""
    allowed = "give a local .jsonl/.json/.parquet file or folder of pairs, or a hub dataset id"
    if source == BUILTIN_DATA:
        return f"'builtin' is a text corpus, not preference pairs; {allowed}"
    if "://" in source:
        return f"URIs (s3://...) are not supported for preference pairs; {allowed}"
    path = Path(source).expanduser()
    if not path.exists():  # jobs.spec refused missing paths already: this is a hub id
        return None
    try:
        _pair_files(path)
    except ValueError as e:
        return f"{e}; {allowed}"
    return None


def _pair_files(path: Path) -> tuple[str, list[str]]:
    """(datasets builder, sorted files) of a pairs file or a folder of them in one format."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in PAIR_FORMATS and not p.name.startswith("."))
    if not files:
        raise ValueError(f"folder {path} holds no {'/'.join(PAIR_FORMATS)} files")
    if files[0].suffix not in PAIR_FORMATS:
        raise ValueError(f"file {path} has an unsupported suffix")
    builders = sorted({PAIR_FORMATS[p.suffix] for p in files})
    if len(builders) > 1:
        raise ValueError(f"folder {path} mixes formats {builders}")
    return builders[0], [str(p) for p in files]


def run(spec: JobSpec, ctx: Context) -> DpoOutput:
    """Tune kd/model on the pairs, save dpo/model; held-out metrics before/after (preference_metrics)."""
    d = spec.dpo
    tokenizer = AutoTokenizer.from_pretrained(ctx.teacher_dir)
    train, held = split_pairs(spec, tokenizer)
    path = ctx.scratch / "data" / f"dpo-{spec.section_hash('dpo')}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, train)
    kd_dir = ctx.model_dir("kd/model")
    factory = functools.partial(load_student, kd_dir)  # the policy, and as teacher_factory the reference
    reference = pair_logps(factory(), held)
    cfg = train_config(spec, d, micro_batch=2 * d.micro_batch)  # a micro-batch of m pairs is 2m rows
    result = distill(cfg, factory, factory, dpo_objective(d.beta),
                     functools.partial(pair_batches, str(path), spec.seed, d.micro_batch), ctx.ray_storage(),
                     f"dpo-{spec.section_hash('dpo')}")
    policy = factory()
    policy.load_state_dict(result.student_state_dict())
    before = preference_metrics(reference, reference, d.beta)
    after = preference_metrics(pair_logps(policy, held), reference, d.beta)
    ctx.save_model(policy, "dpo/model")
    log.info("dpo: held-out preference accuracy %.3f -> %.3f, reward margin %.4f -> %.4f", before["pref_accuracy"],
             after["pref_accuracy"], before["reward_margin"], after["reward_margin"])
    return DpoOutput(tokens=d.total_steps * d.tokens_per_step, pairs=len(train), held_out_pairs=len(held),
                     before=before, after=after, history=curve(result.history))


def dpo_objective(beta: float) -> Objective:
    """DPO as the recipe's objective: the reference (in the teacher's place) scores each batch, the
    policy (the student) is trained on zebra.dpo.dpo_loss against it."""
    return Objective(_reference_logps, functools.partial(_dpo_loss, beta=beta))


def _reference_logps(reference, batch: dict[str, Tensor]) -> Tensor:
    return completion_logps(reference.logits(batch["input_ids"]), batch["input_ids"], batch["completion_mask"])


def _dpo_loss(policy: nn.Module, reference_logps: Tensor, batch: dict[str, Tensor], beta: float) -> Tensor:
    logps = completion_logps(policy(batch["input_ids"]).logits, batch["input_ids"], batch["completion_mask"])
    return dpo_loss(logps, reference_logps.to(logps.dtype), beta)


# -- preference pairs ----------------------------------------------------------------------------


def split_pairs(spec: JobSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) pair_rows of dpo.dataset at dpo.seq_len: the last dpo.held_out_pairs are held out."""
    d = spec.dpo
    pairs = load_pairs(d.dataset, d.dataset_split)
    n_train = len(pairs) - d.held_out_pairs
    if n_train < 1:
        raise ValueError(f"dpo.dataset {d.dataset!r} has {len(pairs)} pairs; dpo.held_out_pairs={d.held_out_pairs} "
                         "leaves none to train on")
    rows = pair_rows(tokenizer, pairs, d.seq_len)
    return rows[:n_train], rows[n_train:]


def load_pairs(source: str, split: str) -> datasets.Dataset:
    """Pairs as columns prompt/chosen/rejected, all text or all chat messages, in the source's order.

    source: a local .jsonl/.json/.parquet file or folder (split: only the name it gets), or a hub
    dataset id (split: its split). chosen/rejected chats without a prompt column, or with a text
    prompt beside chat completions (ultrafeedback), get their common first turns as the prompt.
    """
    path = Path(source).expanduser()
    if path.exists():
        builder, files = _pair_files(path)
        ds = datasets.load_dataset(builder, data_files={split: files}, split=split)
    else:
        ds = datasets.load_dataset(source, split=split)
    missing = {"chosen", "rejected"} - set(ds.column_names)
    if missing:
        raise ValueError(f"dpo.dataset {source!r}: no column(s) {sorted(missing)}; its columns are "
                         f"{sorted(ds.column_names)} (need prompt/chosen/rejected, or chosen/rejected chats)")
    first = ds[0]
    chat = isinstance(first["chosen"], list)
    if "prompt" in ds.column_names and isinstance(first["prompt"], list) == chat:
        return ds.select_columns(["prompt", "chosen", "rejected"])
    return ds.select_columns(["chosen", "rejected"]).map(extract_prompt, desc="dpo: prompts from shared turns")


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, pair: dict) -> dict[str, list[int]]:
    """prompt_ids, chosen_ids, rejected_ids of one pair, as TRL's DPOTrainer tokenizes it: chats through
    the chat template, text with EOS after each completion; the completions start where the
    prompt's ids and the prompt+completion ids diverge."""
    if is_conversational(pair):
        ids = [tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]]
        ids += [tokenizer.apply_chat_template(pair["prompt"] + pair[k], tokenize=True, return_dict=True)["input_ids"]
                for k in ("chosen", "rejected")]
    else:
        eos = tokenizer.eos_token
        ids = [tokenizer(pair["prompt"])["input_ids"]]
        ids += [tokenizer(pair["prompt"] + pair[k] + ("" if pair[k].endswith(eos) else eos))["input_ids"]
                for k in ("chosen", "rejected")]
    prompt, chosen, rejected = ids
    n = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return {"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}


def pair_rows(tokenizer: PreTrainedTokenizerBase, pairs: datasets.Dataset, seq_len: int) -> np.ndarray:
    """[n, 2, 2, seq_len] int64: per pair, (token ids, completion mask) x (chosen, rejected) of prompt +
    completion (tokenize_pair), cut to seq_len tokens as TRL's max_length cuts, right-padded (a causal
    model's logits at the real tokens do not see the padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = np.full((len(pairs), 2, 2, seq_len), 0, dtype=np.int64)
    out[:, 0] = pad
    for i, pair in enumerate(pairs):
        ids = tokenize_pair(tokenizer, pair)
        for j, key in enumerate(("chosen_ids", "rejected_ids")):
            seq = (ids["prompt_ids"] + ids[key])[:seq_len]
            mask = ([0] * len(ids["prompt_ids"]) + [1] * len(ids[key]))[:seq_len]
            out[i, 0, j, :len(seq)], out[i, 1, j, :len(seq)] = seq, mask
    return out


def batch_of(rows: np.ndarray) -> dict[str, Tensor]:
    """The batch of pair_rows [m, 2, 2, seq]: input_ids and completion_mask [2m, seq], the m chosen
    rows then the m rejected ones."""
    rows = torch.from_numpy(np.ascontiguousarray(rows))
    return {"input_ids": torch.cat([rows[:, 0, 0], rows[:, 0, 1]]),
            "completion_mask": torch.cat([rows[:, 1, 0], rows[:, 1, 1]])}


def pair_batches(path: str, seed: int, micro_pairs: int, rank: int, world: int, start: int):
    """The distill data_factory of DPO: this rank's batches of micro_pairs pairs (batch_of) from the
    pair_rows in the .npy file at path, in a seeded order, from its `start`-th micro-batch on."""
    rows = np.load(path, mmap_mode="r")
    data = PackedDataset(rows.reshape(len(rows), -1), seed=seed, rank=rank, world_size=world)
    data.position = start * micro_pairs
    while True:
        yield batch_of(data.next_batch(micro_pairs).reshape(-1, *rows.shape[1:]))


@torch.no_grad()
def pair_logps(model: nn.Module, rows: np.ndarray, batch: int = 2) -> Tensor:
    """[n, 2] float64: per pair of pair_rows [n, 2, 2, seq], the summed log-probs of the chosen and of
    the rejected completion tokens under model (on its device)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch):
        b = {k: v.to(device) for k, v in batch_of(rows[start:start + batch]).items()}
        logps = completion_logps(model(b["input_ids"]).logits, b["input_ids"], b["completion_mask"]).double()
        out.append(torch.stack(logps.chunk(2), dim=1).cpu())
    return torch.cat(out)
