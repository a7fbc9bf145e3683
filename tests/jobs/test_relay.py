"""The Ray Train controller unpickles the report relay: its module must not pull in the training stack."""
import pickle
import subprocess
import sys
from pathlib import Path

import jobs.relay
import jobs.train

ROOT = Path(__file__).parents[2]
HEAVY = ("deepspeed", "transformers", "torch", "zebra", "jobs.train")


def test_the_controller_side_imports_only_ray():
    assert jobs.train.RelayReports is jobs.relay.RelayReports
    assert b"jobs.relay" in pickle.dumps(jobs.relay.RelayReports)  # pickled by reference to the light module
    check = "import sys, jobs.relay; print([m for m in %r if m in sys.modules])" % (HEAVY,)
    loaded = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "[]"
