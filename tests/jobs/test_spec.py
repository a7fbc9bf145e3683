"""The job spec: shipped examples validate, errors name what is wrong, hashes track what matters."""
from pathlib import Path

import pytest
import yaml

from jobs.spec import STAGES, JobSpec, SpecError, check_against_teacher, load_spec

EXAMPLES = sorted((Path(__file__).parents[2] / "jobs" / "examples").glob("*.yaml"))
SMOLLM2 = dict(num_layers=30, teacher_kv_bytes_per_token=23040, mla_kv_bytes_per_layer_per_token=320)


def test_the_named_examples_ship():
    names = {p.name for p in EXAMPLES}
    assert {"demo.yaml", "smollm2-gpu.yaml", "smollm2-2gpu.yaml", "s3.yaml", "tune.yaml",
            "paper-llama3.2-1b.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_and_round_trips(path):
    spec = load_spec(path)
    assert spec.source == str(path)
    assert load_spec(yaml.safe_load(spec.to_yaml())).model_dump() == spec.model_dump()
    if spec.student.mla_layers is not None or spec.student.num_mla_layers is not None:
        check_against_teacher(spec, num_layers=16 if "llama" in path.name else 30,
                              teacher_kv_bytes_per_token=32768, mla_kv_bytes_per_layer_per_token=320)
    else:
        assert check_against_teacher(spec, **SMOLLM2) == 3


def test_demo_is_what_make_demo_needs():
    spec = load_spec(Path(__file__).parents[2] / "jobs/examples/demo.yaml")
    assert spec.teacher.source == "default" and spec.data.source == "builtin"
    assert (spec.student.num_mla_layers, spec.student.kv_rank, spec.student.qk_rope_dim) == (3, 128, 32)
    for stage in (spec.ild, spec.kd):
        assert (stage.workers, stage.gpus_per_worker, stage.zero_stage, stage.teacher_mode) == (2, 0, 2, "actor")
        assert stage.tokens_per_step * stage.total_steps <= 20000
    assert spec.storage.uri == "runs/demo" and spec.eval.tasks == ["zebra_mc"]


def test_empty_spec_takes_defaults():
    spec = load_spec({})
    assert spec.storage.uri == "runs/zebra" and spec.student.kv_budget == 0.05
    assert spec.dpo.enabled is False and all(spec.section(s).enabled for s in STAGES if s != "dpo")


def test_paper_example_settings():
    spec = load_spec(Path(__file__).parents[2] / "jobs/examples/paper-llama3.2-1b.yaml")
    st, kd = spec.student, spec.kd
    assert st.mla_layers == [0, 5, 10, 14] and (st.kv_rank, st.q_rank, st.qk_rope_dim) == (128, 1344, 32)
    assert (kd.lr, kd.seq_len, kd.micro_batch, kd.grad_accum) == (8e-5, 2048, 12, 2)
    assert spec.teacher.source == "meta-llama/Llama-3.2-1B-Instruct"


def error_of(data, **kw) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(data, **kw)
    print(info.value)
    return str(info.value)


def test_unknown_key_named_with_suggestion():
    msg = error_of({"kd": {"zero_stag": 2}}, source="run.yaml")
    assert "run.yaml" in msg and "kd.zero_stag" in msg and "did you mean 'zero_stage'" in msg
    assert "did you mean 'student'" in error_of({"studnet": {}})


def test_wrong_type_names_field_and_type():
    msg = error_of({"kd": {"micro_batch": "four"}})
    assert "kd.micro_batch" in msg and "integer" in msg and "'four'" in msg


def test_zero_stage_names_allowed_values():
    msg = error_of({"ild": {"zero_stage": 4}})
    assert "ild.zero_stage" in msg and "2 or 3" in msg and "(got 4)" in msg


def test_all_problems_reported_from_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kd:\n  lr: -1\n  top_k: 0\nstudent:\n  qk_rope_dim: 33\n")
    msg = error_of(path)
    assert str(path) in msg and "3 problems" in msg
    assert "kd.lr" in msg and "kd.top_k" in msg and "student.qk_rope_dim" in msg and "even" in msg


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("kd:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    assert "duplicate key 'lr'" in error_of(path)


def test_exactly_one_layer_selection():
    msg = error_of({"student": {"mla_layers": [0, 3], "num_mla_layers": 2}})
    assert "student" in msg and "exactly one of" in msg
    assert "distinct" in error_of({"student": {"mla_layers": [3, 3]}})


def test_budget_no_choice_meets_names_smallest():
    spec = load_spec({"student": {"kv_budget": 0.01}})  # 230 bytes/token; 2 terminal layers need 640
    with pytest.raises(SpecError, match=r"student\.kv_budget.*0\.01.*smallest achievable is 2 layer\(s\) = 640"):
        check_against_teacher(spec, **SMOLLM2)
    one = load_spec({"student": {"kv_budget": 400, "keep_terminal": False}})
    assert check_against_teacher(one, **SMOLLM2) == 1
    with pytest.raises(SpecError, match="smallest achievable is 1 layer"):
        check_against_teacher(load_spec({"student": {"kv_budget": 300, "keep_terminal": False}}), **SMOLLM2)


def test_layers_checked_against_teacher():
    with pytest.raises(SpecError, match=r"student\.mla_layers: \[30\] out of range.*0\.\.29"):
        check_against_teacher(load_spec({"student": {"mla_layers": [0, 30]}}), **SMOLLM2)
    with pytest.raises(SpecError, match="num_mla_layers: 31 exceeds"):
        check_against_teacher(load_spec({"student": {"num_mla_layers": 31}}), **SMOLLM2)


def test_missing_files_named(tmp_path):
    missing = tmp_path / "corpus.jsonl"
    msg = error_of({"data": {"source": str(missing)}})
    assert "data.source" in msg and str(missing) in msg
    assert "teacher.source" in error_of({"teacher": {"source": str(tmp_path / "t.gguf")}})
    assert "config.json" in error_of({"teacher": {"source": str(tmp_path)}})
    assert load_spec({"teacher": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"}})  # a hub id is not checked


def test_uri_shapes():
    assert "storage.uri" in error_of({"storage": {"uri": "s3://B_ad"}})
    assert "storage.uri" in error_of({"storage": {"uri": "gs://bucket/x"}})
    assert "data.source" in error_of({"data": {"source": "http://example.com/x"}})
    spec = load_spec({"storage": {"uri": "s3://zebra-runs/a/b"}, "data": {"source": "s3://zebra-data/c"}})
    assert spec.storage.uri == "s3://zebra-runs/a/b"


def test_budget_below_one_step_and_smart_off():
    assert "less than one optimizer step" in error_of({"kd": {"tokens": 100}})
    assert "student.mla_layers" in error_of({"smart": {"enabled": False}})


def test_yaml_file_round_trip(tmp_path):
    spec = load_spec({"name": "rt", "kd": {"lr": 3e-5, "top_k": 32}, "tune": {"kv_rank": [64]}})
    path = tmp_path / "rt.yaml"
    path.write_text(spec.to_yaml())
    again = load_spec(path)
    assert again.model_dump() == spec.model_dump() and again.kd.lr == 3e-5 and again.tune.kv_rank == [64]


def test_updated_validates():
    spec = load_spec({}).updated({"student.kv_rank": 64, "student.kv_budget": None, "student.num_mla_layers": 2})
    assert spec.student.kv_rank == 64 and spec.student.num_mla_layers == 2
    with pytest.raises(SpecError, match="kd.zero_stage"):
        spec.updated({"kd.zero_stage": 1})


def hashes(data) -> dict:
    spec = load_spec(data)
    return {s: spec.section_hash(s) for s in STAGES}


def test_section_hash_tracks_upstream_only():
    base = hashes({})
    kd_lr = hashes({"kd": {"lr": 1e-4}})
    assert kd_lr["kd"] != base["kd"] and kd_lr["eval"] != base["eval"]  # kd and everything after it
    assert kd_lr["ild"] == base["ild"] and kd_lr["smart"] == base["smart"]  # not what came before
    later = hashes({"eval": {"limit": 10}})
    assert later["kd"] == base["kd"] and later["eval"] != base["eval"]
    layers = hashes({"student": {"num_mla_layers": 4}})
    assert layers["init"] == base["init"] and layers["ild"] == base["ild"] and layers["smart"] != base["smart"]
    assert hashes({"student": {"kv_rank": 64}})["init"] != base["init"]


def test_section_hash_ignores_what_does_not_change_outputs():
    base = hashes({})
    assert hashes({"kd": {"log_every": 1, "checkpoint_every": 7, "teacher_mode": "inprocess"}}) == base
    assert hashes({"dpo": {"beta": 0.5}}) == base  # dpo is disabled: only that it is disabled counts
    assert hashes({"dpo": {"enabled": True}})["export"] != base["export"]
    assert hashes({"storage": {"uri": "runs/elsewhere"}, "cluster": {"num_cpus": 2}}) == base
    assert load_spec({}).section_hash("kd") == load_spec({}).section_hash("kd")
    with pytest.raises(SpecError, match="unknown stage"):
        load_spec({}).section_hash("tune")


def test_jobspec_model_validate_is_the_schema():
    assert JobSpec.model_validate({"kd": {"lr": 1e-3}}).kd.lr == 1e-3


def test_tune_defaults_and_trial_settings():
    tune = load_spec({"tune": {}}).tune
    assert (tune.steps, tune.eval_every, tune.grace_period, tune.reduction_factor) == (60, 10, 1, 2)
    assert (tune.cpus_per_trial, tune.gpus_per_trial, tune.max_concurrent_trials, tune.lr) == (1, 0, None, None)
    shared = load_spec({"tune": {"gpus_per_trial": 0.125, "memory_budget_gb": 9, "kv_budget": 1152}}).tune
    assert shared.gpus_per_trial == 0.125 and shared.kv_budget == 1152


@pytest.mark.parametrize("tune, message", [
    ({"kv_budget": 1.5}, "tune.kv_budget: above 1 it is bytes per token"),
    ({"eval_every": 70}, "eval_every 70 exceeds steps 60"),
    ({"steps": 20, "eval_every": 10, "grace_period": 3}, "ASHA could never stop a trial"),
    ({"kv_rank": [64, 64]}, "tune.kv_rank: candidates must be distinct"),
    ({"gpus_per_trial": 1.5}, "gpus_per_trial 1.5: above 1 it must be whole"),
    ({"gpus_per_trial": -1}, "tune.gpus_per_trial"),
    ({"reduction_factor": 1}, "tune.reduction_factor"),
    ({"qk_rope_dim": [16, 33]}, "tune.qk_rope_dim: candidates must be even, [33]"),
])
def test_tune_settings_checked(tune, message):
    assert message in error_of({"tune": tune})


def test_bf16_auto_reaches_the_worker_undecided(monkeypatch):
    """train_config passes bf16 "auto" through on GPU (the worker asks its own GPU: resolve_bf16) and
    turns it off on CPU; TrainConfig refuses bf16 True without a GPU."""
    import torch

    from jobs.stages.common import train_config
    from jobs.train import TrainConfig, deepspeed_config, resolve_bf16

    spec = load_spec({"kd": {"gpus_per_worker": 1, "bf16": "auto"}})
    assert train_config(spec, spec.kd).bf16 == "auto"
    cpu = load_spec({"kd": {"gpus_per_worker": 0, "bf16": "auto"}})
    assert train_config(cpu, cpu.kd).bf16 is False
    with pytest.raises(ValueError, match="TrainConfig.bf16"):
        TrainConfig(use_gpu=False, bf16=True)
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert resolve_bf16("auto", use_gpu=True) is supported
        assert resolve_bf16("auto", use_gpu=False) is False
        assert deepspeed_config(TrainConfig(use_gpu=True, bf16="auto"), 1)["bf16"]["enabled"] is supported
    assert resolve_bf16(True, use_gpu=True) is True and resolve_bf16(False, use_gpu=True) is False
