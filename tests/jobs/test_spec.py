"""The job spec: shipped examples validate, errors name what is wrong, hashes track what matters."""
import math
from pathlib import Path
from typing import Annotated, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from jobs.spec import STAGES, JobSpec, SpecError, check_against_teacher, check_environment, load_spec

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
    msg = error_of({"smart": {"enabled": False}})
    assert "smart.enabled" in msg and "student.mla_layers" in msg
    assert load_spec({"smart": {"enabled": False}, "student": {"mla_layers": [0, 3]}}).student.mla_layers == [0, 3]


def float_fields(model=JobSpec, prefix=()):
    """Dotted paths of every float field in the schema (tune included), by walking its sections."""
    for name, info in model.model_fields.items():
        sub = _submodel_of(info.annotation)
        if sub is not None:
            yield from float_fields(sub, (*prefix, name))
        elif float in (info.annotation, *(get_args(t)[0] if get_origin(t) is Annotated else t
                                          for t in get_args(info.annotation))):
            yield ".".join((*prefix, name))


def _submodel_of(annotation):
    return next((t for t in (annotation, *get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel)),
                None)


def nested(path: str, value) -> dict:
    *parents, leaf = path.split(".")
    data = {leaf: value}
    for key in reversed(parents):
        data = {key: data}
    return data


FLOAT_FIELDS = sorted(float_fields())


