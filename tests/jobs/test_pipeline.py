"""The whole pipeline (python -m jobs.run) on a tiny random Llama teacher with the SmolLM2 tokenizer,
once, with every training stage on two Ray Train workers: ILD under ZeRO-2 with teacher actors and a
worker killed mid-stage (it resumes from its last checkpoint), SMART disabled with student.mla_layers
given, KD under ZeRO-3, then DPO on chat pairs under ZeRO-3, whose model export takes; then a rerun
that must do no work; and bad specs that must fail before any work. (SMART's scoring runs in the S3
run of test_s3_pipeline.py; the ZeRO-2 KD in it too, on one worker.)"""
import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from jobs.run import main, run
from jobs.spec import STAGES, load_spec
from jobs.train import FAULT_MARKER_ENV, FAULT_STEP_ENV
from tests.jobs.conftest import dpo_section, spec_dict


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(ray_session):
    yield


@pytest.mark.slow
def test_end_to_end_then_rerun_is_a_no_op(teacher_dir, data_file, chat_pairs_file, tmp_path, monkeypatch):
    data = spec_dict(teacher_dir, data_file, tmp_path / "run", zero_stage=2)
    # a training worker dies at the start of ILD step 6 (of 8; checkpoints every 4), once: KD and DPO run whole
    monkeypatch.setenv(FAULT_STEP_ENV, "6")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path / "fault-fired"))
    # the spec chooses the MLA layers (no SMART); DPO tunes the KD model on chat pairs in ultrafeedback's
    # layout; export takes DPO's
    data["smart"]["enabled"] = False
    data["student"].update(mla_layers=[1, 2], num_mla_layers=None)
    # KD and DPO under ZeRO-3 with the teacher (DPO: the reference) in each worker's process: on 2 cores
    # each actor is one more process that imports torch and transformers (~10 s of CPU); ILD's actors,
    # restarted with their worker group, cover the actor path
    data["kd"].update(zero_stage=3, teacher_mode="inprocess")
    data["dpo"] = {**dpo_section(chat_pairs_file, zero_stage=3, seq_len=64), "teacher_mode": "inprocess"}
    report = run(load_spec(data))
    stages = ("init", "ild", "kd", "dpo", "export")
    storage = tmp_path / "run"
    infos = {s: json.loads((storage / s / "COMPLETE.json").read_text()) for s in stages}
    ild, kd = infos["ild"], infos["kd"]
    # ILD completed by resuming from its step-4 checkpoint: nothing lost, nothing redone
    assert (tmp_path / "fault-fired").exists()
    assert [(h["step"], h["resumed_from"]) for h in ild["history"]] == [(2, 0), (4, 0), (6, 4), (8, 4)]
    assert "from step 4" in report.read_text()
    assert all(h["resumed_from"] == 0 for h in kd["history"])
    print({k: (ild["loss_before"][k], ild["loss_after"][k]) for k in ild["loss_before"]}, kd["kl_before"], kd["kl_after"])
    for kind in ("mla", "mamba"):
        assert ild["loss_after"][kind] < ild["loss_before"][kind]
    assert kd["kl_after"] < kd["kl_before"]
    gap = [abs(math.log(kd[f"ppl_{when}"] / kd["ppl_teacher"])) for when in ("before", "after")]
    assert gap[1] < gap[0]  # the hybrid's held-out perplexity moved toward the teacher's
    assert f"hybrid {kd['ppl_before']:.2f} -> {kd['ppl_after']:.2f}, teacher {kd['ppl_teacher']:.2f}" in report.read_text()
    assert not (storage / "smart").exists() and kd["mla_layers"] == [1, 2]
    assert "given by student.mla_layers" in report.read_text()
    model = AutoModelForCausalLM.from_pretrained(storage / "export")
    assert [i for i, kind in enumerate(model.config.mixer_types) if kind == "mla"] == [1, 2]
    assert report.is_file() and (report.parent / "losses.png").is_file()
    assert not (report.parent / "smart_scores.png").is_file()  # SMART did not run
    assert "| kd |" in report.read_text()
    check_dpo(infos, storage, report)

    start = time.perf_counter()
    run(load_spec(data))
    assert time.perf_counter() - start < 30
    again = {s: json.loads((storage / s / "COMPLETE.json").read_text()) for s in infos}
    assert again == infos  # nothing re-ran: the markers (with their wall times) are unchanged


def check_dpo(infos: dict, storage: Path, report: Path) -> None:
    """DPO learnt the pairs (chosen completions: GOOD words only) and its model is what was exported."""
    dpo = infos["dpo"]
    before, after = dpo["before"], dpo["after"]
    print(before, after)
    assert dpo["pairs"] == 40 and dpo["held_out_pairs"] == 8
    assert before["reward_margin"] == 0.0 and before["reward_accuracy"] == 0.0  # the policy is the reference
    assert after["reward_margin"] > 0.0 and after["reward_accuracy"] >= 0.75
    assert after["logp_margin"] > before["logp_margin"]
    assert after["pref_accuracy"] > before["pref_accuracy"] or before["pref_accuracy"] == 1.0
    assert [h["step"] for h in dpo["history"]] == [2, 4, 6, 8]
    assert all(h["resumed_from"] == 0 for h in dpo["history"])
    assert dpo["history"][-1]["loss"] < dpo["history"][0]["loss"]
    exported, tuned, distilled = (AutoModelForCausalLM.from_pretrained(storage / key, dtype=torch.float32).state_dict()
                                  for key in ("export", "dpo/model", "kd/model"))
    assert infos["export"]["source"] == "dpo/model"
    assert all(torch.equal(exported[k], tuned[k]) for k in tuned)
    assert any(not torch.equal(tuned[k], distilled[k]) for k in tuned)
    assert "## DPO" in report.read_text()


def write_spec(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["kd"].update(learning_rate=1.0), "unknown key 'learning_rate'"),
    (lambda d: d["data"].update(source="/nonexistent/train.jsonl"), "no such file or folder"),
    (lambda d: d["teacher"].update(source="/nonexistent/teacher"), "teacher.source"),
    (lambda d: d["student"].update(num_mla_layers=None, kv_budget=0.001), "student.kv_budget"),
    (lambda d: d["dpo"].update(enabled=True, dataset="/nonexistent/prefs.jsonl"), "dpo.dataset"),
    (lambda d: d["kd"].update(kl_weight=0.5), "kd.kl_weight"),
    (lambda d: d["ild"].update(enabled=False), "smart.enabled: true needs the output of stage ild"),
])
def test_bad_spec_fails_before_any_work(teacher_dir, data_file, tmp_path, capsys, change, message):
    data = spec_dict(teacher_dir, data_file, tmp_path / "run")
    data["dpo"] = {}
    change(data)
    assert main([write_spec(tmp_path / "spec.yaml", data)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not any((tmp_path / "run" / s / "COMPLETE.json").exists() for s in STAGES)
