"""mamba_ssm's Triton SSD scan (mamba_chunk_scan_combined) for comparisons, where it can be had.

From the installed package where it imports; else from mamba_ssm's source tree at $MAMBA_SSM_SRC (the
`mamba_ssm` folder of its sdist, e.g. mamba_ssm-2.3.2.post1.tar.gz from PyPI). The SSD scan is pure Triton,
but the package's __init__ imports its CUDA extensions (selective_scan_cuda), which do not build without nvcc,
as on our GPU host: from the source tree the package's namespace is set up without running that __init__, so
only the Triton modules load. mamba_ssm's Triton code runs on CUDA only.

    MAMBA_SKIP_CUDA_BUILD=TRUE pip download mamba-ssm==2.3.2.post1 --no-deps --no-binary :all: \
        --no-build-isolation -d /tmp/mssm && tar xzf /tmp/mssm/mamba_ssm-2.3.2.post1.tar.gz -C /tmp/mssm \
        && cp -r /tmp/mssm/mamba_ssm-2.3.2.post1/mamba_ssm .mamba_ssm_src     # 1.2 MB; carry it to the GPU host
    MAMBA_SSM_SRC=$PWD/.mamba_ssm_src python -m benchmarks.train_step --models transformer
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

ENV = "MAMBA_SSM_SRC"


def chunk_scan_combined():
    """mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined, or None where neither the package nor
    $MAMBA_SSM_SRC gives it. A $MAMBA_SSM_SRC that is not mamba_ssm's source folder is an error naming it."""
    try:
        return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
    except ImportError:
        pass
    src = os.environ.get(ENV)
    if not src:
        return None
    folder = Path(src)
    if not (folder / "ops" / "triton" / "ssd_combined.py").is_file():
        raise FileNotFoundError(f"${ENV}={src}: not mamba_ssm's source folder (no ops/triton/ssd_combined.py)")
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]  # what the failed import above left behind
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(folder)]
    sys.modules["mamba_ssm"] = package
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
