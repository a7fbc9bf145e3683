"""The recipe's optimizer and schedule (jobs.train): per-group gradient clipping (ILD: per student)
and warmup + cosine to min_lr_ratio, by hand on tiny models and through a one-rank DeepSpeed engine."""
import math

import pytest
import torch
from torch import nn

from jobs.train import GroupClippedAdamW, TrainConfig, _engine, lr_ratio


class TwoStudents(nn.Module):
    """Two independent linear 'students' whose summed loss trains both; one parameter group each."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

    def param_groups(self):
        return [{"params": list(self.a.parameters())}, {"params": list(self.b.parameters())}]

    def forward(self, x):
        return 50.0 * self.a(x).square().mean() + 0.01 * self.b(x).square().mean()


def _group_norms64(model: TwoStudents, x: torch.Tensor) -> list[float]:
    """Float64 gradient norm of each student, by hand."""
    ref = TwoStudents().double()
    ref.load_state_dict(model.state_dict())
    ref(x.double()).backward()
    return [math.sqrt(sum(float((p.grad ** 2).sum()) for p in m.parameters())) for m in (ref.a, ref.b)]


def test_each_group_is_clipped_on_its_own():
    model, x = TwoStudents(), torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    norms = _group_norms64(model, x)
    max_norm = 1.0
    assert norms[0] > 10 * max_norm and norms[1] < max_norm  # one student over the limit, one under
    opt = GroupClippedAdamW(model.param_groups(), max_norm=max_norm, lr=0.0)
    model(x).backward()
    raw_b = [p.grad.clone() for p in model.b.parameters()]
    opt.step()
    assert [float(g["grad_norm"]) for g in opt.param_groups] == pytest.approx(norms, rel=1e-5)
    clipped = [math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in m.parameters())) for m in (model.a, model.b)]
    assert clipped[0] == pytest.approx(max_norm, rel=1e-5)  # the big one cut to max_norm
    assert all(torch.equal(p.grad, g) for p, g in zip(model.b.parameters(), raw_b))  # the small one untouched
    # one shared clip would have scaled the small student by max_norm / global norm as well
    assert max_norm / math.hypot(*norms) < 0.1


def test_a_group_with_a_non_finite_gradient_steps_without_it():
    """An inf in one student's gradient: that group steps with a zero gradient (its weights only decay, no
    NaN reaches them or the moments); the other group steps as usual."""
    model, x = TwoStudents(), torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    twin = TwoStudents()
    opt = GroupClippedAdamW(model.param_groups(), max_norm=1.0, lr=1e-2, weight_decay=0.1)
    ref = GroupClippedAdamW(twin.param_groups(), max_norm=1.0, lr=1e-2, weight_decay=0.1)
    model(x).backward()
    twin(x).backward()
    model.a.weight.grad[0, 0] = float("inf")
    before_a = [p.detach().clone() for p in model.a.parameters()]
    opt.step()
    ref.step()
    assert not math.isfinite(float(opt.param_groups[0]["grad_norm"]))
    for p, p0 in zip(model.a.parameters(), before_a):  # decoupled decay only: p0 * (1 - lr * wd)
        assert torch.isfinite(p).all() and torch.allclose(p, p0 * (1 - 1e-2 * 0.1))
        assert torch.isfinite(opt.state[p]["exp_avg"]).all() and not opt.state[p]["exp_avg"].any()
    for p, q in zip(model.b.parameters(), twin.b.parameters()):  # the healthy student: as without the inf
        assert torch.equal(p, q)


@pytest.mark.parametrize("warmup,total,min_ratio", [(0, 10, 0.0), (1, 10, 0.0), (4, 20, 0.1)])
def test_lr_ratio_warmup_then_cosine(warmup, total, min_ratio):
    ratios = [lr_ratio(s, warmup, total, min_ratio) for s in range(total + 1)]
    assert ratios[0] > 0  # never a step at lr 0, even with a one-step warmup
    assert ratios[0] == pytest.approx(1.0 / warmup if warmup else 1.0)
    assert ratios[warmup] == pytest.approx(1.0)
    mid = warmup + (total - warmup) // 2
    expected_mid = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (mid - warmup) / (total - warmup)))
    assert ratios[mid] == pytest.approx(expected_mid)
    assert ratios[total] == pytest.approx(min_ratio)  # cosine ends at min_ratio (0: to zero)
    assert ratios[-2] > ratios[-1] and all(a <= b for a, b in zip(ratios[:warmup], ratios[1:warmup + 1]))




@pytest.mark.parametrize("zero_stage", [2, 3])
def test_engine_clips_per_student_and_follows_the_schedule(one_rank_group, zero_stage):
    """Through DeepSpeed ZeRO-2 and 3 (one CPU rank): the optimizer sees each student's norm apart, and
    the learning rate per step is lr * lr_ratio."""
    cfg = TrainConfig(workers=1, zero_stage=zero_stage, lr=1e-2, warmup_frac=0.25, total_steps=4, micro_batch=8,
                      grad_clip=1.0, min_lr_ratio=0.0)
    model, x = TwoStudents(), torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    norms = _group_norms64(model, x)
    engine = _engine(cfg, model, world=1)
    lrs = []
    for step in range(cfg.total_steps):
        lrs.append(engine.get_lr()[0])
        engine.backward(engine(x))
        engine.step()
        if step == 0:  # ZeRO steps one group at a time: each group's own norm, not the global one
            assert [float(g["grad_norm"]) for g in engine.basic_optimizer.param_groups] == pytest.approx(norms, rel=1e-4)
    assert lrs == pytest.approx([cfg.lr * lr_ratio(s, 1, 4, 0.0) for s in range(4)])
    assert lrs[0] == pytest.approx(cfg.lr)


class OddSizes(nn.Module):
    """Vectors of 9 elements between matrices, as a hybrid's dt_bias / A_log / D sit between its projections."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.odd, self.second, self.odd2, self.third = (
            nn.Linear(8, 8), nn.Parameter(torch.randn(9)), nn.Linear(8, 8), nn.Parameter(torch.randn(3)),
            nn.Linear(8, 8))

    def forward(self, x):
        return (self.third(self.second(self.first(x)) * self.odd[:8].sum() * self.odd2.sum())).square().mean()


