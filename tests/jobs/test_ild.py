"""The ILD stage's objective: the official Zebra-Llama loss on layer and mixer outputs, checked
against a float64 hand computation on a tiny teacher and its converted, perturbed students."""
import copy
import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.teacher import LocalTeacher, map_tensors
from jobs.context import batches
from jobs.spec import SpecError, load_spec
from jobs.stages.ild import ILD_OBJECTIVE, StudentPair, held_out_ild
from jobs.train import STUDENT_STATE_FILE, Session, TrainConfig, train_worker
from tests.conftest import save_perturbed_students
from tests.jobs.conftest import teacher_dir  # noqa: F401 (module fixture)

BATCH, SEQ = 2, 12


@pytest.fixture(scope="module")
def students(teacher_dir, tmp_path_factory):  # noqa: F811
    """(mla_dir, mamba_dir): the teacher converted to pure students, perturbed so the loss is not ~0."""
    return save_perturbed_students(teacher_dir, tmp_path_factory.mktemp("students"), scale=0.02, seed=1)


def _teacher(teacher_dir):  # noqa: F811
    return LocalTeacher(lambda: AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32))


def test_teacher_mixer_outputs_are_the_attention_outputs(teacher_dir):  # noqa: F811
    """Each captured attention output a_i closes layer i: h_i + a_i + mlp(norm(h_i + a_i)) = h_{i+1} (float64)."""
    teacher = _teacher(teacher_dir)
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    hidden, attn = teacher.hidden_states(ids, mixers=True)
    assert len(hidden) == len(attn) + 1 == teacher.model.config.num_hidden_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(hidden, teacher.hidden_states(ids)))
    layers = copy.deepcopy(teacher.model.model.layers).double()
    for i, layer in enumerate(layers):
        mid = hidden[i].double() + attn[i].double()
        closed = mid + layer.mlp(layer.post_attention_layernorm(mid))
        torch.testing.assert_close(closed, hidden[i + 1].double(), rtol=1e-4, atol=1e-5)
        assert attn[i].abs().mean() > 1e-3  # a real output, not zeros


