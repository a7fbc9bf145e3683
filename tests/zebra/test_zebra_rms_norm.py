"""ZebraRMSNorm, the decoder layers' and the final norm: still LlamaRMSNorm (parameter `weight` alone, so state
dicts and checkpoints are unchanged), LlamaRMSNorm's outputs bit for bit on the CPU path, the backend taken
from config.mamba_backend, and a decoder layer on the norm's Triton kernel (TRITON_INTERPRET=1 on a CPU) compiles
with fullgraph and matches eager."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the imports below
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels.norm  # noqa: E402
from zebra.config import ZebraConfig  # noqa: E402
from zebra.modeling import ZebraDecoderLayer, ZebraForCausalLM, ZebraRMSNorm  # noqa: E402


def tiny(**kw) -> ZebraForCausalLM:
    fields = dict(vocab_size=32, hidden_size=40, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=10, qk_rope_dim=4, kv_rank=8, mixer_types=["mla", "mamba"],
                  chunk_size=4)
    torch.manual_seed(0)
    model = ZebraForCausalLM(ZebraConfig(**fields | kw))
    with torch.no_grad():  # weights other than ones, so that a norm that ignored its weight would show
        for module in norms(model).values():
            module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
    return model


def norms(model) -> dict:
    """Qualified name -> module of every RMSNorm over the hidden size."""
    return {name: m for name, m in model.named_modules() if name.endswith(("layernorm", "model.norm"))}


def test_norms_are_llama_rms_norms_with_only_a_weight():
    model = tiny(mamba_backend="torch")
    found = norms(model)
    assert len(found) == 2 * 2 + 1
    for name, module in found.items():
        assert type(module) is ZebraRMSNorm and isinstance(module, LlamaRMSNorm), name
        assert list(module.state_dict()) == ["weight"], name
        assert module.backend == "torch", name
    expected = {f"model.layers.{i}.{n}.weight" for i in range(2)
                for n in ("input_layernorm", "post_attention_layernorm")}
    assert expected | {"model.norm.weight"} <= set(model.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_equal_llama_rms_norm_on_the_cpu(dtype):
    """Each norm alone, then the whole model with every norm swapped back for a LlamaRMSNorm of the same weight:
    bit for bit the same on fresh random inputs."""
    model = tiny()
    x = (torch.randn(2, 7, 40) * 3).to(dtype)
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
        for name, module in norms(model).items():
            llama = LlamaRMSNorm(40, eps=module.variance_epsilon)
            llama.load_state_dict(module.state_dict())
            assert torch.equal(module(x), llama(x)), name
        assert torch.equal(with_llama_norms(model)(ids).logits, logits)


def with_llama_norms(model):
    """model with every ZebraRMSNorm replaced by a LlamaRMSNorm of the same weight (the model before
    ZebraRMSNorm), in place."""
    for name, module in norms(model).items():
        llama = LlamaRMSNorm(module.weight.shape[0], eps=module.variance_epsilon)
        llama.load_state_dict(module.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, llama)
    return model


def test_checkpoint_of_llama_norms_loads_unchanged(tmp_path):
    """A checkpoint saved with LlamaRMSNorm modules loads into ZebraRMSNorm ones: no missing or unexpected key,
    the same tensors."""
    model = with_llama_norms(tiny())
    assert all(type(m) is LlamaRMSNorm for m in norms(model).values())
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert all(type(m) is ZebraRMSNorm for m in norms(loaded).values())
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or TRITON_INTERPRET=1")
def test_decoder_layer_on_the_norm_kernel_compiles_without_graph_breaks(monkeypatch):
    """An MLA decoder layer with mamba_backend "triton" (both norms on the kernel), float32: the output and every
    gradient of torch.compile(fullgraph=True) == eager, and eager == the same layer on the reference norm."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = tiny(mamba_backend="triton").model.layers[0].to(device)
    assert isinstance(layer, ZebraDecoderLayer) and layer.layer_type == "mla"
    x, positions = torch.randn(2, 6, 40, device=device), torch.arange(6, device=device).expand(2, 6)
    calls = []
    monkeypatch.setattr(kernels.norm, "rms_norm_triton",
                        lambda *args, kernel=kernels.norm.rms_norm_triton: calls.append(1) or kernel(*args))
    with torch.no_grad():
        layer(x, positions)
    assert len(calls) == 2  # both norms took the kernel
    monkeypatch.undo()
    torch._dynamo.reset()
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, positions)
        results.append([out, *torch.autograd.grad(out.pow(2).sum(), [leaf, *layer.parameters()])])
    names = ["output", "input"] + [name for name, _ in layer.named_parameters()]
    for name, eager, compiled in zip(names, *results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6, msg=name)
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.backend = "torch"
    torch.testing.assert_close(layer(x, positions), results[0][0], rtol=1e-5, atol=1e-5)
