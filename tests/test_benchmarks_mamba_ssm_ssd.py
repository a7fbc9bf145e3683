"""benchmarks.mamba_ssm_ssd: mamba_ssm's Triton SSD from a source tree whose package __init__ cannot import
(its CUDA extensions are missing), without running that __init__; a wrong folder is named."""
import sys

import pytest

from benchmarks.mamba_ssm_ssd import ENV, chunk_scan_combined


@pytest.fixture
def no_mamba_ssm(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    yield
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]


def test_source_tree_without_its_cuda_extensions(tmp_path, monkeypatch, no_mamba_ssm):
    src = tmp_path / "mamba_ssm"
    (src / "ops" / "triton").mkdir(parents=True)
    (src / "__init__.py").write_text("import selective_scan_cuda  # the CUDA extension that is not there\n")
    (src / "ops" / "__init__.py").write_text("")
    (src / "ops" / "triton" / "__init__.py").write_text("")
    (src / "utils.py").write_text("SCALE = 3\n")
    (src / "ops" / "triton" / "ssd_combined.py").write_text(
        "from mamba_ssm.utils import SCALE\n\ndef mamba_chunk_scan_combined(x):\n    return SCALE * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # as if installed: the plain import fails in __init__
    assert chunk_scan_combined() is None  # no $MAMBA_SSM_SRC: left out
    monkeypatch.setenv(ENV, str(src))
    assert chunk_scan_combined()(7) == 21


def test_a_wrong_source_folder_is_named(tmp_path, monkeypatch, no_mamba_ssm):
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"MAMBA_SSM_SRC={tmp_path}: not mamba_ssm's source folder"):
        chunk_scan_combined()
