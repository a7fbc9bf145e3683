"""benchmarks.graph_capture_probe runs every case on the CPU (nothing is captured there), so that the GPU session
that needs it finds it working: each case builds its student (alone or in jobs.train's DeepSpeed engine), calls it
as that case says and runs its backward."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def test_every_case_runs_on_the_cpu():
    from benchmarks.graph_capture_probe import CASES, main

    results = main(["--device", "cpu"])
    assert list(results) == list(CASES)
    assert all(r == "ran eager (nothing is captured on the CPU)" for r in results.values()), results
