"""Tokenising a corpus prefix for a run: the old two passes in the driver against one pass, in the driver
and on Ray tasks.

    python -m benchmarks.tokenise [--source $ZEBRA_DATA/corpus/prose-v1.jsonl.xz] [--tokens 4000000]
                                  [--num-cpus N] [--out runs/benchmarks/tokenise.json]

Three ways to get the first documents holding --tokens tokens and their token stream, with the default
teacher's tokenizer, each timed from the first document read to the stream in memory:
  two-pass  : count with texts_for_tokens, then tokenise the chosen texts again (the stages before 2026-11-30)
  driver    : zebra.data.tokenize_until in this process (HF tokenizers' own threads)
  ray       : tokenize_until over jobs.context.parallel_chunk_map (an embedded Ray of --num-cpus CPUs,
              one chunk of 256 documents per task; the workers' start-up is measured, not hidden)
All three must give the same stream (checked). Prints a table of ratios against two-pass; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokenise", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="$ZEBRA_DATA/corpus/prose-v1.jsonl.xz", help="corpus (zebra.data sources)")
    parser.add_argument("--tokens", type=int, default=4_000_000, help="tokens the run needs (default 4M)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the embedded Ray")
    parser.add_argument("--out", default="runs/benchmarks/tokenise.json")
    args = parser.parse_args(argv)

    import numpy as np
    import ray
    from transformers import AutoTokenizer

    from jobs.context import parallel_chunk_map
    from zebra.data import _stream_array, iter_texts, texts_for_tokens, tokenize_until
    from zebra.teacher import teacher_folder

    where = teacher_folder("default")
    tok = AutoTokenizer.from_pretrained(where)
    corpus = lambda: iter_texts(args.source)  # noqa: E731
    rows, streams = [], {}

    def timed(name, run):
        start = time.perf_counter()
        stream = run()
        seconds = time.perf_counter() - start
        streams[name] = stream
        rows.append({"method": name, "seconds": seconds, "tokens": int(len(stream)), "tokens_per_s": len(stream) / seconds})
        print(f"{name}: {len(stream)} tokens in {seconds:.1f} s", flush=True)

    timed("two-pass", lambda: _stream_array(texts_for_tokens(corpus(), tok, args.tokens), tok))
    timed("driver", lambda: tokenize_until(corpus(), tok, args.tokens)[1])
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        timed("ray", lambda: tokenize_until(corpus(), tok, args.tokens, map_chunks=parallel_chunk_map(where))[1])
    finally:
        ray.shutdown()
    same = all(np.array_equal(streams["two-pass"], s) for s in streams.values())
    base = rows[0]["seconds"]
    print(f"\n{args.tokens} tokens of {args.source}, {args.num_cpus} CPUs; streams identical: {same}")
    print("| method | seconds | tokens/s | x two-pass |\n|---|---:|---:|---:|")
    for r in rows:
        r["speedup"] = base / r["seconds"]
        print(f"| {r['method']} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "identical": same, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
