"""The stages' training step with the student replayed from CUDA graphs (TrainConfig.cuda_graphs) against the
same step eager, on a GPU: jobs.train's DeepSpeed ZeRO-2 engine, GroupClippedAdamW and _optimizer_step, two
micro-batches accumulated per step (the graphs' gradients must be copied out by DeepSpeed before the next
micro-batch's backward overwrites them), fresh tokens every micro-batch, for the KD objective (a hybrid
student) and ILD's (the pair of pure students). The weights after three steps must match. On the CPU only the
settings are checked."""
import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jobs.train import TrainConfig, resolve_cuda_graphs

VOCAB, SEQ, MICRO = 128, 64, 2


def test_cuda_graphs_setting_resolves_and_is_checked():
    assert resolve_cuda_graphs("auto", use_gpu=True, zero_stage=2)
    assert not resolve_cuda_graphs("auto", use_gpu=False, zero_stage=2)
    assert not resolve_cuda_graphs("auto", use_gpu=True, zero_stage=3)
    assert not resolve_cuda_graphs(False, use_gpu=True, zero_stage=2)
    for bad in (dict(cuda_graphs="yes"), dict(cuda_graphs=True), dict(cuda_graphs=True, use_gpu=True, zero_stage=3)):
        with pytest.raises(ValueError, match="cuda_graphs"):
            TrainConfig(**bad)
    TrainConfig(cuda_graphs=True, use_gpu=True)


def teacher_factory() -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def students(kind: str):
    """kind "kd": a hybrid of the teacher's shape (MLA layers 0 and 3); "ild": jobs.stages.ild's StudentPair."""
    from jobs.stages.ild import StudentPair
    from zebra.convert import hybrid_config
    from zebra.modeling import ZebraForCausalLM

    config = teacher_factory().config
    torch.manual_seed(2)

    def student(mla_layers):
        return ZebraForCausalLM(hybrid_config(config, mla_layers, kv_rank=16, qk_rope_dim=8, chunk_size=16))

    if kind == "kd":
        return student([0, 3])
    return StudentPair(student(list(range(4))), student([]))


def _accumulators_alive(module, marked: bool) -> list[str]:
    """Mark each trainable parameter's gradient accumulator (marked=False), or list the parameters whose marked
    accumulator is still the one autograd hands out (marked=True): something has kept it alive in between."""
    import gc

    gc.collect()
    alive = []
    for name, param in module.named_parameters():
        if param.requires_grad:
            node = torch.autograd.graph.get_gradient_edge(param).node
            if marked and node.metadata.get("zebra-test") == name:
                alive.append(name)
            node.metadata["zebra-test"] = name
    return alive


@pytest.mark.skipif(torch.cuda.is_available(), reason="an autograd check, made on the CPU; the GPU tests capture")
@pytest.mark.parametrize("kind", ["kd", "ild"])
def test_engine_keeps_no_gradient_accumulator_alive(kind, tmp_path, one_rank_group):
    """jobs.train._engine and _resume leave no autograd graph holding a parameter's gradient accumulator (ZeRO's
    parameter views made with gradients on did: an accumulator tied to the stream current at the build, which
    then fails a CUDA-graph capture of the backward). A micro-batch's graph, once its backward ran and its
    outputs are gone, holds none either."""
    from ray.train import Checkpoint

    from jobs.train import DS_TAG, _engine, _resume

    cfg = TrainConfig(workers=1, use_gpu=False, zero_stage=2, micro_batch=MICRO, seq_len=SEQ, bf16=False,
                      total_steps=10)
    ids = torch.randint(0, VOCAB, (MICRO, SEQ))
    student = students(kind)
    # a view made with gradients on holds its parameter's accumulator
    held = next(p for p in student.parameters() if p.requires_grad).view(-1)
    _accumulators_alive(student, marked=False)
    assert len(_accumulators_alive(student, marked=True)) == 1  # the check sees what something holds
    del held
    engine = _engine(cfg, student, world=1)
    _accumulators_alive(student, marked=False)
    assert _accumulators_alive(student, marked=True) == []
    if kind == "kd":
        loss = engine(ids).logits.float().square().mean()
    else:
        with torch.no_grad():
            hidden = list(teacher_factory()(ids, output_hidden_states=True).hidden_states)
        loss = engine((hidden, hidden[1:]))
    engine.backward(loss)
    engine.step()
    del loss
    assert _accumulators_alive(student, marked=True) == []
    engine.save_checkpoint(str(tmp_path), tag=DS_TAG, client_state={"step": 1})
    _accumulators_alive(student, marked=False)
    assert _resume(engine, Checkpoint.from_directory(str(tmp_path))) == 1
    assert _accumulators_alive(student, marked=True) == []
    engine.destroy()


