"""Decode throughput and memory of a hybrid against its teacher, side by side.

For each context length: the same random prompt batch [batch, context] goes through each model's
cached decode loop (prefill, then `--gen` greedy steps); we record decode tokens/s, peak memory,
the bytes the cache holds (measured, and by zebra.kv's formula), and the largest batch that fits
`--budget-gib`: by binary search on a CUDA device, or computed on CPU as
(budget - weights) / cache bytes per sequence. Prints a table of hybrid/teacher ratios and writes JSON.

    python -m benchmarks.decode --teacher DIR --hybrid DIR --contexts 512 2048 8192 --gen 128
    python -m benchmarks.decode --tiny          # random tiny pair on CPU: a smoke run, seconds
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import zebra  # noqa: F401  registers the Auto classes that load() relies on
from zebra.convert import convert, hybrid_config
from zebra.kv import kv_bytes_per_token, state_bytes_per_sequence

log = logging.getLogger("benchmarks.decode")


def tiny_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random 4-layer Llama and its hybrid (layers 0 and 2 MLA, 1 and 3 Mamba2), no training."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    teacher = LlamaForCausalLM(config).eval()
    hybrid = convert(teacher, hybrid_config(config, [0, 2], kv_rank=32, qk_rope_dim=16))
    return teacher, hybrid


def load(path: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def cache_bytes(cache) -> int:
    """Bytes of every tensor storage the cache object holds (found by walking its attributes)."""
    seen_objects, storages, stack = set(), {}, [cache]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            stack.extend(vars(obj).values())
    return sum(storages.values())


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def decode(model, ids: torch.Tensor, gen: int) -> tuple[float, float, object]:
    """Prefill ids [batch, context], then `gen` greedy steps; (prefill s, decode s, final cache)."""
    device = str(ids.device)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill = time.perf_counter() - start
    for _ in range(gen):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    _sync(device)
    return prefill, time.perf_counter() - start - prefill, out.past_key_values


def measure(model, ids: torch.Tensor, gen: int, repeats: int) -> dict:
    """The fastest of `repeats` decode runs: tokens/s, peak memory (CUDA: allocator peak; CPU:
    weights + cache) and cache bytes."""
    device = str(ids.device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    prefill_s, decode_s, cache = min((decode(model, ids, gen) for _ in range(repeats)), key=lambda run: run[1])
    held = cache_bytes(cache)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else weight_bytes(model) + held
    batch, context = ids.shape
    dtype = next(model.parameters()).dtype
    formula = batch * (kv_bytes_per_token(model.config, dtype) * (context + gen)
                       + state_bytes_per_sequence(model.config, dtype))
    return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens_per_s": batch * gen / decode_s,
            "peak_bytes": peak, "peak_is": "cuda allocator peak" if device.startswith("cuda") else "weights + cache",
            "cache_bytes": held, "cache_bytes_formula": formula}


def max_batch(model, context: int, gen: int, budget: int, measured: dict, batch: int, device: str,
              search: bool = False) -> int:
    """Largest batch whose run at this context fits `budget` bytes: searched by real runs on CUDA when
    `search` (each probe prefills the whole batch: minutes at long contexts), else from the cache size."""
    if not (search and device.startswith("cuda")):
        per_sequence = measured["cache_bytes"] / batch
        return max(int((budget - weight_bytes(model)) // per_sequence), 0)
    return _largest_fitting(lambda b: _fits(model, b, context, gen, budget, device))


def _fits(model, batch: int, context: int, gen: int, budget: int, device: str) -> bool:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.config.vocab_size, (batch, context + gen - 1), device=device)
    try:
        decode(model, ids, 1)  # the cache at its final length, plus one decode step
    except torch.cuda.OutOfMemoryError:
        return False
    return torch.cuda.max_memory_allocated() <= budget


def _largest_fitting(fits, limit: int = 1 << 16) -> int:
    """Largest b in [0, limit] with fits(b), fits monotone: doubling, then bisection."""
    if not fits(1):
        return 0
    low = 1
    while low * 2 <= limit and fits(low * 2):
        low *= 2
    high = min(low * 2, limit + 1)  # fits(low) holds; fits(high) fails or lies past the limit
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def run(teacher, hybrid, contexts: list[int], batch: int, gen: int, budget: int, device: str, repeats: int = 3,
        seed: int = 0, search: bool = False) -> list[dict]:
    """One row per context: each model's measurements, its max batch, and hybrid/teacher ratios."""
    rows = []
    models = {"teacher": teacher, "hybrid": hybrid}
    for model in models.values():  # warm-up: kernels, allocator, lazy inits
        decode(model, torch.randint(0, model.config.vocab_size, (batch, 16), device=device), 4)
    for context in contexts:
        ids = torch.randint(0, teacher.config.vocab_size, (batch, context),
                            generator=torch.Generator().manual_seed(seed)).to(device)
        row = {"context": context, "batch": batch, "gen": gen}
        for name, model in models.items():
            row[name] = measure(model, ids, gen, repeats)
            row[name]["max_batch"] = max_batch(model, context, gen, budget, row[name], batch, device, search)
        row["ratios"] = {key: row["hybrid"][key] / row["teacher"][key] if row["teacher"][key] else None
                         for key in ("decode_tokens_per_s", "peak_bytes", "cache_bytes", "max_batch")}
        rows.append(row)
        log.info("context %d done", context)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table: throughput, memory and max batch of both models and hybrid/teacher ratios."""
    head = ["context", "tok/s teacher", "tok/s hybrid", "speed-up", "peak MiB teacher", "peak MiB hybrid",
            "peak ratio", "cache MiB teacher", "cache MiB hybrid", "cache ratio", "max batch teacher",
            "max batch hybrid", "batch ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mib = 2.0**20
    for r in rows:
        t, h, q = r["teacher"], r["hybrid"], r["ratios"]
        cells = [r["context"], f"{t['decode_tokens_per_s']:.1f}", f"{h['decode_tokens_per_s']:.1f}",
                 f"{q['decode_tokens_per_s']:.2f}x", f"{t['peak_bytes'] / mib:.1f}", f"{h['peak_bytes'] / mib:.1f}",
                 f"{q['peak_bytes']:.3f}", f"{t['cache_bytes'] / mib:.2f}", f"{h['cache_bytes'] / mib:.2f}",
                 f"{q['cache_bytes']:.3f}", t["max_batch"], h["max_batch"],
                 "n/a" if q["max_batch"] is None else f"{q['max_batch']:.2f}x"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="teacher checkpoint folder")
    p.add_argument("--hybrid", help="hybrid checkpoint folder")
    p.add_argument("--tiny", action="store_true", help="use a random tiny teacher and its hybrid (CPU smoke run)")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192], help="prompt lengths")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gen", type=int, default=128, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the fastest counts")
    p.add_argument("--budget-gib", type=float, default=None, help="memory budget for the max batch (default: "
                   "the device's total memory on CUDA, 4 GiB on CPU)")
    p.add_argument("--search-batch", action="store_true", help="find the max batch by real runs on CUDA "
                   "(slow) instead of (budget - weights) / cache bytes per sequence")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA and float32 on CPU by default")
    p.add_argument("--out", default="runs/benchmarks/decode.json")
    args = p.parse_args(argv)
    if args.tiny == bool(args.teacher or args.hybrid) or (not args.tiny and not (args.teacher and args.hybrid)):
        p.error("give either --tiny, or both --teacher and --hybrid")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.tiny:
        teacher, hybrid = (m.to(args.device, dtype) for m in tiny_pair())
    else:
        teacher, hybrid = load(args.teacher, args.device, dtype), load(args.hybrid, args.device, dtype)
    if args.budget_gib is not None:
        budget = int(args.budget_gib * 2**30)
    else:
        budget = torch.cuda.get_device_properties(args.device).total_memory if args.device.startswith("cuda") else 4 * 2**30
    rows = run(teacher, hybrid, args.contexts, args.batch, args.gen, budget, args.device, args.repeats,
               search=args.search_batch)
    print(table(rows))
    report = {"device": args.device, "dtype": str(dtype), "budget_bytes": budget, "batch": args.batch,
              "gen": args.gen, "repeats": args.repeats,
              "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
              "max_batch_method": "search" if args.search_batch and args.device.startswith("cuda") else "analytic", "teacher": args.teacher or "tiny random Llama", "hybrid": args.hybrid or "tiny conversion",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
