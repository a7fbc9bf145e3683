"""The attention kernel of MLA's training pass, against the teacher's, forward + backward.

MLA's naive (training) attention calls SDPA with query/key head dims of nope + rope (96 for SmolLM2 at
rope 32) and a value head dim of v_head_dim (64). PyTorch's flash kernel needs one head dim for q, k and
v, so this call runs another kernel. Rows, same batch, one run:
  - teacher: q/k/v head dim 64 (the transformer's attention, the baseline);
  - mla: q/k 96, v 64, default dispatch (what zebra.mla.MLAttention.naive_attention runs);
  - mla_pad_v: v zero-padded to 96 and the output sliced back to 64 (equal dims: flash may run);
  - mla/<backend>, mla_pad_v/<backend>: each SDPA backend forced (flash, efficient, cudnn, math) where
    it accepts the call.
For each: ms per forward + backward, the ratio to the teacher row, and on CUDA the kernel it launched
(from the profiler). Prints a table and writes JSON.

    python -m benchmarks.attention                       # SmolLM2 shapes: batch 16 x 2048, 9 heads, bf16
    python -m benchmarks.attention --tiny                # CPU, small shapes: a smoke run, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.train_step import time_ms

log = logging.getLogger("benchmarks.attention")

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def attend(q, k, v, v_dim: int, scale: float):
    """Causal SDPA; v's head dim may exceed v_dim (zero padding), the output keeps the first v_dim."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :v_dim]


def inputs(batch: int, heads: int, seq: int, qk: int, v: int, dtype, device):
    """Fresh leaves q [b, h, t, qk], k [b, h, t, qk], v [b, h, t, v]."""
    q, k = (torch.randn(batch, heads, seq, qk, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    return q, k, torch.randn(batch, heads, seq, v, dtype=dtype, device=device, requires_grad=True)


def step(q, k, v_real, pad_v_to: int | None, scale: float):
    """One forward + backward; pad_v_to: v zero-padded to that head dim inside the graph (F.pad)."""
    v = v_real if pad_v_to is None else F.pad(v_real, (0, pad_v_to - v_real.shape[-1]))
    out = attend(q, k, v, v_real.shape[-1], scale)
    out.backward(torch.ones_like(out))


def time_row(args, qk: int, v: int, pad_v_to: int | None, backend: str | None, device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v_real = inputs(args.batch, args.heads, args.seq, qk, v, dtype, device)
    pad, scale = pad_v_to, qk ** -0.5
    ctx = sdpa_kernel([BACKENDS[backend]]) if backend else contextlib.nullcontext()
    try:
        with ctx:
            ms = time_ms(lambda: step(q, k, v_real, pad, scale), args.iters, args.warmup, device)
            kernels = launched_kernels(q, k, v_real, pad, scale) if device.type == "cuda" else []
    except RuntimeError as err:  # the backend refuses these shapes
        return {"ms": None, "error": str(err).splitlines()[0][:160]}
    return {"ms": ms, "kernels": kernels}


def launched_kernels(q, k, v_real, pad, scale) -> list[str]:
    """Names of the attention kernels one forward + backward launches (the profiler's CUDA events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(q, k, v_real, pad, scale)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
    keys = ("flash", "fmha", "cudnn", "attention", "efficient", "sdpa", "bmm", "gemm", "softmax")
    return sorted(n[:90] for n in names if any(key in n.lower() for key in keys))


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    qk, v = args.qk_dim, args.v_dim
    rows = {"teacher": time_row(args, v, v, None, None, device),
            "mla": time_row(args, qk, v, None, None, device),
            "mla_pad_v": time_row(args, qk, v, qk, None, device)}
    for name in BACKENDS if device.type == "cuda" else ():
        rows[f"mla/{name}"] = time_row(args, qk, v, None, name, device)
        rows[f"mla_pad_v/{name}"] = time_row(args, qk, v, qk, name, device)
    base = rows["teacher"]["ms"]
    for row in rows.values():
        row["x_teacher"] = row["ms"] / base if row.get("ms") and base else None
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": vars(args), "rows": rows}


def table(results: dict) -> str:
    lines = ["| row | ms fwd+bwd | x teacher | kernels or error |", "|---|---:|---:|---|"]
    for name, row in results["rows"].items():
        ms = f"{row['ms']:.3f}" if row.get("ms") else "-"
        ratio = f"{row['x_teacher']:.2f}" if row.get("x_teacher") else "-"
        what = row.get("error") or ", ".join(row.get("kernels", []))[:200]
        lines.append(f"| {name} | {ms} | {ratio} | {what} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--qk-dim", type=int, default=96, help="nope + rope head dim of MLA's query and key")
    p.add_argument("--v-dim", type=int, default=64, help="MLA's value head dim (the teacher's head dim)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="CPU, batch 2 x 128, 2 heads")
    p.add_argument("--out", default="attention.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.heads, args.iters, args.warmup = 2, 128, 2, 2, 1
    results = run(args)
    print(f"{results['device']}, torch {results['torch']}: batch {args.batch} x {args.seq}, {args.heads} heads, "
          f"q/k {args.qk_dim}, v {args.v_dim}")
    print(table(results))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
