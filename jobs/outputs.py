"""The typed outputs of the pipeline's stages: what each stage returns, stores in its COMPLETE marker
(as JSON) and hands to the stages after it (Context.output(KdOutput), never a string-keyed dict).

Models are not outputs: a stage saves them in the run's storage under its own keys (init/mla,
ild/mamba, kd/model, ...) and a later stage fetches them with Context.model_dir.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T", bound="StageOutput")


@dataclasses.dataclass(kw_only=True)
class StageOutput:
    """What every stage reports: the tokens it processed and its wall time (the runner sets it)."""

    tokens: int
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[T], data: dict[str, Any]) -> T:
        """The output a COMPLETE marker holds; keys the class does not know (stage, hash) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING} - set(data)
        if missing:
            raise ValueError(f"stored {cls.__name__} lacks {sorted(missing)}; rerun its stage")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass(kw_only=True)
class InitOutput(StageOutput):
    init_errors: dict[str, list[float]]  # per student kind ("mla", "mamba"): relative init error per layer
    kv_bytes_per_token: dict[str, int]  # per student kind and "teacher"


@dataclasses.dataclass(kw_only=True)
class IldOutput(StageOutput):
    loss_before: dict[str, float]  # per student kind: held-out ILD loss (zebra.losses.ild_loss) summed over layers
    loss_after: dict[str, float]
    history: list[dict]  # the loss curve (jobs.context.curve)


@dataclasses.dataclass(kw_only=True)
class SmartOutput(StageOutput):
    mla_layers: list[int]  # the chosen (or, with student.mla_layers, the given) MLA layers
    scores: list[float] | None = None  # [num_layers] sensitivity; None: not scored (smart disabled)
    kl_all_mamba: float | None = None


@dataclasses.dataclass(kw_only=True)
class KdOutput(StageOutput):
    mla_layers: list[int]
    kl_before: float  # held-out KL(teacher || hybrid), nats/token
    kl_after: float
    history: list[dict]
    ppl_teacher: float | None = None  # held-out perplexity (the same rows); None in outputs stored before it was
    ppl_before: float | None = None
    ppl_after: float | None = None


@dataclasses.dataclass(kw_only=True)
class DpoOutput(StageOutput):
    pairs: int  # training pairs
    held_out_pairs: int
    before: dict[str, float]  # held-out preference metrics (zebra.dpo.preference_metrics) of kd/model
    after: dict[str, float]  # ... of dpo/model
    history: list[dict]


@dataclasses.dataclass(kw_only=True)
class ExportOutput(StageOutput):
    path: str
    source: str  # the storage key exported: dpo/model or kd/model
    dtype: str
    kv_bytes_per_token: int


@dataclasses.dataclass(kw_only=True)
class EvalOutput(StageOutput):
    rows: list[dict]
