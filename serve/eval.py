"""Evaluate checkpoints with lm-eval through the same OpenAI endpoint that users get.

`run_eval(model_dir, tasks, out_dir, teacher_dir=None, limit=None)` serves each model in turn
(serve.app.run_server), runs lm-eval's `local-completions` model against it, and writes eval.json
and eval.md; with a teacher it evaluates the teacher the same way and adds a retention column
(student / teacher). A task name with a YAML in serve/tasks/ is read from there (local JSONL data,
no network); any other name comes from lm-eval's registry, whose dataset must be reachable or cached.

DEFAULT_TASKS are four real zero-shot benchmarks read from the shared data folder (zebra.data.data_root:
$ZEBRA_DATA or ../shared/data): arc_easy, arc_challenge, piqa, boolq, formatted as lm-eval formats them.
Their items come sorted by sha256("0:{task}:{id}") (sha256_order), so `limit=500` takes the 500 items
whose teacher scores that data's README gives. Where a hub is reachable, lm-eval's own `arc_easy`,
`arc_challenge`, `piqa`, `boolq` are the same tasks.
A model scored before on the same tasks and limit, with the same files and code (results_key), is not served
again: run_eval reuses its results from results_cache_dir().
The table has one row per task and metric, and an average row over the tasks' headline metric
(acc_norm where a task reports it, else acc) whose retention is average student / average teacher.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import lm_eval
import torch
import transformers
import yaml
from lm_eval.tasks import TaskManager
from ray import serve

from serve.app import model_name_of, run_server
from serve.engine import resolve_model_dir
from zebra.data import data_root
from zebra.paths import cache_root, file_sha256

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
DATA_VAR = "$ZEBRA_DATA"  # in a task's data_files: the shared data folder (zebra.data.data_root)
DEFAULT_TASKS = ("arc_easy_local", "arc_challenge_local", "piqa_local", "boolq_local")
HEADLINE_METRICS = ("acc_norm", "acc")  # a task's first of these is the one the average takes
# lm-eval's requests: BATCH_SIZE prompts each, NUM_CONCURRENT in flight (jobs.spec EvalSpec's defaults: the same).
# Up to 256 prompts wait at once, which the engine scores in a few padded forwards of up to 16,384 tokens on a
# GPU; at 8 x 4 (32 waiting) the hybrid's forwards were ~3,000 tokens and launch-bound (session 14).
BATCH_SIZE, NUM_CONCURRENT = 32, 8
APP_NAME, ROUTE = "zebra-eval", "/eval"
REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("serve", "zebra", "kernels")  # the code a served model's scores depend on (results_key)


def local_task(name: str) -> dict | None:
    """The config of serve/tasks/<name>.yaml, merged over the file its `include` names, with its
    data_files made absolute (relative to serve/tasks/, or under $ZEBRA_DATA); None if there is none.
    Raises FileNotFoundError naming a data file that does not exist."""
    path = TASKS_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text())
    if "include" in config:
        config = {**yaml.safe_load((TASKS_DIR / config.pop("include")).read_text()), **config}
    files = {split: _data_file(f) for split, f in config["dataset_kwargs"]["data_files"].items()}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"task {name}: no data file {missing[0]}; set ${DATA_VAR[1:]} to the folder "
                                f"holding eval/ (default: {data_root()})")
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": {k: str(f) for k, f in files.items()}}
    order = config.pop("doc_order", None)
    if order not in (None, "sha256"):
        raise ValueError(f"task {name}: doc_order {order!r} is unknown; use sha256 or leave it out")
    if order == "sha256":
        config["process_docs"] = sha256_order
    return config


def sha256_order(docs):
    """docs (a datasets.Dataset of records with "task" and "id") sorted by sha256("0:{task}:{id}"): the
    order of the shared eval data's README, whose reference scores are those of the first 500 items."""
    keys = [hashlib.sha256(f"0:{task}:{id_}".encode()).hexdigest() for task, id_ in zip(docs["task"], docs["id"])]
    return docs.select(sorted(range(len(keys)), key=keys.__getitem__))


def _data_file(name: str) -> Path:
    if name.startswith(DATA_VAR + "/"):
        return data_root() / name[len(DATA_VAR) + 1 :]
    return TASKS_DIR / name


