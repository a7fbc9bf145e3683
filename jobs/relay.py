"""The part of a distillation run that the Ray Train controller executes: a callback relaying rank 0's
metrics of each report to the driver. Its own module, importing only Ray, because the controller
unpickles it: defined in jobs.train, it made every controller import DeepSpeed, transformers and the
model code first (~10 s of CPU per training run)."""
from __future__ import annotations

from ray.train import UserCallback
from ray.util.queue import Queue


class RelayReports(UserCallback):
    """Runs in the Ray Train controller: forwards rank 0's metrics of each report to the driver."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.queue.put(metrics[0])
