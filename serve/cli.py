"""`zebra serve` and `zebra eval`, added to the `zebra` command (zebra.cli) through the entry-point
group "zebra.commands". Only argparse is imported here; Ray Serve and lm-eval load when a command runs."""
from __future__ import annotations


def cmd_serve(args) -> int:
    from serve.app import run_server

    autoscaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                   "target_ongoing_requests": args.target_ongoing_requests}
    run_server(args.model_dir, host=args.host, port=args.port, autoscaling=autoscaling,
               num_gpus=args.num_gpus, blocking=True)
    return 0


def add_serve(sub):
    s = sub.add_parser("serve", help="serve a hybrid over an OpenAI-compatible HTTP API (Ray Serve)",
                       description="Serve a hybrid (an HF folder or s3://bucket/prefix) over an OpenAI-compatible "
                                   "HTTP API with Ray Serve; the API key, if any, is read from $ZEBRA_API_KEY.")
    s.add_argument("model_dir")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--min-replicas", type=int, default=1)
    s.add_argument("--max-replicas", type=int, default=1)
    s.add_argument("--target-ongoing-requests", type=float, default=8)
    s.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (a fraction shares one)")
    s.set_defaults(fn=cmd_serve)
    return s


def cmd_eval(args) -> int:
    from serve.eval import run_eval
    from zebra.teacher import teacher_folder

    teacher = teacher_folder(args.teacher) if args.teacher else None
    run_eval(args.model_dir, tasks=args.tasks.split(","), out_dir=args.out, teacher_dir=teacher, limit=args.limit,
             reuse=not args.no_reuse)
    return 0


def add_eval(sub):
    e = sub.add_parser("eval", help="lm-eval against a served hybrid (and its teacher)",
                       description="Serve the hybrid (and the teacher) and run lm-eval tasks against the endpoint; "
                                   "writes eval.json and eval.md under --out.")
    e.add_argument("model_dir")
    e.add_argument("--tasks", default="arc_easy_local,arc_challenge_local,piqa_local,boolq_local",
                   help="comma-separated: serve/tasks/*.yaml names or lm-eval tasks (default: "
                        "serve.eval.DEFAULT_TASKS, four real benchmarks from the shared data folder, offline)")
    e.add_argument("--teacher", default=None, help="also evaluate this teacher (HF folder, .gguf, hub id, 'default')")
    e.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    e.add_argument("--out", default="eval")
    e.add_argument("--no-reuse", action="store_true", help="serve and score every model even where the same files "
                   "were scored on the same tasks, limit and code before (default: reuse those results, kept in "
                   "$ZEBRA_EVAL_CACHE or ~/.cache/zebra/eval)")
    e.set_defaults(fn=cmd_eval)
    return e
