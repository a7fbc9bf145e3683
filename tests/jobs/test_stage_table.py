"""The stage table of jobs.run: typed outputs through the COMPLETE markers, and disabled stages that
either stand in (smart with student.mla_layers), load their stored output, or are refused before
any work with the sections named. No Ray, no training (seconds)."""
import inspect

import pytest

import jobs.run
from cluster.storage import LocalStorage
from jobs.context import Context
from jobs.outputs import IldOutput, KdOutput, SmartOutput
from jobs.run import PIPELINE, STAGE, check_inputs, run_stage
from jobs.spec import STAGES, SpecError, load_spec

ILD = IldOutput(tokens=128, wall_s=1.5, loss_before={"mla": 2.0, "mamba": 3.0}, loss_after={"mla": 1.0, "mamba": 1.5},
                history=[{"step": 2, "loss": 0.5}])


def spec(**sections):
    data = {"student": {"kv_rank": 4, "qk_rope_dim": 2, "num_mla_layers": 2}, "eval": {"enabled": False}}
    for name, fields in sections.items():
        data.setdefault(name, {}).update(fields)
    return load_spec(data)


def context(tmp_path) -> Context:
    return Context(storage=LocalStorage(tmp_path), scratch=tmp_path, teacher_dir="unused", local_storage=True, num_mla=2)


def test_the_table_is_the_pipeline():
    assert tuple(s.name for s in PIPELINE) == STAGES
    assert "import_module" not in inspect.getsource(jobs.run)
    for stage in PIPELINE:  # each stage's function is annotated with the output the table expects
        assert inspect.signature(stage.run).return_annotation in (stage.output, stage.output.__name__)
        made_before = {s.output for s in PIPELINE[:PIPELINE.index(stage)]}
        assert set(stage.needs) <= made_before, stage.name


def test_outputs_round_trip_through_markers(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.mark_complete("ild", {**ILD.to_json(), "stage": "ild", "hash": "abc"})
    assert IldOutput.from_json(storage.stage_info("ild")) == ILD
    with pytest.raises(ValueError, match="lacks \\['loss_after'\\]"):
        IldOutput.from_json({k: v for k, v in ILD.to_json().items() if k != "loss_after"})


def test_disabled_smart_with_given_layers_stands_in(tmp_path):
    s = spec(smart={"enabled": False}, student={"mla_layers": [0, 3], "num_mla_layers": None})
    check_inputs(s, LocalStorage(tmp_path))
    ctx = context(tmp_path)
    run_stage(s, ctx, STAGE["smart"])
    assert ctx.output(SmartOutput) == SmartOutput(tokens=0, mla_layers=[0, 3])
    assert not (tmp_path / "smart").exists()


def test_disabled_stage_loads_its_stored_output(tmp_path):
    s = spec(init={"enabled": False}, ild={"enabled": False})
    storage = LocalStorage(tmp_path)
    storage.mark_complete("ild", {**ILD.to_json(), "stage": "ild", "hash": "from-another-spec"})
    storage.mark_complete("init", {"tokens": 1, "init_errors": {}, "kv_bytes_per_token": {}})
    check_inputs(s, storage)
    ctx = context(tmp_path)
    run_stage(s, ctx, STAGE["ild"])
    assert ctx.output(IldOutput) == ILD
    with pytest.raises(LookupError, match="no KdOutput"):
        ctx.output(KdOutput)


@pytest.mark.parametrize("sections, message", [
    ({"ild": {"enabled": False}}, "smart.enabled: true needs the output of stage ild, but ild.enabled is false"),
    ({"init": {"enabled": False}}, "ild.enabled: true needs the output of stage init"),
    ({"ild": {"enabled": False}, "smart": {"enabled": False}, "student": {"mla_layers": [1], "num_mla_layers": None}},
     "kd.enabled: true needs the output of stage ild"),
    ({"kd": {"enabled": False}}, "export.enabled: true needs the output of stage kd"),
])
def test_missing_input_is_refused_before_any_work(tmp_path, sections, message):
    with pytest.raises(SpecError, match=message):
        check_inputs(spec(**sections), LocalStorage(tmp_path))
    assert not list(tmp_path.iterdir())

