"""benchmarks.teacher_actor: the --tiny run on the CPU times both of the stages' teacher calls in this process and
through a real TeacherActor, on the same outputs, and writes every figure. Timings are never asserted."""
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.teacher_actor import CALLS

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_times_both_calls_on_the_same_outputs(tmp_path):
    out = tmp_path / "teacher_actor.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.teacher_actor", "--tiny", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["call"], r["batch"]) for r in rows} == {(c, b) for c in CALLS for b in (1, 2)}
    for r in rows:
        assert r["max_abs_difference"] < 1e-4  # the same teacher in both (float32 on the CPU; thread counts differ)
        assert r["inprocess_ms"] > 0 and r["actor_ms"] > 0 and 0 <= r["open_ms"] <= r["actor_ms"]
        assert abs(r["actor_vs_inprocess"] - r["actor_ms"] / r["inprocess_ms"]) < 1e-9 * r["actor_vs_inprocess"] + 1e-9
        assert f"| {r['call']} | {r['batch']} x 32 |" in run.stdout  # the printed table has the row
