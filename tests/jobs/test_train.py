"""Ray Train + DeepSpeed distillation: two workers, tiny random Llamas as teacher and student.

On CPU: the teacher actor against the teacher in-process, and an in-process top-k run. Learning under
ZeRO-2 (teacher actors) and ZeRO-3 (teacher in-process), a worker killed mid-stage (resume from the last checkpoint,
exact step accounting) and the no-op rerun are tested through the pipeline (tests/jobs/test_pipeline.py),
which runs this same distill(); on GPU: bf16 learning under both stages and the CUDA-IPC teacher."""
import functools
import sys

import pytest
import ray

import ray.cloudpickle
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cluster.teacher import LocalTeacher, start_teacher
from jobs.train import TargetsAhead, TrainConfig, distill, kd_objective
from zebra.losses import TopKLogprobs, kd_loss

# The factories below live in this test module, which Ray workers cannot import by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

VOCAB, SEQ, MICRO = 128, 16, 4


def tiny_llama(seed: int, logit_scale: float = 1.0) -> LlamaForCausalLM:
    """hidden 32, 2 layers, 4 heads, 2 KV heads, vocab 128; logit_scale sharpens the output."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model.eval()


teacher_factory = functools.partial(tiny_llama, seed=1, logit_scale=40.0)  # peaked: KL starts large
student_factory = functools.partial(tiny_llama, seed=2)


def random_tokens(rank: int, world: int, start: int, seed: int = 0):
    """Micro-batch i of a rank is a pure function of (seed, rank, i): a resumed run sees the same data."""
    i = start
    while True:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i * world + rank)
        yield {"input_ids": torch.randint(0, VOCAB, (MICRO, SEQ), generator=gen)}
        i += 1


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(ray_session):
    yield


def config(**overrides) -> TrainConfig:
    fields = dict(workers=2, total_steps=12, micro_batch=MICRO, seq_len=SEQ, lr=1e-2, checkpoint_every=4, log_every=1)
    fields.update(overrides)
    return TrainConfig(**fields)


def held_out_kd(student) -> float:
    """KD loss of `student` against the teacher on tokens no worker trained on."""
    ids = next(random_tokens(0, 1, 0, seed=99))["input_ids"]
    with torch.no_grad():
        return kd_loss(student.eval()(ids).logits, teacher_factory()(ids).logits).item()


@ray.remote(num_cpus=0.5)
def remote_teacher_outputs(ids):
    """What a worker receives from a teacher actor started beside it."""
    teacher = start_teacher(teacher_factory, "actor", torch.device("cpu"), num_cpus=0.5)
    return (teacher.hidden_states(ids), teacher.logits(ids), teacher.logits(ids, top_k=5, temperature=2.0),
            teacher.hidden_states(ids, mixers=True))


@pytest.mark.slow
def test_teacher_actor_matches_local_teacher():
    ids = next(random_tokens(0, 1, 0, seed=7))["input_ids"]
    hidden, logits, top, (hidden_m, mixers) = ray.get(remote_teacher_outputs.remote(ids))
    local = LocalTeacher(teacher_factory)
    model = local.model
    with torch.no_grad():
        hf = model(ids, output_hidden_states=True)
    assert len(hidden) == model.config.num_hidden_layers + 1
    for got, want in zip(hidden[:-1], hf.hidden_states[:-1]):  # the input of each decoder layer
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.model.norm(hidden[-1]), hf.hidden_states[-1])  # last: before the norm
    local_hidden, local_mixers = local.hidden_states(ids, mixers=True)  # the actor ships (hidden, mixers) whole
    assert len(mixers) == model.config.num_hidden_layers
    for got, want in zip([*hidden_m, *mixers], [*local_hidden, *local_mixers]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(logits, hf.logits)
    local_top = local.logits(ids, top_k=5, temperature=2.0)
    assert isinstance(top, TopKLogprobs) and top.temperature == 2.0
    torch.testing.assert_close(top.logprobs, local_top.logprobs)
    assert torch.equal(top.indices, local_top.indices)


@ray.remote(num_cpus=0.5)
def targets_ahead_run(count: int):
    """In a worker-like task: TargetsAhead over a teacher actor; after each micro-batch is handed back, how many
    the data iterator had given, and every (ids, logits) pair; then one take too many."""
    drawn = []

    def batches():
        for i, batch in enumerate(random_tokens(0, 1, 0, seed=3)):
            drawn.append(i)
            yield batch

    teacher = start_teacher(teacher_factory, "actor", torch.device("cpu"), num_cpus=0.5)
    cfg = config(workers=1)
    ahead = TargetsAhead(batches(), teacher, kd_objective(), cfg, torch.device("cpu"), count)
    taken, drawn_after = [], []
    for _ in range(count):
        batch, logits = ahead.next()
        ahead.pending and ahead.pending.result()  # the request for the next one, sent before this returned
        drawn_after.append(len(drawn))
        taken.append((batch["input_ids"], logits))
    try:
        ahead.next()
        overrun = None
    except RuntimeError as e:
        overrun = str(e)
    ahead.close()
    return taken, drawn_after, len(drawn), overrun


@pytest.mark.slow
def test_targets_ahead_asks_the_actor_one_micro_batch_early():
    """With a teacher actor the next micro-batch's request is out before this one is handed back; the pairs are
    the plain iterator's micro-batches with the teacher's own logits, in order, and none beyond count is drawn."""
    count = 4
    taken, drawn_after, drawn, overrun = ray.get(targets_ahead_run.remote(count))
    assert drawn_after == [2, 3, 4, 4]  # one ahead, and nothing past the last
    assert drawn == count
    assert overrun is not None and str(count) in overrun
    local = LocalTeacher(teacher_factory)
    for (ids, logits), want in zip(taken, random_tokens(0, 1, 0, seed=3)):
        assert torch.equal(ids, want["input_ids"])
        torch.testing.assert_close(logits, local.logits(ids))


@pytest.mark.slow
def test_inprocess_teacher_with_top_k(tmp_path):
    """One worker: the teacher in the worker's process and the top-k objective do not depend on the
    world size (two workers are tested through the pipeline), and a second DeepSpeed process costs
    most of this test's time on 2 cores."""
    cfg = config(workers=1, teacher_mode="inprocess", total_steps=6, checkpoint_every=6, log_every=2)
    out = distill(cfg, student_factory, teacher_factory, kd_objective(top_k=8), random_tokens, str(tmp_path), "kd")
    losses = [m["loss"] for m in out.history]
    print(losses)
    assert [m["step"] for m in out.history] == [2, 4, 6]
    assert losses[-1] < losses[0]