def test_zero2_keeps_every_weight_16_byte_aligned(one_rank_group):
    """ZeRO-2 packs the weights into one flat buffer; with the stage's config every weight starts on a 16-byte
    boundary however odd the sizes before it (cuBLAS's fast kernels need it), and training still works."""
    cfg = TrainConfig(workers=1, zero_stage=2, lr=1e-2, total_steps=2, micro_batch=4)
    model = OddSizes()
    engine = _engine(cfg, model, world=1)
    misaligned = [name for name, p in engine.module.named_parameters() if p.data_ptr() % 16]
    assert not misaligned, misaligned
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    before = engine.module.third.weight.detach().clone()
    engine.backward(engine(x))
    engine.step()
    assert not torch.equal(before, engine.module.third.weight)


def test_engine_steps_without_synchronising_the_device(one_rank_group, monkeypatch):
    """A training step must not wait for the device: DeepSpeed's throughput timer synchronised it at every
    forward and step (two drains a step of a host-bound GPU step); the stage's config turns it off."""
    from deepspeed.accelerator import get_accelerator

    cfg = TrainConfig(workers=1, zero_stage=2, lr=1e-2, total_steps=3, micro_batch=4)
    engine = _engine(cfg, OddSizes(), world=1)
    accelerator, calls = get_accelerator(), []
    monkeypatch.setattr(accelerator, "synchronize", lambda *a, **k: calls.append(a))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        engine.backward(engine(x))
        engine.step()
    assert calls == []