def test_ild_objective_matches_float64_official_loss(teacher_dir, students):  # noqa: F811
    """StudentPair's per-student loss = sum over layers of mean_t ||out_s - out_t||_2 + mean_t ||mix_s - mix_t||_2."""
    teacher = _teacher(teacher_dir)
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    hidden, attn = teacher.hidden_states(ids, mixers=True)
    pair = StudentPair(*students)
    got = pair.layer_losses(hidden, attn)
    ref_pair = copy.deepcopy(pair).double()
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    with torch.no_grad():
        for kind in ("mla", "mamba"):
            expected = torch.zeros((), dtype=torch.float64)
            for i, layer in enumerate(getattr(ref_pair, kind).model.layers):
                x = hidden[i].double()
                mixed = layer.mixer(layer.input_layernorm(x), pos)
                out = x + mixed + layer.mlp(layer.post_attention_layernorm(x + mixed))
                expected += ((out - hidden[i + 1].double()) ** 2).sum(-1).sqrt().mean()
                expected += ((mixed - attn[i].double()) ** 2).sum(-1).sqrt().mean()
            assert expected > 1e-2
            torch.testing.assert_close(got[kind].double(), expected, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(pair((hidden, attn)), sum(got.values()))


def test_loss_backends_agree_and_stay_outside_the_stage_hash(teacher_dir, students):  # noqa: F811
    """ild.loss_backend "triton" (kernels.token_l2; TRITON_INTERPRET on a CPU) and "torch" give the same losses and
    student gradients; the field does not change the ILD section's hash (a resumed run keeps its stage)."""
    teacher = _teacher(teacher_dir)
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    targets = teacher.hidden_states(ids, mixers=True)
    results = []
    for backend in ("triton", "torch"):
        pair = StudentPair(*copy.deepcopy(students), loss_backend=backend)
        loss = pair(targets)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in pair.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    hashes = {load_spec({"ild": {"loss_backend": b}}).section_hash("ild") for b in ("auto", "triton", "torch")}
    assert len(hashes) == 1
    with pytest.raises(SpecError, match="ild.loss_backend"):
        load_spec({"ild": {"loss_backend": "fast"}})


@pytest.mark.parametrize("train_mlp_norms", [False, True])
def test_trainable_parts_and_one_group_per_student(students, train_mlp_norms):
    pair = StudentPair(*students, train_mlp_norms=train_mlp_norms)
    trainable = {n for n, p in pair.named_parameters() if p.requires_grad}
    assert trainable and all(".layers." in n for n in trainable)
    assert any(".mixer." in n for n in trainable)
    assert any(".mlp." in n for n in trainable) == train_mlp_norms
    assert any("layernorm" in n for n in trainable) == train_mlp_norms
    groups = pair.param_groups()
    assert [sum(p.numel() for p in g["params"]) for g in groups] == [
        sum(p.numel() for p in getattr(pair, k).parameters() if p.requires_grad) for k in ("mla", "mamba")]


def testmap_tensors_reaches_nested_outputs():
    """The actor ships (hidden, mixers) as a tuple of lists: every tensor in it goes through fn."""
    a, b, c = torch.ones(2), torch.zeros(3), torch.full((1,), 2.0)
    hidden, attn = map_tensors(lambda t: t + 1, ([a, b], [c]))
    assert [t.tolist() for t in hidden] == [[2.0, 2.0], [1.0, 1.0, 1.0]] and attn[0].tolist() == [3.0]


def test_ild_trains_through_the_recipe(teacher_dir, students, one_rank_group):  # noqa: F811
    """ILD_OBJECTIVE in train_worker (one rank, teacher in-process): both students' losses fall,
    each student is clipped as its own group, and only trainable parts move."""
    steps = 6
    cfg = TrainConfig(workers=1, zero_stage=2, lr=3e-3, warmup_frac=0.0, total_steps=steps, micro_batch=2,
                      seq_len=SEQ, teacher_mode="inprocess", checkpoint_every=steps, log_every=1, grad_clip=0.5)
    ids = torch.randint(0, 1000, (8, SEQ), generator=torch.Generator().manual_seed(4)).numpy()
    reports = []
    session = Session(rank=0, world=1, device=torch.device("cpu"), get_checkpoint=lambda: None,
                      report=lambda metrics, folder: reports.append(
                          (metrics, torch.load(Path(folder) / STUDENT_STATE_FILE) if folder else None)))
    teacher_factory = functools.partial(AutoModelForCausalLM.from_pretrained, teacher_dir, dtype=torch.float32)
    factory = functools.partial(StudentPair, *students)
    train_worker(dict(cfg=cfg, student_factory=factory, teacher_factory=teacher_factory, objective=ILD_OBJECTIVE,
                      data_factory=functools.partial(batches, ids, 0, 2)), session)
    assert [m["step"] for m, _ in reports] == list(range(1, steps + 1))
    teacher = _teacher(teacher_dir)
    held = torch.from_numpy(ids[:2])
    before = held_out_ild(factory(), teacher, held)
    pair = factory()
    pair.load_state_dict(reports[-1][1])
    after = held_out_ild(pair, teacher, held)
    assert all(after[k] < before[k] for k in ("mla", "mamba")), (before, after)
    start = factory().state_dict()
    moved = {n for n, v in pair.state_dict().items() if not torch.equal(v, start[n])}
    assert moved and all(".mixer." in n for n in moved)


def test_held_out_ild_in_batches_equals_one_pass(teacher_dir, students):  # noqa: F811
    """The stage's held-out ILD loss runs a few sequences at a time (on the driver's GPU at real sizes):
    the same figure as all sequences at once, with a last batch shorter than the others."""
    pair, teacher = StudentPair(*students).eval(), _teacher(teacher_dir)
    ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(3))
    whole = held_out_ild(pair, teacher, ids, batch=len(ids))
    batched = held_out_ild(pair, teacher, ids, batch=2)
    assert set(whole) == {"mla", "mamba"} and all(v > 0 for v in whole.values())
    for kind in whole:
        assert batched[kind] == pytest.approx(whole[kind], rel=1e-5)