@ray.remote(num_gpus=1, num_cpus=0.5)
def gpu_teacher_check(ids):
    """In a GPU task: an actor teacher beside it, its outputs against the same teacher in-process."""
    device = torch.device("cuda:0")
    remote = start_teacher(teacher_factory, "actor", device, num_cpus=0.5)
    local = LocalTeacher(teacher_factory, device)
    shipped = ray.get(remote.actor.logits.remote(ids))
    got, want = remote.logits(ids), local.logits(ids)
    hidden, mixers = remote.hidden_states(ids, mixers=True)
    local_hidden, local_mixers = local.hidden_states(ids, mixers=True)
    return {
        "shipped_as": type(shipped).__name__,
        "device": str(got.device),
        "max_diff": (got - want).abs().max().item(),
        "hidden_diff": max((a - b).abs().max().item()
                           for a, b in zip([*hidden, *mixers], [*local_hidden, *local_mixers])),
    }


@pytest.mark.gpu
def test_gpu_teacher_actor_shares_its_gpu_through_ipc():
    ids = next(random_tokens(0, 1, 0, seed=7))["input_ids"]
    out = ray.get(gpu_teacher_check.remote(ids))
    print(out)
    assert out["shipped_as"] == "_CudaHandle"  # a CUDA IPC handle, not tensor bytes through the object store
    assert out["device"] == "cuda:0"
    assert out["max_diff"] < 1e-5 and out["hidden_diff"] < 1e-5


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_gpu_bf16_student_learns_teacher(tmp_path, zero_stage):
    """Two workers where there are two GPUs; on one, one worker accumulates two micro-batches a step, so that the
    student sees the same tokens per step either way (with half of them it fell short of the bar on one H200)."""
    workers = min(2, torch.cuda.device_count())
    cfg = config(use_gpu=True, bf16=True, workers=workers, grad_accum=2 // workers, zero_stage=zero_stage)
    out = distill(cfg, student_factory, teacher_factory, kd_objective(), random_tokens, str(tmp_path), "kd")
    assert [m["step"] for m in out.history] == list(range(1, cfg.total_steps + 1))
    state = out.student_state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    student = student_factory()
    before = held_out_kd(student)
    student.load_state_dict(state)
    after = held_out_kd(student)
    print(f"GPU ZeRO-{zero_stage}: held-out KD {before:.3f} -> {after:.3f}")
    assert after < 0.85 * before
