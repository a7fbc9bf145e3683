"""Shared fixtures: tiny random Llama teachers (seconds), and the real SmolLM2 teacher (slow, cached)."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it decorates kernels, its own triton.language helpers included,
# at its first import (which transformers triggers): set it first, so kernel tests run on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama_config(**overrides) -> LlamaConfig:
    fields = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(dtype=torch.float64, seed=None, **overrides) -> LlamaForCausalLM:
    """A random tiny Llama; weights scaled up so attention is far from uniform (a harder test)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                p.weight.mul_(4.0)
    return model


def rel(a, b) -> float:
    """Relative error of a against b (Frobenius norms)."""
    return float((a - b).norm() / b.norm())


@pytest.fixture
def teacher64():
    return tiny_llama()


def save_perturbed_students(teacher_dir, out, scale: float, seed: int) -> tuple[str, str]:
    """out/mla and out/mamba: the teacher converted to a pure-MLA (kv_rank 4) and a pure-Mamba2 student,
    every parameter perturbed by scale * N(0, 1) (seeded) so that losses against the teacher are not ~0."""
    from transformers import AutoModelForCausalLM

    from zebra.convert import convert, hybrid_config

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for kind in ("mla", "mamba"):
        layers = list(range(teacher.config.num_hidden_layers)) if kind == "mla" else []
        student = convert(teacher, hybrid_config(teacher.config, layers, kv_rank=4, qk_rope_dim=2))
        with torch.no_grad():
            for p in student.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
        student.save_pretrained(Path(out) / kind)
    return str(Path(out) / "mla"), str(Path(out) / "mamba")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH into TORCH_EXTENSIONS_DIR, and
# rebuilds it (workers then wait minutes on its lock) whenever another ninja or checkout built the
# cached copy last: one cache per virtualenv, built with the virtualenv's own ninja. Ray workers
# inherit both from this process.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
# lm-eval results that serve.eval reuses (results_key): the suite's own, fresh each session (never the
# developer's ~/.cache/zebra/eval, whose entries would let an eval test pass without scoring anything); the
# clusters tests start inherit it.
os.environ["ZEBRA_EVAL_CACHE"] = tempfile.mkdtemp(prefix="zebra-eval-cache-")
atexit.register(shutil.rmtree, os.environ["ZEBRA_EVAL_CACHE"], True)


def init_ray(attempts: int = 3, **kwargs):
    """ray.init with retries: Ray waits a fixed 30 s for the raylet to register, which a loaded
    2-core machine can exceed; a second start normally succeeds. A no-op when Ray is up.
    A Ray of the suite's own (address "local"), whatever `ray start` cluster runs on the machine."""
    import ray

    if ray.is_initialized():
        return None
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("address", "local")
    # the embedded cluster's quiet State-API loggers, as cluster.connect starts it
    kwargs.setdefault("runtime_env", {"worker_process_setup_hook": "cluster.connect.embedded_worker_setup"})
    for attempt in range(attempts):
        try:
            return ray.init(**kwargs)
        except Exception as e:  # Ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray (4 logical CPUs) for every test that needs it: a start costs 10-30 s here.

    Ray Train takes one metrics report per controller poll; the fast poll keeps per-step reports
    of small runs from stalling (set before the cluster starts: its processes inherit it).
    """
    import ray

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    init_ray(num_cpus=4)
    yield
    ray.shutdown()
    os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)


@pytest.fixture
def one_rank_group(monkeypatch):
    """The process group of one rank that Ray Train would have set up (gloo), and DeepSpeed's group
    caches cleared of the groups of earlier tests (destroyed since)."""
    import deepspeed.utils.groups as ds_groups
    import torch.distributed as dist

    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        monkeypatch.setattr(ds_groups, name, None)
    monkeypatch.setenv("LOCAL_RANK", "0")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created and dist.is_initialized():
        dist.destroy_process_group()