def evaluate_endpoint(base_url: str, model_name: str, tokenizer_dir: Path, tasks: list[str], limit: int | None,
                      max_length: int, batch_size: int = BATCH_SIZE, num_concurrent: int = NUM_CONCURRENT) -> dict:
    """lm-eval `local-completions` against a running endpoint: its results, n-samples and versions.
    num_concurrent requests of batch_size prompts each are in flight at once, so the engine's
    continuous batching has work to batch (one at a time, a GPU replica idles between requests)."""
    specs = [local_task(t) or t for t in tasks]
    manager = TaskManager(include_defaults=any(isinstance(s, str) for s in specs))  # indexing the registry costs ~15 s
    model_args = {
        "base_url": f"{base_url}/v1/completions",
        "model": model_name,
        "tokenizer": str(tokenizer_dir),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "max_length": max_length,
        "batch_size": batch_size,
        "num_concurrent": num_concurrent,
    }
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=specs, limit=limit,
                                  task_manager=manager, log_samples=False)
    return {key: out[key] for key in ("results", "n-samples", "versions")}


def _serve_and_evaluate(model_dir: str | Path, tasks: list[str], limit: int | None, port: int,
                        num_gpus: float = 0.0, **requests) -> dict:
    local = resolve_model_dir(model_dir)
    max_length = json.loads((local / "config.json").read_text())["max_position_embeddings"]
    url = run_server(local, port=port, num_gpus=num_gpus, api_key_env=None, app_name=APP_NAME, route_prefix=ROUTE)
    try:
        return evaluate_endpoint(url, model_name_of(local), local, tasks, limit, max_length, **requests)
    finally:
        serve.delete(APP_NAME)


def results_cache_dir() -> Path:
    """Where lm-eval results are kept by results_key: $ZEBRA_EVAL_CACHE, else <cache_root>/eval."""
    return Path(os.environ.get("ZEBRA_EVAL_CACHE") or cache_root() / "eval")


def results_key(model_dir: str | Path, tasks: list[str], limit: int | None, gpu: bool) -> str:
    """24 hex digits over everything an evaluation's scores depend on: the bytes of the model folder's files,
    each task (a local task's config and the bytes of its data files; another task by name, its definition
    pinned by lm-eval's version), the limit, GPU or CPU, the versions of lm-eval, transformers and torch,
    and the source of serve/, zebra/ and kernels/ (any edit there starts afresh). Not its path: a copy of a
    folder has the key of the original."""
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(f"{label}:{len(data)}:".encode() + data)

    folder = resolve_model_dir(model_dir)
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        add(f"model/{file.name}", file_sha256(file).encode())
    for name in tasks:
        config = local_task(name)
        add("task", name.encode() if config is None else json.dumps(config, sort_keys=True, default=_identity).encode())
        for split, file in sorted((config or {}).get("dataset_kwargs", {}).get("data_files", {}).items()):
            add(f"data/{split}", file_sha256(file).encode())
    add("limit", str(limit).encode())
    add("device", b"gpu" if gpu else b"cpu")
    for module in (lm_eval, transformers, torch):
        add(module.__name__, str(getattr(module, "__version__", "?")).encode())
    for source in sorted(p for d in CODE_DIRS for p in (REPO / d).rglob("*.py")):
        add(f"code/{source.relative_to(REPO)}", source.read_bytes())
    return h.hexdigest()[:24]


def _identity(value) -> str:
    """A task config's non-JSON values (process_docs: a function) by name, never by address."""
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"


def _cached_results(key: str) -> dict | None:
    file = results_cache_dir() / f"{key}.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # a truncated or foreign file: evaluate again (and overwrite it)
        log.warning("ignoring the unreadable cached results %s: %s", file, e)
        return None


def _cache_results(key: str, results: dict) -> Path:
    folder = results_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, default=str)
    os.replace(tmp, folder / f"{key}.json")  # whole or not at all, also with two runs writing at once
    return folder / f"{key}.json"


