"""How fast the eval stage scores a served model: lm-eval's local-completions (serve.eval.evaluate_endpoint)
against one Ray Serve replica of the model, for several settings of prompts per request x requests in flight.
The first setting is the stage's own (evaluate_endpoint's defaults): the baseline of the ratios. Every setting
must give the baseline's scores (the same requests, batched differently); the table says whether it did.

Session 14 (notes/TEAM.md): in the prose run's eval the hybrid's 2,000 items took 78 s and the teacher's 40 s on
one H200 with 8 prompts a request and 4 requests in flight (then the stage's setting, now 32 x 8); the full task
sets (8,656 items) would take ~4x.

    python -m benchmarks.eval_speed --model runs/smollm2-prose-1gpu/export --num-gpus 1 --limit 500 \\
        --settings 8x4 16x8 64x8
    python -m benchmarks.eval_speed --tiny     # a random tiny hybrid on the CPU: the HTTP and lm-eval path alone

Prints a table (seconds, items/s, ratio to the baseline, same scores) and writes JSON.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import tempfile
import time
from pathlib import Path

log = logging.getLogger("benchmarks.eval_speed")


def baseline_setting() -> tuple[int, int]:
    """evaluate_endpoint's (batch_size, num_concurrent) defaults: the eval stage's setting."""
    from serve.eval import evaluate_endpoint

    params = inspect.signature(evaluate_endpoint).parameters
    return params["batch_size"].default, params["num_concurrent"].default


def parse_setting(text: str) -> tuple[int, int]:
    """'16x8' -> (16 prompts a request, 8 requests in flight)."""
    try:
        batch, concurrent = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--settings: {text!r} is not BATCHxCONCURRENT, e.g. 16x8") from None
    if batch < 1 or concurrent < 1:
        raise argparse.ArgumentTypeError(f"--settings: {text!r} needs positive numbers")
    return batch, concurrent


def scores(results: dict) -> dict[str, float]:
    """{task/metric: value} of an evaluate_endpoint result, stderrs left out."""
    return {f"{task}/{metric}": value for task, row in results["results"].items() for metric, value in row.items()
            if isinstance(value, float) and "stderr" not in metric}


def measure(url: str, name: str, tokenizer_dir: Path, tasks: list[str], limit: int | None, max_length: int,
            settings: list[tuple[int, int]]) -> list[dict]:
    """One evaluate_endpoint per setting against the running endpoint, in order; a row each."""
    from serve.eval import evaluate_endpoint

    rows = []
    for batch, concurrent in settings:
        start = time.perf_counter()
        out = evaluate_endpoint(url, name, tokenizer_dir, tasks, limit, max_length, batch_size=batch,
                                num_concurrent=concurrent)
        seconds = time.perf_counter() - start
        items = sum(n["effective"] for n in out["n-samples"].values())
        rows.append(dict(setting=f"{batch}x{concurrent}", batch_size=batch, num_concurrent=concurrent,
                         seconds=seconds, items=items, items_per_s=items / seconds, scores=scores(out)))
        log.info("%dx%d: %d items in %.1f s", batch, concurrent, items, seconds)
    base = rows[0]
    for row in rows:
        row["x_baseline"] = row["items_per_s"] / base["items_per_s"]
        row["same_scores"] = row["scores"] == base["scores"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'setting (prompts x in flight)':<30} {'s':>8} {'items/s':>9} {'x base':>7}  same scores"]
    for r in rows:
        lines.append(f"{r['setting']:<30} {r['seconds']:>8.1f} {r['items_per_s']:>9.1f} {r['x_baseline']:>7.2f}  "
                     f"{'yes' if r['same_scores'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from serve.app import model_name_of, run_server
    from serve.engine import resolve_model_dir
    from serve.eval import APP_NAME, ROUTE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an exported model folder (a hybrid or a teacher)")
    p.add_argument("--tiny", action="store_true", help="a random tiny hybrid on the CPU (benchmarks.serve_load)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="default: arc_easy_local piqa_local; --tiny: arc_easy_local (a piqa solution can outrun the tiny "
                        "byte-level model's 512 positions, which lm-eval's local-completions cannot score)")
    p.add_argument("--limit", type=int, default=None, help="items a task (default: 500, --tiny: 40)")
    p.add_argument("--settings", nargs="+", type=parse_setting, default=None,
                   help="BATCHxCONCURRENT after the stage's own (default: 8x4 64x8)")
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", default="runs/benchmarks/eval_speed.json")
    args = p.parse_args(argv)
    if bool(args.model) == args.tiny:
        p.error("give one of --model DIR and --tiny")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = [baseline_setting(), *(args.settings or [(8, 4), (64, 8)])]
    limit = args.limit or (40 if args.tiny else 500)
    tasks = args.tasks or (["arc_easy_local"] if args.tiny else ["arc_easy_local", "piqa_local"])
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from benchmarks.serve_load import tiny_pair

            model = tiny_pair(Path(tmp))[1]
        else:
            model = resolve_model_dir(args.model)
        max_length = json.loads((model / "config.json").read_text())["max_position_embeddings"]
        url = run_server(model, port=args.port, num_gpus=args.num_gpus, api_key_env=None, app_name=APP_NAME,
                         route_prefix=ROUTE)
        try:
            rows = measure(url, model_name_of(model), model, tasks, limit, max_length, settings)
        finally:
            from ray import serve

            serve.delete(APP_NAME)
    report = dict(model=str(args.model or "tiny"), tasks=tasks, limit=limit, num_gpus=args.num_gpus, rows=rows)
    print(table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