def test_compiled_students_train_as_eager_ones(teacher_dir, students, one_rank_group, monkeypatch):  # noqa: F811
    """TrainConfig.compile (on GPUs by default; here forced, on torch.compile's aot_eager backend, which runs the
    captured graphs op by op): train_worker compiles the students' layers with their losses (one graph per kind of
    layer), logs it, and ILD's steps end where the eager ones do; the checkpoint keeps the plain parameter names (a
    fresh StudentPair loads it strictly)."""
    from torch._dynamo.utils import counters

    import jobs.train

    steps = 2
    ids = torch.randint(0, 1000, (4, SEQ), generator=torch.Generator().manual_seed(6)).numpy()
    teacher_factory = functools.partial(AutoModelForCausalLM.from_pretrained, teacher_dir, dtype=torch.float32)
    factory = functools.partial(StudentPair, *students)
    monkeypatch.setenv(jobs.train.COMPILE_BACKEND_ENV, "aot_eager")
    finals, logged = {}, []
    monkeypatch.setattr(jobs.train.log, "info", lambda msg, *args: logged.append(msg % args))
    for compile in (False, True):
        torch._dynamo.reset()
        counters.clear()
        cfg = TrainConfig(workers=1, zero_stage=2, lr=3e-3, warmup_frac=0.0, total_steps=steps, micro_batch=2,
                          seq_len=SEQ, teacher_mode="inprocess", checkpoint_every=steps, log_every=steps,
                          compile=compile)
        reports = []
        session = Session(rank=0, world=1, device=torch.device("cpu"), get_checkpoint=lambda: None,
                          report=lambda metrics, folder: reports.append(
                              torch.load(Path(folder) / STUDENT_STATE_FILE) if folder else None))
        train_worker(dict(cfg=cfg, student_factory=factory, teacher_factory=teacher_factory, objective=ILD_OBJECTIVE,
                          data_factory=functools.partial(batches, ids, 0, 2)), session)
        finals[compile] = reports[-1]
    # each layer's step of the loss (layer and ild_loss) is one graph per kind of layer, shared by its 4 layers
    assert counters["stats"]["unique_graphs"] == 2
    layers = sum(len(getattr(factory(), kind).model.layers) for kind in ("mla", "mamba"))
    assert [m for m in logged if "compiled" in m] == [
        f"student: {layers} decoder layers compiled (torch.compile, backend aot_eager)"]
    firsts = [m for m in logged if m.startswith("step 1 took")]
    assert len(firsts) == 2 and ["torch.compile" in m for m in firsts] == [False, True]
    factory().load_state_dict(finals[True], strict=True)
    start = factory().state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in finals[True].items())
    for name, value in finals[False].items():
        torch.testing.assert_close(finals[True][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("compile, zero_stage, use_gpu, expected", [
    (False, 2, True, False), ("auto", 2, True, True), ("auto", 3, True, False), ("auto", 2, False, False),
    (True, 2, False, True)])
def test_compile_setting_resolves_per_worker(compile, zero_stage, use_gpu, expected):
    from jobs.train import resolve_compile

    assert resolve_compile(compile, use_gpu, zero_stage) is expected


def test_compile_with_zero3_fails_naming_the_field():
    with pytest.raises(ValueError, match="TrainConfig.compile=True"):
        TrainConfig(zero_stage=3, compile=True)
    with pytest.raises(ValueError, match="TrainConfig.compile='yes'"):
        TrainConfig(compile="yes")