def test_float_fields_found():
    assert {"student.kv_budget", "kd.lr", "kd.temperature", "tune.kv_budget", "smart.gpus_per_task"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("path", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_field_refuses_non_finite(path, value):
    assert f"{path}: Input should be a finite number" in error_of(nested(path, value))


@pytest.mark.parametrize("text, field", [
    ("student:\n  kv_budget: .inf\n", "student.kv_budget"),
    ("kd:\n  lr: .inf\n", "kd.lr"),
    ("kd:\n  temperature: .inf\n", "kd.temperature"),
    ("kd:\n  temperature: .nan\n", "kd.temperature"),
    ("kd:\n  temperature: 0\n", "kd.temperature"),
    ("kd:\n  ce_weight: 1.5\n", "kd.ce_weight"),
])
def test_non_finite_or_senseless_floats_in_a_file(tmp_path, text, field):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    msg = error_of(path)
    assert str(path) in msg and field in msg


def test_kl_weight_is_no_knob():
    """kd_loss mixes (1 - ce_weight) KL + ce_weight CE: there is no separate KL weight to set."""
    assert "kd.kl_weight: unknown key 'kl_weight'" in error_of({"kd": {"kl_weight": 0.5}})


def test_non_utf8_file_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    msg = error_of(path)
    assert str(path) in msg and "not UTF-8" in msg and "0xe9 at offset 9" in msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    msg = error_of(path)
    assert str(path) in msg and "the spec is empty" in msg
    path.write_text("{}\n")  # every default, said explicitly
    assert load_spec(path).student.kv_budget == 0.05


SMOLLM2_WIDTH = 2 * 3 * 64  # K+V values per layer: 2 x 3 kv heads x head_dim 64


@pytest.mark.parametrize("data, message", [
    ({"student": {"qk_rope_dim": 512}}, "student.qk_rope_dim: 512 exceeds the teacher's per-layer key width 192"),
    ({"student": {"kv_rank": 5000}}, "student.kv_rank: 5000 exceeds the teacher's per-layer K+V width 384"),
    ({"tune": {"kv_rank": [128, 400, 512]}}, "tune.kv_rank: [400, 512] exceeds the teacher's per-layer K+V width 384"),
    ({"tune": {"qk_rope_dim": [32, 194]}}, "tune.qk_rope_dim: [194] exceeds the teacher's per-layer key width 192"),
])
def test_widths_checked_against_teacher(data, message):
    with pytest.raises(SpecError) as info:
        check_against_teacher(load_spec(data), **SMOLLM2, teacher_kv_width=SMOLLM2_WIDTH)
    assert message in str(info.value) and "the maximum" in str(info.value)
    wide = load_spec({"student": {"kv_rank": 384, "qk_rope_dim": 192}})  # the largest allowed
    assert check_against_teacher(wide, **SMOLLM2, teacher_kv_width=SMOLLM2_WIDTH) >= 2


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
    assert hashes({"kd": {"loss_backend": "torch"}}) == base  # the same loss, by the kernel or the loop
    assert hashes({"ild": {"compile": False}, "kd": {"compile": True}}) == base  # the same layers, compiled or not
    assert hashes({"ild": {"cuda_graphs": True}, "kd": {"cuda_graphs": False}}) == base  # replayed or launched
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

    from jobs.context import train_config
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


# ---- check_environment: what this machine must offer, checked at preflight before Ray starts ----------

@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache, online mode, and a hub endpoint nothing listens on (tests set another)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")
    return constants


def environment_error(data) -> str:
    with pytest.raises(SpecError) as info:
        check_environment(load_spec(data))
    print(info.value)
    return str(info.value)


def test_storage_must_be_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for uri in (str(blocker / "run"), f"file://{blocker}/run"):
        msg = environment_error({"storage": {"uri": uri}})
        assert "storage.uri" in msg and "not writable" in msg and "Not a directory" in msg
    good = tmp_path / "runs" / "ok"
    check_environment(load_spec({"storage": {"uri": str(good)}}))
    assert good.is_dir() and not list(good.iterdir())  # the probe is gone


MODEL, DATASET = "zebra-test/no-such-model", "zebra-test/no-such-data"


@pytest.mark.parametrize("section, field, repo_type, repo", [
    ({"teacher": {"source": MODEL}}, "teacher.source", "model", MODEL),
    ({"kd": {"teacher": MODEL}}, "kd.teacher", "model", MODEL),
    ({"data": {"source": DATASET}}, "data.source", "dataset", DATASET),
    ({"dpo": {"enabled": True, "dataset": DATASET}}, "dpo.dataset", "dataset", DATASET),
])
def test_hub_ids_need_a_cache_or_a_hub(hub, tmp_path, section, field, repo_type, repo):
    data = {**section, "storage": {"uri": str(tmp_path / "run")}}
    msg = environment_error(data)
    assert f"{field}: {repo_type} {repo!r} is not in the local Hugging Face cache" in msg
    assert "hub at http://127.0.0.1:1 is unreachable" in msg
    hub.HF_HUB_OFFLINE = True
    assert "HF_HUB_OFFLINE is set" in environment_error(data)
    (tmp_path / "hf-cache" / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots").mkdir(parents=True)
    check_environment(load_spec(data))  # in the cache: fine offline


def test_hub_says_no_such_repo(hub, tmp_path):
    """A hub that answers 404 RepoNotFound (as huggingface.co does) gets 'no model ... on the hub'."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub.ENDPOINT = f"http://127.0.0.1:{server.server_port}"
        msg = environment_error({"teacher": {"source": "zebra-test/no-such-model"},
                                 "storage": {"uri": str(tmp_path / "run")}})
    finally:
        server.shutdown()
    assert "teacher.source: no model 'zebra-test/no-such-model' on the Hugging Face hub" in msg


def test_disabled_dpo_and_local_sources_are_not_looked_up(hub, tmp_path):
    check_environment(load_spec({"dpo": {"enabled": False, "dataset": "zebra-test/no-such-data"},
                                 "storage": {"uri": str(tmp_path / "run")}}))


@pytest.mark.parametrize("data, message", [
    (lambda tmp: {"storage": {"uri": str(tmp / "a-file" / "run")}}, "storage.uri"),
    (lambda tmp: {"teacher": {"source": "zebra-test/no-such-model"}, "storage": {"uri": str(tmp / "run")}},
     "teacher.source"),
])
def test_jobs_run_refuses_before_ray_starts(hub, tmp_path, capsys, data, message):
    import ray

    from jobs.run import main

    (tmp_path / "a-file").write_text("")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data(tmp_path)))
    was_up = ray.is_initialized()
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err, err
    assert ray.is_initialized() == was_up


def test_kd_loss_backend_reaches_the_objective_and_is_checked():
    from jobs.context import kd_recipe

    spec = load_spec({"kd": {"loss_backend": "torch"}})
    _, _, objective = kd_recipe(spec, "unused-teacher-dir")
    assert objective.loss.keywords["backend"] == "torch"
    with pytest.raises(SpecError, match="loss_backend"):
        load_spec({"kd": {"loss_backend": "cuda"}})
