"""The teacher's round trip as a Ray actor against the teacher in this process: what a training step waits
for to get its targets, by micro-batch size.

    python -m benchmarks.teacher_actor [--batches 4 8 16] [--seq 2048] [--calls 8] [--tiny] [--out teacher_actor.json]

The teacher of benchmarks.train_step's KD rows (SmolLM2-135M's shape, random weights, bf16 on CUDA) twice on one
device: in this process (cluster.teacher.LocalTeacher) and in a TeacherActor reached through RemoteTeacher (CUDA IPC
handles on a GPU, Ray's object store on the CPU), as the stages hold it with `teacher_mode: actor`. For each
micro-batch size, both of the stages' calls: `logits` (KD, full vocabulary: one [batch, seq, vocab] tensor) and
`hidden_states(mixers=True)` (ILD: n_layers + 1 hidden states and n_layers attention outputs). Each is called
--calls times after two warm-up calls, one after another, each call's outputs released before the next (as a
step releases its targets), the device synchronised after each. Columns:
  in-process ms   LocalTeacher's call
  actor ms        RemoteTeacher's call: the request, the actor's forward and hand-off, ray.get, opening the outputs
  open ms         of which the host time of turning the shipped handles into tensors (RemoteTeacher._open)
  actor / in-process
and, in the JSON, the largest difference between the two teachers' outputs (the same weights: ~0).
The stages' step time hardly changed from 16 to 8 sequences a worker on 2 x H200 (notes/GPU.md session 10): if the
actor's round trip stays near its 16-sequence time at 8 while the in-process call halves, the round trip is the
floor of a small step, and the fix is in cluster.teacher's hand-off (notes/TEAM.md); if both halve, it is not.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import ray
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.train_step import SMOLLM2, TINY
from cluster.connect import worker_pythonpath
from cluster.teacher import LocalTeacher, RemoteTeacher, TeacherActor

CALLS = ("logits", "hidden_states")


class Teacher:
    """A picklable teacher factory: the random teacher of benchmarks.train_step's KD rows (seed 1)."""

    def __init__(self, tiny: bool, dtype: torch.dtype):
        self.tiny, self.dtype = tiny, dtype

    def __call__(self):
        torch.manual_seed(1)
        return LlamaForCausalLM(LlamaConfig(**(TINY if self.tiny else SMOLLM2))).to(self.dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(teacher, name: str, ids: torch.Tensor):
    return teacher.logits(ids) if name == "logits" else teacher.hidden_states(ids, mixers=True)


def time_local(teacher: LocalTeacher, name: str, ids: torch.Tensor, calls: int, warmup: int = 2) -> list[float]:
    """Seconds of each timed call, outputs released and the device synchronised after each."""
    out = []
    for i in range(warmup + calls):
        start = time.perf_counter()
        result = _call(teacher, name, ids)
        _sync(teacher.device)
        if i >= warmup:
            out.append(time.perf_counter() - start)
        del result
    return out


def time_remote(teacher: RemoteTeacher, name: str, ids: torch.Tensor, calls: int,
                warmup: int = 2) -> tuple[list[float], list[float]]:
    """(seconds of each timed call, seconds of its _open), RemoteTeacher's call taken apart at its open."""
    total, opening = [], []
    host_ids = ids.cpu()
    for i in range(warmup + calls):
        start = time.perf_counter()
        ref = (teacher.actor.logits.remote(host_ids) if name == "logits"
               else teacher.actor.hidden_states.remote(host_ids, True))
        shipped = ray.get(ref)
        opened_at = time.perf_counter()
        result = teacher._open(shipped)
        open_s = time.perf_counter() - opened_at
        _sync(teacher.device)
        if i >= warmup:
            total.append(time.perf_counter() - start)
            opening.append(open_s)
        del result, shipped
    return total, opening


def max_difference(local: LocalTeacher, remote: RemoteTeacher, name: str, ids: torch.Tensor) -> float:
    """The largest absolute difference between the two teachers' outputs for ids: both time the same work."""
    ours, theirs = _call(local, name, ids), _call(remote, name, ids)
    if name == "hidden_states":
        ours, theirs = [*ours[0], *ours[1]], [*theirs[0], *theirs[1]]
    else:
        ours, theirs = [ours], [theirs]
    if len(ours) != len(theirs):
        raise RuntimeError(f"{name}: {len(ours)} tensors in this process, {len(theirs)} from the actor")
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, theirs))


def _ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def run(batches: list[int], seq: int, calls: int, tiny: bool, device: torch.device) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    factory = Teacher(tiny, dtype)
    local = LocalTeacher(factory, device)
    # a Ray of its own with one GPU: the actor gets GPU 0, the one this process uses as cuda:0; its workers
    # import this module (the teacher factory) from the source tree as jobs.run's embedded Ray's do
    pythonpath = worker_pythonpath()
    ray.init(address="local", num_cpus=2, num_gpus=1 if device.type == "cuda" else 0, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}} if pythonpath else None)
    try:
        options = {"num_cpus": 1, "num_gpus": 0.5} if device.type == "cuda" else {"num_cpus": 1}
        remote = RemoteTeacher(TeacherActor.options(**options).remote(factory, str(device)), device)
        vocab = local.model.config.vocab_size
        rows = []
        for batch in batches:
            ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch)).to(device)
            for name in CALLS:
                inprocess = time_local(local, name, ids, calls)
                actor, opening = time_remote(remote, name, ids, calls)
                rows.append({"call": name, "batch": batch, "seq": seq, "calls": calls,
                             "inprocess_ms": _ms(inprocess), "actor_ms": _ms(actor), "open_ms": _ms(opening),
                             "actor_vs_inprocess": statistics.median(actor) / statistics.median(inprocess),
                             "max_abs_difference": max_difference(local, remote, name, ids)})
                print(_row(rows[-1]), flush=True)
        return rows
    finally:
        ray.shutdown()


HEADER = ("| call | micro-batch | in-process ms | actor ms | of which open ms | actor / in-process |\n"
          "|---|---:|---:|---:|---:|---:|")


def _row(r: dict) -> str:
    return (f"| {r['call']} | {r['batch']} x {r['seq']} | {r['inprocess_ms']:.2f} | {r['actor_ms']:.2f} | "
            f"{r['open_ms']:.2f} | {r['actor_vs_inprocess']:.2f}x |")


def table(rows: list[dict]) -> str:
    return "\n".join([HEADER, *(_row(r) for r in rows)])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16], help="micro-batch sizes (sequences)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=8, help="timed calls per row, after two warm-up calls")
    parser.add_argument("--tiny", action="store_true", help="a tiny teacher, micro-batches 1 and 2 of 32 tokens, "
                        "3 calls: seconds on a CPU")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batches, args.seq, args.calls = [1, 2], 32, 3
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    print(HEADER, flush=True)
    rows = run(args.batches, args.seq, args.calls, args.tiny, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, teacher {'tiny' if args.tiny else 'SmolLM2-135M shape'}: ratios against the in-process call "
          "of the same run\n" + table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