def test_spec_fields_reach_the_recipe_and_are_checked():
    from jobs.context import train_config
    from jobs.spec import SpecError, load_spec

    spec = load_spec({"ild": {"grad_clip": 0.5, "min_lr_ratio": 0.1, "train_mlp_norms": True}})
    cfg = train_config(spec, spec.ild)
    assert (cfg.grad_clip, cfg.min_lr_ratio, spec.ild.train_mlp_norms) == (0.5, 0.1, True)
    assert train_config(spec, spec.kd).min_lr_ratio == 0.0  # the official cosine to zero by default
    for section, value, field in (("kd", {"min_lr_ratio": 1.5}, "min_lr_ratio"), ("ild", {"grad_clip": 0}, "grad_clip"),
                                  ("kd", {"train_mlp_norms": True}, "train_mlp_norms")):
        with pytest.raises(SpecError, match=field):
            load_spec({section: value})
    with pytest.raises(ValueError, match="TrainConfig.grad_clip"):
        TrainConfig(grad_clip=0.0)


def test_window_reads_the_losses_once_and_times_only_its_steps():
    """The report's window keeps each step's loss on the device (a host read per step would drain the GPU
    queue), averages them at the report, and counts wall time from its (re)start: the time spent on the
    previous report (held-out figures, a checkpoint) is no step's."""
    import time

    from jobs.train import _Window

    cfg = TrainConfig(workers=1, micro_batch=4, seq_len=8, total_steps=10)
    window = _Window()
    time.sleep(0.3)  # a report's work, before the restart
    window.restart()
    losses = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).float()
    for loss in losses:
        window.add(loss.clone())
    metrics = window.flush(step=3, cfg=cfg, lr=1e-3, resumed_from=0)
    assert metrics["loss"] == pytest.approx(float(losses.double().mean()), rel=1e-6)
    assert metrics["step_s"] < 0.1 and metrics["tokens_per_s"] == pytest.approx(cfg.tokens_per_step / metrics["step_s"])
    assert window.losses == [] and metrics["tokens"] == 3 * cfg.tokens_per_step


def test_first_step_is_logged_and_left_out_of_the_first_reports_speed(monkeypatch, caplog):
    """A worker group's first step (compiles, first kernel calls) is logged with its time, and the first report's
    speed counts only the steps after it, while its loss still averages every step (a fake clock: no timing)."""
    import logging

    import jobs.train
    from jobs.train import _first_step, _Window

    now = [0.0]
    monkeypatch.setattr(jobs.train.time, "perf_counter", lambda: now[0])
    cfg = TrainConfig(workers=1, micro_batch=4, seq_len=8, total_steps=10)
    losses = torch.rand(3, generator=torch.Generator().manual_seed(8))
    window = _Window()
    now[0] = 12.5  # the first step: 12.5 s
    window.add(losses[0].clone())
    with caplog.at_level(logging.INFO, logger="jobs.train"):
        _first_step(window, step=1, rank=0, cfg=cfg, clock_restart=True)
    assert "step 1 took 12.5 s: the first of these workers" in caplog.text
    for i, loss in enumerate(losses[1:], start=1):  # then 2 steps of 0.5 s
        now[0] = 12.5 + 0.5 * i
        window.add(loss.clone())
    metrics = window.flush(step=3, cfg=cfg, lr=1e-3, resumed_from=0)
    assert metrics["step_s"] == pytest.approx(0.5) and metrics["tokens_per_s"] == pytest.approx(cfg.tokens_per_step / 0.5)
    assert metrics["loss"] == pytest.approx(float(losses.double().mean()), rel=1e-6)
    # a first step that is reported at once keeps its time in that report
    window.restart()
    now[0] += 6.0
    window.add(losses[0].clone())
    _first_step(window, step=1, rank=1, cfg=cfg, clock_restart=False)
    assert window.flush(step=1, cfg=cfg, lr=1e-3, resumed_from=0)["step_s"] == pytest.approx(6.0)
