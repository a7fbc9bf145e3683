"""The `zebra` command: convert, run, serve, eval, tune. Each subcommand imports only what it needs,
so `zebra convert` never starts Ray."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,14,29, got {text!r}")


def cmd_convert(args) -> int:
    from jobs.convert_cmd import run_convert

    report = run_convert(
        teacher=args.teacher, mla_layers=args.mla_layers, kv_rank=args.kv_rank, qk_rope_dim=args.qk_rope_dim,
        q_rank=args.q_rank, out=args.out, calib_tokens=args.calib_tokens, full_rank=args.full_rank,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_convert_report(report))
    return 0


def format_convert_report(report: dict) -> str:
    lines = [f"{'layer':>5}  {'type':<5}  {'init rel. error':>15}"]
    for row in report["layers"]:
        lines.append(f"{row['layer']:>5}  {row['type']:<5}  {row['init_error']:>15.4f}")
    lines += [
        f"teacher_kv_bytes_per_token: {report['teacher_kv_bytes_per_token']}",
        f"student_kv_bytes_per_token: {report['student_kv_bytes_per_token']}",
        f"kv_fraction: {report['kv_fraction']:.4f}",
        f"saved: {report['out']}",
    ]
    return "\n".join(lines)


def cmd_run(args) -> int:
    from jobs.run import main as run_main

    return run_main([args.spec])


def cmd_serve(args) -> int:
    from serve.app import run_server

    autoscaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                   "target_ongoing_requests": args.target_ongoing_requests}
    run_server(args.model_dir, host=args.host, port=args.port, autoscaling=autoscaling,
               num_gpus=args.num_gpus, blocking=True)
    return 0


def cmd_eval(args) -> int:
    from serve.eval import run_eval
    from zebra.teacher import teacher_folder

    teacher = teacher_folder(args.teacher) if args.teacher else None
    run_eval(args.model_dir, tasks=args.tasks.split(","), out_dir=args.out, teacher_dir=teacher, limit=args.limit)
    return 0


def cmd_tune(args) -> int:
    from tune.search import main as tune_main

    return tune_main([args.spec])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zebra", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="compose a hybrid from a teacher with no training")
    c.add_argument("--teacher", default="default", help="HF folder, .gguf file, hub id, or 'default' (SmolLM2)")
    c.add_argument("--mla-layers", type=_int_list, default=None, help="e.g. 0,14,29; the rest become Mamba2")
    c.add_argument("--kv-rank", type=int, default=128)
    c.add_argument("--qk-rope-dim", type=int, default=32)
    c.add_argument("--q-rank", type=int, default=None)
    c.add_argument("--full-rank", action="store_true", help="all layers MLA, no truncation (reproduces the teacher)")
    c.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens for init and init errors")
    c.add_argument("--out", required=True)
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_convert)

    r = sub.add_parser("run", help="run a job spec (same as python -m jobs.run SPEC)")
    r.add_argument("spec")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("serve", help="serve a hybrid over an OpenAI-compatible HTTP API (Ray Serve)")
    s.add_argument("model_dir")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--min-replicas", type=int, default=1)
    s.add_argument("--max-replicas", type=int, default=1)
    s.add_argument("--target-ongoing-requests", type=float, default=8)
    s.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (a fraction shares one)")
    s.set_defaults(fn=cmd_serve)

    e = sub.add_parser("eval", help="lm-eval against a served hybrid (and its teacher)")
    e.add_argument("model_dir")
    e.add_argument("--tasks", default="zebra_mc")
    e.add_argument("--teacher", default=None)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--out", default="eval")
    e.set_defaults(fn=cmd_eval)

    t = sub.add_parser("tune", help="Ray Tune search over MLA layers and ranks under a KV budget")
    t.add_argument("spec")
    t.set_defaults(fn=cmd_tune)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
