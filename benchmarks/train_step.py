"""Training-step throughput of the transformer student and the Zebra hybrid, and the SSD scan alone.

One process, one batch shape, one device. Rows:
  (a) transformer: HF LlamaForCausalLM of the SmolLM2-135M shape (30 layers, hidden 576, 9 heads, 3 KV heads)
  (b) hybrid, mamba_backend "torch": 3 MLA layers (0, 14, 29), the rest Mamba2 on the PyTorch references
  (c) hybrid, mamba_backend "triton": the same on the Triton kernels (kernels.ssd_scan, kernels.conv1d)
  (d) the SSD scan alone, forward + backward: our Triton kernel, the PyTorch reference, mamba_ssm's
      mamba_chunk_scan_combined where it imports
  (e) the Mamba2 gated RMSNorm alone, forward + backward: kernels.norm's Triton kernel and its reference
A step is forward + backward + fused AdamW, under bf16 autocast on CUDA, random init and random tokens.
Model-FLOPs utilisation counts 6 N FLOPs per token (N = the parameter count) against --peak-flops.
Prints a table of ratios against (a) and writes JSON. Timings only: nothing is asserted.

    python -m benchmarks.train_step --out train_step.json            # 16 x 2048 on one GPU
    python -m benchmarks.train_step --tiny                           # CPU smoke run, tiny shapes, seconds
    python -m benchmarks.train_step --compile --models transformer hybrid_triton   # torch.compile'd steps
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

if not torch.cuda.is_available():  # CPU smoke runs: Triton reads this when it first decorates its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kernels.norm import gated_rms_norm  # noqa: E402
from kernels.ssd import ssd_chunked_ref  # noqa: E402
from zebra.convert import hybrid_config  # noqa: E402
from zebra.modeling import ZebraForCausalLM  # noqa: E402

log = logging.getLogger("benchmarks.train_step")

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
MLA_LAYERS = {"smollm2": [0, 14, 29], "tiny": [0, 3]}


def build_models(tiny: bool, chunk_size: int) -> dict:
    """name -> a function building that model (random init, float32 weights)."""
    llama = LlamaConfig(**(TINY if tiny else SMOLLM2))
    mla = MLA_LAYERS["tiny" if tiny else "smollm2"]
    rank, rope = (32, 16) if tiny else (128, 32)

    def hybrid(backend):
        return lambda: ZebraForCausalLM(hybrid_config(llama, mla, kv_rank=rank, qk_rope_dim=rope,
                                                      chunk_size=chunk_size, mamba_backend=backend))
    return {"transformer": lambda: LlamaForCausalLM(llama), "hybrid_torch": hybrid("torch"),
            "hybrid_triton": hybrid("triton")}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train_step(model, batch: int, seq: int, steps: int, warmup: int, device, peak_flops: float) -> dict:
    """Time forward + backward + AdamW on random tokens [batch, seq] -> step_s, tokens_per_s, peak_gib, mfu."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    params = sum(p.numel() for p in model.parameters())
    tokens_per_s = batch * seq / step_s
    return dict(step_s=step_s, tokens_per_s=tokens_per_s, params=params, mfu=6 * params * tokens_per_s / peak_flops,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                loss=loss.item())


def scan_functions() -> dict:
    """name -> scan(x, dt, A, B, C, chunk, D, s0) -> (y, final) for every SSD scan that can run here."""
    fns = {"torch_ref": lambda x, dt, A, B, C, chunk, D, s0: ssd_chunked_ref(x, dt, A, B, C, chunk, D=D,
                                                                             initial_state=s0)}
    try:
        from kernels.ssd_scan import ssd_scan_triton

        fns["triton"] = lambda x, dt, A, B, C, chunk, D, s0: ssd_scan_triton(x, dt, A, B, C, chunk, D=D,
                                                                             initial_state=s0)
    except ImportError as err:
        log.warning("kernels.ssd_scan does not import: %s", err)
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        fns["mamba_ssm"] = lambda x, dt, A, B, C, chunk, D, s0: mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk, D=D, initial_states=s0, return_final_states=True)
    except ImportError as err:
        log.info("mamba_ssm is not importable (%s); its scan is left out", err)
    return fns


def bench_scan(fn, shape, chunk: int, steps: int, warmup: int, device, dtype) -> dict:
    """Forward + backward of one scan on x [b, l, h, p] (dtype), B, C [b, l, h, n] -> ms per call."""
    b, l, h, p, n = shape
    leaves = [torch.randn(b, l, h, p, device=device).to(dtype), F.softplus(torch.randn(b, l, h, device=device) - 4),
              -torch.exp(torch.rand(h, device=device)), torch.randn(b, l, h, n, device=device).to(dtype),
              torch.randn(b, l, h, n, device=device).to(dtype), torch.ones(h, device=device),
              torch.zeros(b, h, p, n, device=device)]
    leaves = [t.requires_grad_() for t in leaves]
    dy = torch.randn(b, l, h, p, device=device).to(dtype)

    def call():
        y, final = fn(*leaves[:5], chunk, leaves[5], leaves[6])
        torch.autograd.backward([y, final], [dy.to(y.dtype), torch.zeros_like(final)])
    return dict(ms=time_ms(call, steps, warmup, device))


