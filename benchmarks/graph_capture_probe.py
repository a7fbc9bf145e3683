"""Which CUDA-graph captures of a student's training forward + backward succeed, one line each (a GPU diagnostic).

Session 13 (notes/GPU.md): zebra.cuda_graphs captured the ILD pair inside the DeepSpeed engine in one process
(0.304 -> 0.133 s a step at 8 x 2048), but not a KD hybrid inside the engine, nor the ILD pair in a Ray Train
worker; the first error under the capture was "operation would make the legacy stream depend on a capturing
blocking stream" (cudaErrorStreamCaptureImplicit) raised in torch.autograd.grad. This probe bisects that on tiny
students (the shapes of tests/jobs/test_cuda_graphs_train.py), each case in a fresh module:

    plain_*      the module alone (no DeepSpeed)
    ds_*         inside jobs.train._engine (ZeRO-2, float32), called as the engine calls it, or through the engine
    *_side       the engine built and its warm-up step run with a side stream current (nothing of the student's
                 autograd state then refers to the legacy default stream)
    *_devids     the ids made on the device instead of copied from pinned host memory as jobs.train._next_batch does
    *_pinned     ZeRO's parameter views re-made with gradients on, as DeepSpeed makes them when jobs.train._engine
                 does not turn gradients off: they hold each parameter's gradient accumulator, tied to the stream
                 current then (the cause found in session 14; these cases should fail)

    python -m benchmarks.graph_capture_probe            # prints "case: OK" or "case: FAIL <first CUDA error>"
    python -m benchmarks.graph_capture_probe --device cpu   # smoke run of the cases: nothing is captured there

Needs a GPU, DeepSpeed and the repository on PYTHONPATH (the stage bundle on the GPU host).
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "jobs"))

CASES = ("plain_kd", "plain_ild", "ds_kd", "ds_ild", "ds_kd_engine", "ds_kd_devids", "ds_kd_engine_devids",
         "ds_kd_side", "ds_kd_side_devids", "ds_kd_pinned", "ds_ild_pinned",
         "ds_kd_side_pinned")


def case(name: str, device: torch.device) -> str:
    import test_cuda_graphs_train as t

    from jobs.train import TrainConfig, _engine, _next_batch
    from zebra.cuda_graphs import capture_failure, graph_forward, is_graphed

    kind = "kd" if "kd" in name else "ild"
    cfg = TrainConfig(workers=1, use_gpu=device.type == "cuda", zero_stage=2, micro_batch=t.MICRO, seq_len=t.SEQ, bf16=False,
                      total_steps=10)
    ids = torch.randint(0, t.VOCAB, (t.MICRO, t.SEQ))
    ids = ids.to(device) if name.endswith("devids") else _next_batch(iter([{"input_ids": ids}]), cfg, device)[
        "input_ids"]
    side = torch.cuda.Stream() if "_side" in name and device.type == "cuda" else None
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        if kind == "ild":
            teacher = t.teacher_factory().to(device)
            with torch.no_grad():
                out = teacher(ids, output_hidden_states=True)
            hidden = [h.detach() for h in out.hidden_states]
            args = ((hidden, hidden[1:]),)
        else:
            args = (ids,)
        student = t.students(kind).to(device).train()
        if name.startswith("plain"):
            module, call = student, student
        else:
            engine = _engine(cfg, student, world=1)
            if name.endswith("pinned"):
                with torch.enable_grad():
                    engine.optimizer._link_all_hp_params()
            module, call = engine.module, (engine if "_engine" in name else engine.module)
        graph_forward(module)
        result = call(*args)
        loss = result.logits.float().square().mean() if kind == "kd" else result
        loss.backward()
        if device.type == "cpu":
            return "ran eager (nothing is captured on the CPU)"
        return "OK" if is_graphed(module) else f"FAIL {capture_failure(module)}"


def main(argv=None) -> dict[str, str]:
    import argparse

    from benchmarks.train_step import one_rank_group
    from zebra.cuda_graphs import first_error

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    device = torch.device(parser.parse_args(argv).device)
    results = {}
    with one_rank_group(device):  # one for all: DeepSpeed keeps the groups it made of the first
        for name in CASES:
            try:
                results[name] = case(name, device)
            except Exception as error:  # noqa: BLE001 - a diagnostic reports every case
                results[name] = f"ERROR {first_error(error)}"
                traceback.print_exc(limit=-4)
            print(f"{name}: {results[name]}", flush=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
    return results


if __name__ == "__main__":
    main()
