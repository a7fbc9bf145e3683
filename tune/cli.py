"""`zebra tune SPEC`, added to the `zebra` command (zebra.cli) through the entry-point group
"zebra.commands". Only argparse is imported here; Ray Tune loads when the command runs."""
from __future__ import annotations


def cmd_tune(args) -> int:
    from tune.search import main as tune_main

    return tune_main([args.spec])


def add_tune(sub):
    t = sub.add_parser("tune", help="Ray Tune search over MLA layers and ranks under a KV budget",
                       description="Ray Tune search over MLA layers and ranks (the same as `python -m tune.search "
                                   "SPEC`); rerun the same command to resume an interrupted search.")
    t.add_argument("spec", help="job spec YAML with a tune section (see jobs/examples/tune.yaml)")
    t.set_defaults(fn=cmd_tune)
    return t