def retention_rows(results: dict[str, dict]) -> list[dict]:
    """One row per task and metric: the student's value (and stderr), the teacher's, student / teacher."""
    rows = []
    for task, metrics in results["student"]["results"].items():
        for key, value in metrics.items():
            metric, _, filter_ = key.partition(",")
            if not filter_ or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            row = {"task": task, "metric": metric, "filter": filter_, "student": value,
                   "student_stderr": metrics.get(f"{metric}_stderr,{filter_}")}
            if "teacher" in results:
                teacher_metrics = results["teacher"]["results"][task]
                teacher = teacher_metrics[key]
                row["teacher"] = teacher
                row["teacher_stderr"] = teacher_metrics.get(f"{metric}_stderr,{filter_}")
                row["retention"] = value / teacher if teacher else None
            rows.append(row)
    return rows


def average_row(rows: list[dict]) -> dict | None:
    """The mean over tasks of each task's headline metric (HEADLINE_METRICS), student and teacher,
    and retention = mean student / mean teacher (the paper's); None without any headline metric."""
    picked = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = {r["metric"]: r for r in rows if r["task"] == task}
        picked += [mine[m] for m in HEADLINE_METRICS if m in mine][:1]
    if not picked:
        return None
    row = {"task": f"average ({len(picked)} tasks)", "metric": "/".join(HEADLINE_METRICS), "filter": "",
           "student": sum(r["student"] for r in picked) / len(picked), "student_stderr": None}
    if all("teacher" in r for r in picked):
        row["teacher"] = sum(r["teacher"] for r in picked) / len(picked)
        row["teacher_stderr"] = None
        row["retention"] = row["student"] / row["teacher"] if row["teacher"] else None
    return row


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (value ± stderr), then their average_row; the teacher and
    retention columns only when a teacher ran."""
    teacher = any("teacher" in r for r in rows)
    head = ["task", "metric", "student"] + (["teacher", "retention"] if teacher else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    average = average_row(rows)
    several_tasks = len({r["task"] for r in rows}) > 1
    for r in rows + ([average] if average and several_tasks else []):
        cells = [r["task"], r["metric"], _with_stderr(r["student"], r["student_stderr"])]
        if teacher:
            cells += [_with_stderr(r["teacher"], r.get("teacher_stderr")),
                      "n/a" if r["retention"] is None else f"{r['retention']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _with_stderr(value: float, stderr) -> str:
    return f"{value:.4f} ± {stderr:.4f}" if isinstance(stderr, (int, float)) else f"{value:.4f}"


def run_eval(model_dir: str | Path, tasks: list[str], out_dir: str | Path, teacher_dir: str | Path | None = None,
             limit: int | None = None, port: int = 8000, num_gpus: float = 0.0, reuse: bool = True,
             batch_size: int = BATCH_SIZE, num_concurrent: int = NUM_CONCURRENT) -> dict:
    """Serve and evaluate the student (and the teacher), write out_dir/eval.json and eval.md, return
    the report. Connects to the running Ray cluster or starts a local one; each model is served as
    the application 'zebra-eval' under /eval on 127.0.0.1:port, one after the other, each replica with
    num_gpus GPUs (0: on the CPU); lm-eval sends it num_concurrent requests of batch_size prompts at once.

    reuse: a model evaluated before on the same tasks and limit, with the same files and code
    (results_key), is not served again: its results come from results_cache_dir(), and the report's
    "reused" names the file. The teacher of a second run (another KV budget, say) costs nothing."""
    models = {"student": model_dir, **({"teacher": teacher_dir} if teacher_dir is not None else {})}
    results, reused = {}, {}
    for role, path in models.items():
        key = results_key(path, tasks, limit, num_gpus > 0) if reuse else None
        cached = _cached_results(key) if key else None
        if cached is not None:
            reused[role] = str(results_cache_dir() / f"{key}.json")
            log.info("%s: lm-eval results reused from %s (same files, tasks, limit and code)", role, reused[role])
            results[role] = cached
            continue
        results[role] = _serve_and_evaluate(path, tasks, limit, port, num_gpus, batch_size=batch_size,
                                            num_concurrent=num_concurrent)
        if key:
            _cache_results(key, results[role])
    rows = retention_rows(results)
    report = {"models": {role: str(path) for role, path in models.items()}, "tasks": tasks, "limit": limit,
              "rows": rows, "reused": reused, **results}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "eval.md").write_text(markdown_table(rows))
    log.info("wrote %s and %s", out / "eval.json", out / "eval.md")
    return report