def bench_norm(backend: str, shape, steps: int, warmup: int, device, dtype) -> dict:
    """Forward + backward of the gated RMSNorm on y, z [b, l, h * p] (dtype, z a slice of a wider tensor as
    in the mixer), groups of p channels -> ms per call."""
    b, l, h, p, _ = shape
    y = torch.randn(b, l, h * p, device=device).to(dtype).requires_grad_()
    z = torch.randn(b, l, 3 * h * p, device=device).to(dtype).requires_grad_()
    weight = torch.ones(h * p, device=device, requires_grad=True)
    dout = torch.randn_like(y)

    def call():
        torch.autograd.backward(gated_rms_norm(y, z[..., : h * p], weight, p, 1e-5, backend), dout)
    return dict(ms=time_ms(call, steps, warmup, device))


def time_ms(call, steps: int, warmup: int, device) -> float:
    """Milliseconds per call() over `steps` calls after `warmup` untimed ones."""
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        call()
    sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def run_or_skip(name: str, fn) -> dict:
    """fn()'s result, or {"skipped": why} when this path cannot run here (logged)."""
    try:
        return fn()
    except (RuntimeError, ValueError, ImportError) as err:
        log.warning("%s skipped: %s", name, err)
        return {"skipped": f"{type(err).__name__}: {err}"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup, args.chunk_size = 2, 32, 1, 1, 16
    results = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", batch=args.batch,
                   seq=args.seq, chunk_size=args.chunk_size, compile=args.compile, peak_flops=args.peak_flops,
                   torch=torch.__version__, train_step={}, ssd_scan={}, gated_rms_norm={})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (2, 32, 2, 16, 16) if args.tiny else (args.batch, args.seq, 9, 64, 64)
    for name, fn in scan_functions().items():  # first: a CUDA error in a model step ends the process's CUDA use
        results["ssd_scan"][name] = run_or_skip(name, lambda fn=fn: bench_scan(
            fn, shape, args.chunk_size, args.steps, args.warmup, device, dtype))
    for backend in ("triton", "torch"):
        results["gated_rms_norm"][backend] = run_or_skip(f"gated_rms_norm {backend}", lambda b=backend: bench_norm(
            b, shape, args.steps, args.warmup, device, dtype))
    for name, build in build_models(args.tiny, args.chunk_size).items():
        if args.models and name not in args.models:
            continue

        def step(build=build):
            torch.manual_seed(0)
            model = build()
            model = torch.compile(model) if args.compile else model
            out = bench_train_step(model, args.batch, args.seq, args.steps, args.warmup, device, args.peak_flops)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return out
        results["train_step"][name] = run_or_skip(name, step)
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


def table(results: dict) -> str:
    """The train-step rows with ratios against the transformer, then the scan and norm rows against Triton's."""
    rows = [f"train step, batch {results['batch']} x {results['seq']}, {results['device']}",
            f"{'model':<16}{'step s':>9}{'tokens/s':>12}{'x transf.':>10}{'peak GiB':>10}{'MFU':>7}"]
    base = results["train_step"].get("transformer", {}).get("tokens_per_s")
    for name, r in results["train_step"].items():
        if "skipped" in r:
            rows.append(f"{name:<16}skipped: {r['skipped'][:100]}")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        rows.append(f"{name:<16}{r['step_s']:>9.3f}{r['tokens_per_s']:>12,.0f}{ratio:>10}{peak:>10}"
                    f"{r['mfu'] * 100:>6.1f}%")
    for key, title in (("ssd_scan", f"SSD scan forward + backward (chunk {results['chunk_size']})"),
                       ("gated_rms_norm", "gated RMSNorm forward + backward")):
        rows += [title, f"{'path':<16}{'ms':>9}{'x triton':>10}"]
        ours = results[key].get("triton", {}).get("ms")
        for name, r in results[key].items():
            if "skipped" in r:
                rows.append(f"{name:<16}skipped: {r['skipped'][:100]}")
                continue
            ratio = f"{r['ms'] / ours:>10.2f}" if ours else f"{'-':>10}"
            rows.append(f"{name:<16}{r['ms']:>9.2f}{ratio}")
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config, batch 2 x 32, 1 step, on whatever device is here")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=64, help="SSD chunk (the ZebraConfig default is 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-flops", type=float, default=790e12, help="peak FLOP/s for the utilisation")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--models", nargs="+", choices=("transformer", "hybrid_torch", "hybrid_triton"),
                        help="train-step rows to run (default: all)")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
