"""Stage dpo (optional): preference tuning of the KD hybrid with TRL's DPOTrainer on Ray Train.

    check(spec)            jobs.run's preflight: refuses what cannot work, before any stage runs
    info = run(spec, ctx)  dpo/model; held-out preference metrics before and after; the loss curve

The policy starts from kd/model and the frozen reference is a second copy of kd/model. Pairs come
from dpo.dataset (a local .jsonl/.json/.parquet file or folder, or a hub dataset): columns
prompt/chosen/rejected as text or as chat messages, or chosen/rejected chats whose common first
turns are the prompt (HuggingFaceH4/ultrafeedback_binarized). The last dpo.held_out_pairs are kept
out of training. Each Ray Train worker runs the HF Trainer inside (DeepSpeed ZeRO-dpo.zero_stage);
its checkpoints (every checkpoint_every steps and at the end) are Ray Train checkpoints of the run
dpo-<section hash>, so an interrupted stage resumes from the latest one.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import datasets
import ray
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchConfig, TorchTrainer
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.data_utils import common_prefix_length, extract_prompt, is_conversational
from trl.trainer.dpo_trainer import DataCollatorForPreference

from cluster.placement import worker_resources
from jobs.spec import BUILTIN_DATA, DpoSpec, JobSpec, SpecError
from jobs.stages.common import Context, load_student
from jobs.train import resolve_bf16

log = logging.getLogger(__name__)

PAIR_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # suffix -> datasets builder
HF_CHECKPOINT = RayTrainReportCallback.CHECKPOINT_NAME  # the HF checkpoint's folder in a Ray Train checkpoint
MAX_FAILURES = 2  # worker-group restarts from the last checkpoint before the stage fails


def check(spec: JobSpec) -> None:
    """Refuse an enabled dpo section that cannot run: kd disabled, or a dataset that cannot hold
    preference pairs. Loads nothing (dpo.teacher_mode means nothing here: DPO has no teacher)."""
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


def run(spec: JobSpec, ctx: Context) -> dict:
    """Tune kd/model on the pairs, save dpo/model; info: tokens, pairs, held-out metrics before/after
    (preference_metrics, as <metric>_before and <metric>_after), the loss curve (history)."""
    d = spec.dpo
    train_path, held, n_train = _split_pairs(spec, ctx)
    kd_dir = ctx.model_dir("kd/model")
    tokenizer = AutoTokenizer.from_pretrained(ctx.teacher_dir)
    reference = pair_logps(load_student(kd_dir), tokenizer, held, d.seq_len)
    result = _fit(spec, ctx, kd_dir, train_path)
    policy = load_student(kd_dir)
    with result.checkpoint.as_directory() as ckpt:  # the fp32 weights, merged from every rank's ZeRO shards
        policy.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt) / HF_CHECKPOINT)))
        history = _history(Path(ckpt) / HF_CHECKPOINT, d)
    before = preference_metrics(reference, reference, d.beta)
    after = preference_metrics(pair_logps(policy, tokenizer, held, d.seq_len), reference, d.beta)
    ctx.save_model(policy, "dpo/model")
    log.info("dpo: held-out preference accuracy %.3f -> %.3f, reward margin %.4f -> %.4f", before["pref_accuracy"],
             after["pref_accuracy"], before["reward_margin"], after["reward_margin"])
    return {"tokens": d.total_steps * d.tokens_per_step, "pairs": n_train, "held_out_pairs": len(held),
            **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
            "history": history}


# -- preference pairs ----------------------------------------------------------------------------


def _split_pairs(spec: JobSpec, ctx: Context) -> tuple[str, datasets.Dataset, int]:
    """(parquet file in scratch of the training pairs, the held-out pairs, how many train): the last
    dpo.held_out_pairs of the dataset are held out."""
    d = spec.dpo
    pairs = load_pairs(d.dataset, d.dataset_split)
    n_train = len(pairs) - d.held_out_pairs
    if n_train < 1:
        raise ValueError(f"dpo.dataset {d.dataset!r} has {len(pairs)} pairs; dpo.held_out_pairs={d.held_out_pairs} "
                         "leaves none to train on")
    path = ctx.scratch / "data" / f"dpo-{spec.section_hash('dpo')}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs.select(range(n_train)).to_parquet(str(path))
    return str(path), pairs.select(range(n_train, len(pairs))), n_train


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


@torch.no_grad()
def pair_logps(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: datasets.Dataset, max_length: int,
               batch: int = 2) -> Tensor:
    """[n, 2] float64: per pair, the summed log-probs of the chosen and of the rejected completion tokens
    (prompt + completion truncated to max_length tokens, as in training). Logits in float32 or wider."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DataCollatorForPreference(pad_token_id=pad, max_length=max_length)
    out = []
    for start in range(0, len(pairs), batch):
        rows = pairs.select(range(start, min(start + batch, len(pairs))))
        b = collate([tokenize_pair(tokenizer, row) for row in rows])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        token_logps = logits.gather(-1, b["input_ids"][:, 1:, None])[..., 0] - logits.logsumexp(-1)
        summed = (token_logps.double() * b["completion_mask"][:, 1:]).sum(-1)
        out.append(torch.stack(summed.chunk(2), dim=1))  # the collator stacks [chosen..., rejected...]
    return torch.cat(out)


