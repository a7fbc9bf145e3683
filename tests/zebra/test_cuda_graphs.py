"""zebra.cuda_graphs.graph_forward: a module's training forward and backward replayed from CUDA graphs.

On the CPU: nothing is captured and the module computes what it did; a capture that fails leaves the eager
forward, said once. On a GPU: a small hybrid (MLA and Mamba2 layers, their Triton kernels) replayed from graphs
gives eager's outputs and gradients, and after optimizer steps eager's weights, on fresh inputs each step; calls
the graph was not captured for (eval mode, no_grad, another shape) run eagerly; layers compiled by inductor
inside the graph too."""
import copy
import logging

import pytest
import torch

import zebra.cuda_graphs as cuda_graphs
from zebra.config import ZebraConfig
from zebra.cuda_graphs import capture_failure, graph_forward, is_graphed
from zebra.modeling import ZebraForCausalLM, compile_decoder_layers

VOCAB, SEQ = 96, 32


def small_hybrid(seed: int = 0, device: str = "cpu") -> ZebraForCausalLM:
    """Two MLA and two Mamba2 layers, float32, the kernels wherever they run (mamba_backend "auto")."""
    torch.manual_seed(seed)
    config = ZebraConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_rope_dim=8, kv_rank=16,
                         mixer_types=["mla", "mamba", "mamba", "mla"], chunk_size=8, mamba_backend="auto")
    return ZebraForCausalLM(config).to(device).train()


def tokens(seed: int, batch: int = 2, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed)).to(device)


def loss_of(model, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A KL-style loss of the model's logits against fixed target log-probabilities (float32)."""
    logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
    return (target.exp() * (target - logp)).sum(-1).mean()


def test_cpu_forward_is_unchanged_and_nothing_is_captured(monkeypatch):
    def no_capture(*args, **kwargs):
        raise AssertionError("make_graphed_callables called for CPU tensors")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", no_capture)
    eager, graphed = small_hybrid(), small_hybrid()
    keys = list(graphed.state_dict())
    assert graph_forward(graph_forward(graphed)) is graphed  # twice: one wrapper
    assert list(graphed.state_dict()) == keys and "forward" not in dict(graphed.named_modules())
    ids = tokens(1)
    torch.testing.assert_close(graphed(ids).logits, eager(ids).logits, rtol=0, atol=0)
    assert not is_graphed(graphed)


def test_a_failed_capture_leaves_the_eager_forward_and_says_so_once(monkeypatch, caplog):
    calls = []

    def failing_capture(module, args, **kwargs):
        calls.append(module.module)
        module(*args)  # a warm-up ran, as make_graphed_callables' does before its capture
        try:  # CUDA reports the first failure as the context of a later one
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture") from None

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", failing_capture)
    monkeypatch.setattr(cuda_graphs, "_capturable", lambda module, signature, kwargs: signature is not None)
    eager, graphed = small_hybrid(), small_hybrid()
    graph_forward(graphed)
    with caplog.at_level(logging.WARNING, logger="zebra.cuda_graphs"):
        for seed in (1, 2):
            ids = tokens(seed)
            torch.testing.assert_close(graphed(ids).logits, eager(ids).logits, rtol=0, atol=0)
    assert calls == [graphed]  # tried once, not at every call
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDA graphs off for ZebraForCausalLM" in warnings[0]
    assert "operation not permitted" in warnings[0]  # the first error, the one to fix
    assert not is_graphed(graphed) and "operation not permitted" in capture_failure(graphed)


def test_the_signature_tells_shapes_and_nesting_apart():
    a = torch.zeros(2, 3)
    sig = cuda_graphs._signature(([a, a], {"x": a}))
    assert sig == cuda_graphs._signature(([a.clone(), a.clone()], {"x": a.clone()}))
    assert sig != cuda_graphs._signature(([a, a], {"x": torch.zeros(2, 4)}))  # another shape
    assert sig != cuda_graphs._signature(([a, a, a], {"x": a}))  # another nesting
    assert sig != cuda_graphs._signature(([a, a], {"x": a.requires_grad_()}))
    assert cuda_graphs._signature((a, 3)) is None  # a graph replays tensors only


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def train_side_by_side(eager, graphed, steps: int, tol: float) -> None:
    """Each step on fresh ids: loss, every gradient, and after an SGD step every weight of `graphed` match
    `eager`'s within tol."""
    opt_e, opt_g = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, graphed))
    for step in range(steps):
        ids = tokens(100 + step, device="cuda")
        target = torch.log_softmax(torch.randn(2, SEQ, VOCAB, device="cuda", generator=torch.Generator(
            "cuda").manual_seed(step)), dim=-1)
        losses = []
        for model, opt in ((eager, opt_e), (graphed, opt_g)):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model, ids, target)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=tol, atol=tol)
        for (name, p_e), p_g in zip(eager.named_parameters(), graphed.parameters()):
            torch.testing.assert_close(p_g.grad, p_e.grad, rtol=tol, atol=tol, msg=f"step {step} grad {name}")
        opt_e.step()
        opt_g.step()
    for (name, p_e), p_g in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(p_g, p_e, rtol=tol, atol=tol, msg=name)


@gpu
@pytest.mark.gpu
def test_graphed_hybrid_trains_as_eager_on_fresh_inputs():
    eager = small_hybrid(device="cuda")
    graphed = copy.deepcopy(eager)
    calls = []
    graphed.register_forward_pre_hook(lambda module, args: calls.append(len(args)))  # as DeepSpeed's engine does
    graph_forward(graphed)
    train_side_by_side(eager, graphed, steps=4, tol=1e-5)
    assert is_graphed(graphed)
    assert calls == [1] * 4  # the module's hooks ran at every call, not inside the capture
    ids = tokens(7, batch=3, device="cuda")  # another shape, eval mode, no_grad: eager, same answers
    torch.testing.assert_close(graphed(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(graphed.eval()(ids).logits, eager.eval()(ids).logits, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.gpu
def test_compiled_layers_inside_the_graphs_train_as_eager():
    torch._dynamo.reset()
    eager = small_hybrid(device="cuda")
    graphed = copy.deepcopy(eager)
    assert compile_decoder_layers(graphed) == 4
    graph_forward(graphed)
    train_side_by_side(eager, graphed, steps=3, tol=2e-4)  # inductor's float32 sums in its own order
    assert is_graphed(graphed)