def train(kind: str, graphed: bool, steps: int = 3) -> tuple[dict, list[float]]:
    """(the student's weights, the step losses) after `steps` steps of jobs.train's step in this process (inside
    one process group for all: DeepSpeed keeps the groups it made of the first)."""
    from cluster.teacher import LocalTeacher
    from jobs.stages.ild import ILD_OBJECTIVE
    from jobs.train import TargetsAhead, _engine, _graphed, _optimizer_step, kd_objective
    from zebra.cuda_graphs import is_graphed

    device = torch.device("cuda")
    cfg = TrainConfig(workers=1, use_gpu=True, zero_stage=2, micro_batch=MICRO, seq_len=SEQ, grad_accum=2,
                      bf16=False, lr=3e-3, total_steps=100, cuda_graphs=graphed)
    objective = kd_objective() if kind == "kd" else ILD_OBJECTIVE
    gen = torch.Generator().manual_seed(0)
    batches = ({"input_ids": torch.randint(0, VOCAB, (MICRO, SEQ), generator=gen)} for _ in itertools.count())
    teacher = LocalTeacher(teacher_factory, device)
    engine = _graphed(_engine(cfg, students(kind), world=1), cfg)
    targets = TargetsAhead(batches, teacher, objective, cfg, device, count=steps * cfg.grad_accum)
    losses = [float(_optimizer_step(engine, objective, targets, cfg, device)) for _ in range(steps)]
    assert is_graphed(engine.module) == graphed
    weights = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    engine.destroy()
    return weights, losses


@pytest.fixture(scope="module")
def process_group():
    from benchmarks.train_step import one_rank_group

    with one_rank_group(torch.device("cuda")):
        yield


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["kd", "ild"])
def test_graphed_step_trains_as_the_eager_step(kind, process_group):
    eager, eager_losses = train(kind, graphed=False)
    graphed, graphed_losses = train(kind, graphed=True)
    print(kind, eager_losses, graphed_losses)
    assert eager_losses[-1] != eager_losses[0]  # the weights moved
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    for name, value in eager.items():
        torch.testing.assert_close(graphed[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["kd", "ild"])
def test_student_step_never_waits_for_the_host(kind, process_group):
    """What a capture needs: the student's forward and backward, as the stage's objective runs them in the
    DeepSpeed engine's module, make no host synchronisation (torch.cuda.set_sync_debug_mode raises at the first,
    with the traceback that names it)."""
    from cluster.teacher import LocalTeacher
    from jobs.stages.ild import ILD_OBJECTIVE
    from jobs.train import TargetsAhead, _engine, kd_objective

    device = torch.device("cuda")
    cfg = TrainConfig(workers=1, use_gpu=True, zero_stage=2, micro_batch=MICRO, seq_len=SEQ, bf16=False, total_steps=10)
    objective = kd_objective() if kind == "kd" else ILD_OBJECTIVE
    batches = itertools.repeat({"input_ids": torch.randint(0, VOCAB, (MICRO, SEQ))})
    engine = _engine(cfg, students(kind), world=1)
    batch, targets = TargetsAhead(batches, LocalTeacher(teacher_factory, device), objective, cfg, device, 2).next()
    module = engine.module
    trained = [p for p in module.parameters() if p.requires_grad]
    for warm_up in (True, False):  # the first call's lazy set-up may sync; a graph is captured after warm-ups
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("default" if warm_up else "error")
        try:
            loss = objective.loss(module, targets, batch)
            grads = torch.autograd.grad(loss, trained, allow_unused=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert any(g is not None for g in grads)
    engine.destroy()
