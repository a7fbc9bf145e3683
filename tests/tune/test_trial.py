"""One recipe: a Tune trial (tune.trial.run_trial, through jobs.train.distill_in_tune) takes the same
optimizer steps as the pipeline's kd stage (jobs.train's Ray Train entry point, with the kd stage's
kd_recipe) on the same batches: the same losses and the same updated weights.

Both entry points run in this process with Ray's report/checkpoint calls replaced by recorders, one
DeepSpeed rank on a gloo group of one, so no Ray cluster starts (seconds)."""
import dataclasses
import functools
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
import ray.train
import ray.tune
import torch
from transformers import AutoModelForCausalLM

import jobs.train
from cluster.storage import LocalStorage
from jobs.context import batches, kd_recipe
from jobs.spec import load_spec
from jobs.train import STUDENT_STATE_FILE
from tests.conftest import save_perturbed_students
from tests.jobs.conftest import teacher_dir  # noqa: F401 (module fixture)
from tune.space import Arm
from tune.trial import SharedStudents, TrialPlan, arm_layers, run_trial, trial_recipe
from zebra.hybrid import compose_hybrid
from zebra.smart import select_mla_layers

STEPS, MICRO, SEQ = 3, 2, 32  # warmup_frac 0: step 1 runs at the peak lr, 2 and 3 on the cosine down


class Recorder:
    """Stands in for ray.train.report / ray.tune.report: keeps the metrics and the final student state."""

    def __init__(self):
        self.metrics, self.state = [], None

    def __call__(self, metrics, checkpoint=None):
        self.metrics.append(metrics)
        if checkpoint is not None and (Path(checkpoint.path) / STUDENT_STATE_FILE).exists():
            self.state = torch.load(Path(checkpoint.path) / STUDENT_STATE_FILE, weights_only=True)




def shared_students(root: Path, teacher_dir: Path) -> None:  # noqa: F811
    """ild/mla and ild/mamba in storage at root: conversions of the teacher, perturbed as after ILD."""
    save_perturbed_students(teacher_dir, root / "ild", scale=0.01, seed=0)


def spec_for(teacher: Path, storage: Path):
    """kd and tune sections of the same length, batch and learning rate; one worker, teacher in-process."""
    return load_spec({
        "teacher": {"source": str(teacher)}, "storage": {"uri": str(storage)},
        "student": {"kv_rank": 4, "qk_rope_dim": 2, "num_mla_layers": 2, "keep_terminal": False},
        "kd": {"workers": 1, "teacher_mode": "inprocess", "micro_batch": MICRO, "seq_len": SEQ,
               "tokens": STEPS * MICRO * SEQ, "lr": 3e-3, "warmup_frac": 0.0, "log_every": 1,
               "checkpoint_every": STEPS, "temperature": 2.0},
        "tune": {"num_mla_layers": [2], "kv_rank": [4], "q_rank": [None], "qk_rope_dim": [2], "steps": STEPS,
                 "micro_batch": MICRO, "seq_len": SEQ, "lr": 3e-3, "eval_every": 1, "grace_period": 1,
                 "cpus_per_trial": 1, "num_samples": 1},
    })


def test_trial_steps_are_kd_steps(teacher_dir, tmp_path, monkeypatch, one_rank_group):  # noqa: F811
    shared_students(tmp_path / "shared", teacher_dir)
    spec = spec_for(teacher_dir, tmp_path / "run")
    vocab = AutoModelForCausalLM.from_pretrained(teacher_dir).config.vocab_size
    ids = torch.randint(0, vocab, (12, SEQ), generator=torch.Generator().manual_seed(1)).numpy()
    arm = Arm(num_mla=2, kv_rank=4, q_rank=None, qk_rope_dim=2, kv_bytes_per_token=24, kv_fraction=0.1)
    plan = TrialPlan(spec=spec, teacher_dir=str(teacher_dir),
                     shared={2: SharedStudents(LocalStorage(tmp_path / "shared"), [0.1, 0.9, 0.8, 0.2])},
                     arms={arm.key: arm}, train_ids=ids[:8], held_ids=ids[8:])
    layers = arm_layers(plan, arm)

    # The pipeline's kd stage: its recipe through the Ray Train worker entry point.
    kd_cfg, teacher_factory, objective = kd_recipe(spec, str(teacher_dir))
    trial_cfg = trial_recipe(plan)[0]
    assert dataclasses.replace(trial_cfg, log_every=kd_cfg.log_every, checkpoint_every=kd_cfg.checkpoint_every,
                               compile=kd_cfg.compile, cuda_graphs=kd_cfg.cuda_graphs) == kd_cfg
    # trials are too short for the compile or the graphs' capture to pay
    assert (kd_cfg.compile, trial_cfg.compile, kd_cfg.cuda_graphs, trial_cfg.cuda_graphs) == ("auto", False, "auto", False)
    student_factory = functools.partial(compose_hybrid, str(tmp_path / "shared/ild/mla"),
                                        str(tmp_path / "shared/ild/mamba"), layers)
    kd = Recorder()
    storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), experiment_fs_path=str(tmp_path / "ray"))
    context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1, get_storage=lambda: storage)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setenv("LOCAL_RANK", "0")  # Ray Train sets it in its workers
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", kd)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the trial sets for tune.cpus_per_trial 1
    try:
        jobs.train._train_loop(dict(cfg=kd_cfg, student_factory=student_factory, teacher_factory=teacher_factory,
                                    objective=objective, data_factory=functools.partial(batches, ids[:8], spec.seed, MICRO)))
    finally:
        torch.set_num_threads(threads)

    # The Tune trial of the same arm.
    trial = Recorder()
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.tune, "report", trial)
    try:
        run_trial({"arm": arm.key}, plan)
    finally:
        torch.set_num_threads(threads)

    print([m["loss"] for m in kd.metrics], [m["loss"] for m in trial.metrics])
    assert [m["step"] for m in trial.metrics] == [m["step"] for m in kd.metrics] == [1, 2, 3]
    assert [m["loss"] for m in trial.metrics] == [m["loss"] for m in kd.metrics]
    assert all(m["kl"] > 0 and m["ppl"] > 1 and m["mla_layers"] == ",".join(map(str, layers)) for m in trial.metrics)
    before = student_factory().state_dict()
    assert kd.state.keys() == trial.state.keys() == before.keys()
    assert any(not torch.equal(kd.state[k], before[k]) for k in before)  # the steps moved the weights
    for k in before:
        assert torch.equal(trial.state[k], kd.state[k]), k


@pytest.mark.parametrize("placement", ["near_uniform", "spaced"])
def test_arm_layers_follow_the_spec_placement(tmp_path, placement):
    """arm_layers hands student.placement to SMART: the spec's shape, not always the default."""
    scores = [0.0, 0.0, 5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]
    student = {"kv_rank": 4, "qk_rope_dim": 2, "num_mla_layers": 3, "keep_terminal": False, "placement": placement}
    spec = load_spec({"teacher": {"source": "t"}, "storage": {"uri": str(tmp_path)}, "student": student})
    plan = SimpleNamespace(spec=spec, shared={2: SimpleNamespace(scores=scores)})
    layers = arm_layers(plan, SimpleNamespace(qk_rope_dim=2, num_mla=3))
    assert layers == select_mla_layers(scores, 3, False, None, placement)
    assert layers == ([0, 3, 7] if placement == "near_uniform" else [2, 3, 9])  # the shapes differ here
