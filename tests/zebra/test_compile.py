"""torch.compile(fullgraph=True) of the training forward: a Mamba2Mixer, an MLA layer and whole decoder layers
compile without a graph break (fullgraph raises at the first one) and match eager in output and gradients.
On the CPU the layers run their PyTorch references; the Triton kernels (SSD scan, gated RMSNorm, causal conv, as
torch.library custom ops) are compiled under TRITON_INTERPRET=1, alone and inside a Mamba2Mixer with
mamba_backend "triton", and their ops pass torch.library.opcheck."""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the imports below
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.norm import gated_rms_norm_triton  # noqa: E402
from kernels.ssd_scan import ssd_scan_triton  # noqa: E402
from zebra.config import ZebraConfig  # noqa: E402
from zebra.mamba2 import Mamba2Mixer  # noqa: E402
from zebra.mla import MLAttention  # noqa: E402
from zebra.modeling import ZebraDecoderLayer  # noqa: E402

HIDDEN, SEQ = 64, 10
needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or TRITON_INTERPRET=1")


def config(**kw) -> ZebraConfig:
    fields = dict(vocab_size=32, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, qk_rope_dim=8, kv_rank=16, mixer_types=["mla", "mamba"],
                  chunk_size=4, mamba_backend="torch")
    return ZebraConfig(**fields | kw)


def compiled_matches_eager(module, *args, tol=1e-12):
    """Output and every parameter's and input's gradient of torch.compile(module, fullgraph=True) == eager
    (within tol, absolute and relative)."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (module, compiled):
        x = args[0].detach().clone().requires_grad_()
        out = fn(x, *args[1:])
        grads = torch.autograd.grad(out.pow(2).sum(), [x, *module.parameters()], allow_unused=True)
        results.append([out, *grads])
    names = ["output", "input"] + [name for name, _ in module.named_parameters()]
    for name, eager, comp in zip(names, *results):
        if eager is None:
            assert comp is None, name
            continue
        print(f"{name}: max diff {(eager - comp).abs().max().item():.1e}")
        torch.testing.assert_close(comp, eager, rtol=tol, atol=tol, msg=name)


def inputs():
    x = torch.randn(2, SEQ, HIDDEN, dtype=torch.float64)
    return x, torch.arange(SEQ).expand(2, SEQ)


def test_mamba2_mixer_compiles_without_graph_breaks():
    torch.manual_seed(0)
    compiled_matches_eager(Mamba2Mixer(config(), 1).double(), *inputs())


def test_mla_compiles_without_graph_breaks():
    torch.manual_seed(0)
    compiled_matches_eager(MLAttention(config(), 0).double(), *inputs())


@pytest.mark.slow
@pytest.mark.parametrize("layer_idx", [0, 1], ids=["mla", "mamba"])
def test_decoder_layer_compiles_without_graph_breaks(layer_idx):
    torch.manual_seed(0)
    compiled_matches_eager(ZebraDecoderLayer(config(), layer_idx).double(), *inputs())


@needs_triton
def test_triton_kernels_compile_without_graph_breaks():
    """The scan and the norm (custom ops with their autograd) inside one compiled function, float32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, l, h, p, n, chunk = 1, 20, 2, 16, 16, 16
    x, B, C = (torch.randn(b, l, h, k, device=device) for k in (p, n, n))
    dt, A = F.softplus(torch.randn(b, l, h, device=device)), -torch.rand(h, device=device) - 0.5
    z, D = torch.randn(b, l, h * p, device=device), torch.randn(h, device=device)
    weight = torch.rand(h * p, device=device) + 0.5
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, D, z, weight)]

    def layer(x, dt, A, B, C, D, z, weight):
        y, final = ssd_scan_triton(x, dt, A, B, C, chunk, D=D)
        return gated_rms_norm_triton(y.flatten(-2), z, weight, p, 1e-5), final

    torch._dynamo.reset()
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        out, final = fn(*leaves)
        results.append([out, final, *torch.autograd.grad(out.pow(2).sum() + final.sum(), leaves)])
    for name, eager, comp in zip(["out", "final", "x", "dt", "A", "B", "C", "D", "z", "weight"], *results):
        print(f"{name}: max diff {(eager - comp).abs().max().item():.1e}")
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6, msg=name)


@needs_triton
def test_mamba2_mixer_triton_backend_compiles_without_graph_breaks():
    """The whole mixer on its kernel path (conv, scan and norm custom ops), float32: fullgraph compile == eager."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mixer = Mamba2Mixer(config(mamba_backend="triton", chunk_size=16), 1).to(device)
    x, positions = inputs()
    compiled_matches_eager(mixer, x.float().to(device), positions.to(device), tol=1e-6)


@needs_triton
def test_scan_custom_ops_pass_opcheck():
    """The fake implementations (shapes, strides, dtypes) and schemas of the scan's ops agree with the kernels."""
    b, l, h, g, p, n, chunk = 1, 20, 2, 1, 16, 16, 16
    x, B, C = torch.randn(b, l, h, p), torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    dt, A, D, s0 = F.softplus(torch.randn(b, l, h)), -torch.rand(h) - 0.5, torch.randn(h), torch.randn(b, h, p, n)
    fwd_args = (x, dt, A, B, C, chunk, D, s0)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.zebra.ssd_scan_fwd.default, fwd_args, test_utils=utils)
    y, final, acum, states = torch.ops.zebra.ssd_scan_fwd(*fwd_args)
    bwd_args = (torch.randn_like(y), torch.randn_like(final), x, dt, A, B, C, None, acum, states, chunk)
    torch.library.opcheck(torch.ops.zebra.ssd_scan_bwd.default, bwd_args, test_utils=utils)


def test_compiled_decoder_layers_train_like_eager_with_one_graph_per_kind():
    """zebra.modeling.compile_decoder_layers (the stages' regional compile on GPUs): a 4-layer hybrid (2 MLA, 2
    Mamba2), float64, compiled in place: the same parameter names, the same loss and gradients as an eager copy,
    return_mixer's mixer output equal to what a hook on the mixer sees, and one graph per kind of layer, not per
    layer (the MLA and Mamba2 layers each share theirs)."""
    from torch._dynamo.utils import counters

    from zebra.modeling import ZebraForCausalLM, compile_decoder_layers

    torch.manual_seed(0)
    cfg = config(num_hidden_layers=4, mixer_types=["mla", "mamba", "mamba", "mla"], vocab_size=64)
    eager = ZebraForCausalLM(cfg).double()
    compiled = ZebraForCausalLM(cfg).double()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(compiled, backend="aot_eager") == 4
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids = torch.randint(0, 64, (2, SEQ))
    results = []
    for model in (eager, compiled):
        loss = model(ids, labels=ids).loss
        results.append([loss, *torch.autograd.grad(loss, list(model.parameters()))])
    compiled(ids, labels=ids).loss.backward()  # a second step: nothing the first one left changes a guard
    assert counters["stats"]["unique_graphs"] == 2
    for name, a, b in zip(["loss"] + [n for n, _ in eager.named_parameters()], *results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    x, positions = inputs()
    for layer in (eager.model.layers[0], eager.model.layers[1]):
        seen = []
        hook = layer.mixer.register_forward_hook(lambda _m, _a, out: seen.append(out))
        out, mixed = layer(x, positions, return_mixer=True)
        hook.remove()
        torch.testing.assert_close(out, layer(x, positions), rtol=0, atol=0)
        torch.testing.assert_close(mixed, seen[0], rtol=0, atol=0)
