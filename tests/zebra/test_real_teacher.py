"""Issue-2 acceptance on the real SmolLM2-135M-Instruct teacher (slow: loads and converts 135M params)."""
import json
import subprocess
import sys

import pytest
import torch

from zebra.cli import calibration_ids
from zebra.convert import convert, full_rank_mla_config
from zebra.teacher import load_teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_teacher("default")


def test_convert_cli_three_mla_layers_meets_kv_budget(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "zebra.cli", "convert", "--teacher", "default", "--mla-layers", "0,14,29",
         "--kv-rank", "128", "--qk-rope-dim", "32", "--calib-tokens", "512", "--out", str(tmp_path), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    report = json.loads(out[out.index("{"):])
    print({k: v for k, v in report.items() if k != "layers"})
    assert report["kv_fraction"] < 0.05
    assert report["student_kv_bytes_per_token"] == 3 * (128 + 32) * 2
    assert report["teacher_kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 2
    errors = [row["init_error"] for row in report["layers"]]
    assert len(errors) == 30 and all(e > 0 for e in errors)
    assert (tmp_path / "config.json").exists()


def test_full_rank_all_mla_agrees_with_teacher_on_real_text(smollm2):
    teacher, tok = smollm2
    ids = calibration_ids(tok, 1024, seq_len=256)
    student = convert(teacher, full_rank_mla_config(teacher.config))
    with torch.no_grad():
        t_next = teacher(ids).logits.argmax(-1)
        s_next = student(ids).logits.argmax(-1)
    agree = float((t_next == s_next).float().mean())
    print("next-token agreement", agree, "on", ids.numel(), "positions")
    assert agree >= 0.99


def test_converted_teacher_is_shared_by_every_copy_of_its_file(tmp_path, monkeypatch):
    """The dequantised folder is keyed by the GGUF file's bytes: a copy elsewhere (another checkout or
    virtualenv) finds the same folder without converting again; a changed file gets a folder of its own."""
    import shutil

    import zebra.teacher as teacher
    from zebra.teacher import default_teacher_gguf, teacher_folder

    folder = teacher_folder("default")  # converted once per machine (~25 s), then cached
    copy = shutil.copy(default_teacher_gguf(), tmp_path / default_teacher_gguf().name)
    monkeypatch.setattr(teacher.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("converted again"))
    assert teacher_folder(str(copy)) == folder
    with open(copy, "ab") as f:
        f.write(b"\0")
    with pytest.raises(pytest.fail.Exception, match="converted again"):
        teacher_folder(str(copy))  # other bytes: not the cached folder
