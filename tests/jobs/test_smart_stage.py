"""SMART's per-choice hybrids (zebra.hybrid): swapping MLA layers into the loaded Mamba2 student in
place must give what composing each hybrid from the saved students (compose_hybrid) gives, and must
leave the Mamba2 student as it was."""
import torch

from tests.conftest import tiny_llama
from zebra.hybrid import (compose_hybrid, held_out_ce, held_out_kl, kl_of_choices, load_student, mla_layers_swapped_in,
                          teacher_logits, teacher_student_figures, teacher_student_kl)
from zebra.convert import convert, hybrid_config

CHOICES = [[], [0], [2], [1, 3]]


def saved_students(tmp_path, teacher):
    dirs = {}
    for kind, layers in (("mla", [0, 1, 2, 3]), ("mamba", [])):
        student = convert(teacher, hybrid_config(teacher.config, layers, kv_rank=8, qk_rope_dim=4, chunk_size=4))
        with torch.no_grad():  # students that differ from a plain conversion, as after ILD
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
        dirs[kind] = tmp_path / kind
        student.save_pretrained(dirs[kind])
    return str(dirs["mla"]), str(dirs["mamba"])


def test_swapped_layers_score_like_composed_hybrids(tmp_path):
    teacher = tiny_llama(dtype=torch.float32, seed=0)
    mla_dir, mamba_dir = saved_students(tmp_path, teacher)
    ids = torch.randint(0, teacher.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    logits = teacher_logits(teacher, ids)
    got = kl_of_choices(mla_dir, mamba_dir, CHOICES, logits, ids, torch.device("cpu"))
    want = [held_out_kl(compose_hybrid(mla_dir, mamba_dir, c), logits, ids) for c in CHOICES]
    assert len(set(round(k, 6) for k in want)) == len(want)  # the choices really differ
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)


def test_choices_scored_with_the_teacher_model_equal_scored_with_its_logits(tmp_path):
    """The GPU tasks' path (the teacher model in the task, logits recomputed per batch) gives the KLs of the
    path that ships the driver's logits."""
    teacher = tiny_llama(dtype=torch.float32, seed=0)
    mla_dir, mamba_dir = saved_students(tmp_path, teacher)
    ids = torch.randint(0, teacher.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(2))
    want = kl_of_choices(mla_dir, mamba_dir, CHOICES, teacher_logits(teacher, ids), ids, torch.device("cpu"))
    got = kl_of_choices(mla_dir, mamba_dir, CHOICES, teacher, ids, torch.device("cpu"))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)
    # the stage's task body, as a GPU task gets it: a teacher factory, not logits
    from jobs.stages.smart import _task

    threads = torch.get_num_threads()
    try:
        by_factory = _task(mla_dir, mamba_dir, CHOICES, lambda: teacher, ids)
    finally:
        torch.set_num_threads(threads)  # the task pins one thread
    torch.testing.assert_close(torch.tensor(by_factory), torch.tensor(want), rtol=1e-6, atol=0)


def test_swap_is_undone(tmp_path):
    teacher = tiny_llama(dtype=torch.float32, seed=0)
    mla_dir, mamba_dir = saved_students(tmp_path, teacher)
    mla, mamba = load_student(mla_dir), load_student(mamba_dir)
    layers, types = list(mamba.model.layers), list(mamba.config.mixer_types)
    with mla_layers_swapped_in(mamba, mla, [1, 3]) as hybrid:
        assert hybrid.config.mixer_types == ["mamba", "mla", "mamba", "mla"]
        assert hybrid.model.layers[3] is mla.model.layers[3]
    assert list(mamba.model.layers) == layers and mamba.config.mixer_types == types


def test_streamed_teacher_kl_equals_a_float64_kl_of_stored_logits(tmp_path):
    """The kd stage's held-out KL computes the teacher's logits a batch at a time (nothing n x seq x vocab
    kept): it must equal KL(teacher || student) of all logits at once, in float64, with a last batch
    shorter than the others."""
    teacher = tiny_llama(dtype=torch.float32, seed=0)
    mla_dir, mamba_dir = saved_students(tmp_path, teacher)
    student = compose_hybrid(mla_dir, mamba_dir, [1]).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        p = torch.log_softmax(teacher(ids).logits.double(), -1)
        q = torch.log_softmax(student(ids).logits.double(), -1)
    want = float((p.exp() * (p - q)).sum(-1).mean())
    got = teacher_student_kl(teacher, student, ids, batch=2)
    assert want > 1e-3
    assert abs(got - want) / want < 1e-5
    assert abs(held_out_kl(student, teacher_logits(teacher, ids), ids, batch=2) - want) / want < 1e-5


def test_held_out_figures_give_each_models_cross_entropy(tmp_path):
    """The kd stage's held-out figures in one pass: the KL as teacher_student_kl, and each model's next-token
    cross-entropy as a float64 log-softmax over all rows at once (and as held_out_ce) gives it."""
    teacher = tiny_llama(dtype=torch.float32, seed=5)
    mla_dir, mamba_dir = saved_students(tmp_path, teacher)
    student = compose_hybrid(mla_dir, mamba_dir, [2]).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(6))
    got = teacher_student_figures(teacher, student, ids, batch=2)
    for name, model in (("ce_teacher", teacher), ("ce_student", student)):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.double()[:, :-1], -1)
        want = float(-logp.gather(-1, ids[:, 1:, None]).mean())
        assert want > 1.0
        assert abs(got[name] - want) / want < 1e-5, name
        assert abs(held_out_ce(model, ids, batch=2) - want) / want < 1e-5, name
    assert got["ce_student"] != got["ce_teacher"]
    assert abs(got["kl"] - teacher_student_kl(teacher, student, ids, batch=3)) < 1e-6
