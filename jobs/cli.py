"""`zebra run` and `zebra submit`, added to the `zebra` command (zebra.cli) through the entry-point
group "zebra.commands". Only argparse is imported here; each command imports what it runs.

    zebra run SPEC                                   # = python -m jobs.run SPEC, on this machine's Ray
    zebra submit SPEC --address http://HEAD:8265     # = ray job submit --working-dir . -- python -m jobs.run SPEC

`zebra submit` validates the spec here first, so a bad spec is refused before anything is uploaded.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def cmd_run(args) -> int:
    from jobs.run import main as run_main

    return run_main([args.spec])


def add_run(sub):
    r = sub.add_parser("run", help="run a job spec: every stage, on this machine's or RAY_ADDRESS's Ray",
                       description="Run a job spec (the same as `python -m jobs.run SPEC`).")
    r.add_argument("spec", help="job spec YAML (see jobs/examples)")
    r.set_defaults(fn=cmd_run)
    return r


def submit_command(spec: str, working_dir: str, address: str | None, no_wait: bool) -> list[str]:
    """The `ray job submit` command line that runs `python -m jobs.run SPEC` on a cluster.

    SPEC must lie inside working_dir (the folder Ray uploads); it is passed relative to it.
    Raises ValueError naming the argument otherwise.
    """
    root, path = Path(working_dir).resolve(), Path(spec).resolve()
    if not root.is_dir():
        raise ValueError(f"--working-dir {working_dir}: no such folder")
    if not path.is_relative_to(root):
        raise ValueError(f"spec {spec}: not inside --working-dir {root}, so the cluster would not receive it")
    ray_cli = Path(sys.executable).parent / "ray"
    cmd = [str(ray_cli) if ray_cli.is_file() else "ray", "job", "submit", "--working-dir", str(root)]
    cmd += ["--address", address] if address else []
    cmd += ["--no-wait"] if no_wait else []
    return cmd + ["--", "python", "-m", "jobs.run", str(path.relative_to(root))]


def cmd_submit(args) -> int:
    from jobs.spec import SpecError, load_spec

    try:
        load_spec(args.spec)
        cmd = submit_command(args.spec, args.working_dir, args.address, args.no_wait)
    except (SpecError, ValueError) as e:
        sys.stderr.write(f"zebra submit: error: {e}\n")
        return 2
    if args.dry_run:
        sys.stdout.write(" ".join(cmd) + "\n")
        return 0
    if shutil.which(cmd[0]) is None:
        sys.stderr.write("zebra submit: error: the `ray` command is not installed (pip install 'ray[default]')\n")
        return 2
    return subprocess.call(cmd)


def add_submit(sub):
    s = sub.add_parser("submit", help="submit a job spec to a Ray cluster (ray job submit)",
                       description="Validate a job spec, then run `ray job submit --working-dir DIR -- python -m "
                                   "jobs.run SPEC` (the dashboard address: --address or $RAY_ADDRESS).")
    s.add_argument("spec", help="job spec YAML inside --working-dir")
    s.add_argument("--address", default=None, help="the cluster's dashboard, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
    s.add_argument("--working-dir", default=".", help="the folder uploaded to the cluster (default: here)")
    s.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    s.add_argument("--dry-run", action="store_true", help="print the ray command instead of running it")
    s.set_defaults(fn=cmd_submit)
    return s