def preference_metrics(policy: Tensor, reference: Tensor, beta: float) -> dict[str, float]:
    """From [n, 2] summed log-probs (chosen, rejected) of the policy and the reference:
    pref_accuracy   fraction of pairs where the policy gives the chosen completion the higher log-prob
    logp_margin     mean log pi(chosen) - log pi(rejected)
    reward_margin   mean DPO implicit reward margin beta * [(pi - ref)(chosen) - (pi - ref)(rejected)]
    reward_accuracy fraction of pairs with a positive reward margin (0 when the policy is the reference)"""
    margin = policy[:, 0] - policy[:, 1]
    reward = beta * ((policy - reference)[:, 0] - (policy - reference)[:, 1])
    return {"pref_accuracy": (margin > 0).double().mean().item(), "logp_margin": margin.mean().item(),
            "reward_margin": reward.mean().item(), "reward_accuracy": (reward > 0).double().mean().item()}


# -- training on Ray Train -----------------------------------------------------------------------


def dpo_arguments(spec: JobSpec) -> dict:
    """DPOConfig's arguments (but output_dir, and bf16: jobs.train.resolve_bf16 in the worker) for dpo's section."""
    d = spec.dpo
    use_gpu = d.gpus_per_worker > 0
    return dict(
        max_steps=d.total_steps, per_device_train_batch_size=d.micro_batch, gradient_accumulation_steps=d.grad_accum,
        learning_rate=d.lr, lr_scheduler_type="cosine", warmup_steps=round(d.warmup_frac * d.total_steps),
        beta=d.beta, max_length=d.seq_len, use_cpu=not use_gpu, seed=spec.seed, data_seed=spec.seed,
        gradient_checkpointing=False,  # ZebraForCausalLM does not support it
        deepspeed=deepspeed_config(d.zero_stage),
        save_strategy="steps", save_steps=d.checkpoint_every, save_total_limit=1,  # Ray Train keeps the copies
        logging_steps=d.log_every, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )


def deepspeed_config(zero_stage: int) -> dict:
    """The Trainer's DeepSpeed config: ZeRO stage; batch sizes, clipping and bf16 from its arguments ("auto")."""
    return {
        "zero_optimization": {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "steps_per_print": 10**9,
    }


def _fit(spec: JobSpec, ctx: Context, model_dir: str, pairs_path: str) -> ray.train.Result:
    d = spec.dpo
    use_gpu = d.gpus_per_worker > 0
    loop_config = {"model_dir": model_dir, "tokenizer_dir": ctx.teacher_dir, "pairs": pairs_path,
                   "arguments": dpo_arguments(spec), "bf16": d.bf16}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=use_gpu,
                                     resources_per_worker=worker_resources(use_gpu)),
        run_config=RunConfig(
            name=f"dpo-{spec.section_hash('dpo')}",
            storage_path=ctx.ray_storage(),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.storage.keep_checkpoints),
            # DeepSpeed picks its accelerator when imported: tell CPU workers before they import it
            worker_runtime_env={"env_vars": {} if use_gpu else {"DS_ACCELERATOR": "cpu"}},
        ),
    )
    return trainer.fit()


def _train_loop(config: dict) -> None:
    """In each Ray Train worker: DPOTrainer on this rank's share of the pairs, resumed from Ray Train's
    latest checkpoint if there is one. Each rank saves into its own folder, so that the union of the
    ranks' folders (Ray Train's checkpoint) holds every rank's DeepSpeed shards once."""
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer_dir"])
    pairs = datasets.Dataset.from_parquet(config["pairs"])
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(
            model=load_student(config["model_dir"]), ref_model=load_student(config["model_dir"]),
            args=DPOConfig(output_dir=out, bf16=resolve_bf16(config["bf16"], not config["arguments"]["use_cpu"]),
                           **config["arguments"]),
            train_dataset=pairs, processing_class=tokenizer,
            callbacks=[RayTrainReportCallback(), _TagResumes()],
        )
        trainer = prepare_trainer(trainer)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            trainer.train()
            return
        with checkpoint.as_directory() as d:
            trainer.train(resume_from_checkpoint=str(Path(d) / HF_CHECKPOINT))


class _TagResumes(TrainerCallback):
    """Marks each logged step with the step its worker group started from (0: not resumed)."""

    start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        state.log_history[-1]["resumed_from"] = self.start


def _history(checkpoint: Path, d: DpoSpec) -> list[dict]:
    """The loss curve [{"step", "loss", "tokens", "resumed_from"}] from an HF checkpoint's trainer state."""
    logged = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [{"step": h["step"], "loss": h["loss"], "tokens": h["step"] * d.tokens_per_step,
             "resumed_from": h.get("resumed_from", 0)} for h in logged if "loss" in h]
