"""The `zebra` command. This module owns the parser and `zebra convert` (a teacher -> a hybrid HF
folder, no training, no Ray); the layers above add their subcommands (run, submit, tune, serve,
eval) through the entry-point group "zebra.commands" declared in pyproject.toml, so nothing here
imports them. An entry point names a function `add(subparsers)` that adds one subparser and sets
its `fn(args) -> exit code`; such modules import only argparse at load time, and their heavy
modules (Ray, Serve, Tune) inside `fn`, so `zebra --help` and `zebra convert` never load Ray.

    zebra convert --teacher default --mla-layers 0,14,29 --kv-rank 128 --qk-rope-dim 32 --out runs/convert

Bad arguments are refused before any work starts, with the flag named: ranks and token counts
must be positive, --qk-rope-dim even, --mla-layers distinct and within the teacher's layers,
--kv-rank at most the teacher's per-layer K+V width, --qk-rope-dim at most its per-layer K width,
and --out a folder this process can write.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import sys
import uuid
from importlib.metadata import entry_points
from pathlib import Path

import torch
from transformers import AutoConfig

from .kv import kv_bytes_per_token, kv_fraction, kv_values_per_token

DESCRIPTION = ("Compose fast MLA + Mamba2 hybrids from a Llama teacher: `convert` runs here with no Ray; "
               "run, submit, tune, serve and eval use Ray.")
COMMANDS_GROUP = "zebra.commands"
CONVERT_DEFAULTS = {"kv_rank": 128, "qk_rope_dim": 32}
CALIB_SEQ_LEN = 256



class UsageError(ValueError):
    """A command-line argument is invalid; the message names the flag, the value and what is allowed."""


# ---- argument types (argparse names the flag in their errors) -----------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def even_positive_int(text: str) -> int:
    value = positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even (RoPE rotates pairs of dimensions), got {value}")
    return value


def layer_list(text: str) -> list[int]:
    """'0,14,29' -> [0, 14, 29]: distinct non-negative layer indices, at least one."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,14,29, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one layer index, like 0,14,29")
    negative = [i for i in layers if i < 0]
    if negative:
        raise argparse.ArgumentTypeError(f"layer indices start at 0, got {negative}")
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"layers {repeated} listed more than once")
    return sorted(layers)


# ---- checks that need the file system or the teacher's shape -----------------------------------

def check_writable_folder(path: str | Path) -> Path:
    """Create the folder if needed and write (then remove) a probe file in it; raise OSError naming
    the folder and the cause when this process cannot write there."""
    folder = Path(path).expanduser()
    probe = folder / f".zebra-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to {folder.resolve()}: {e.strerror or e}") from None
    return folder


def mla_shape_limits(teacher_config) -> tuple[int, int]:
    """(largest kv_rank, largest qk_rope_dim) for an MLA layer converted from this teacher: its
    per-layer K+V width (kv heads x head_dim x 2) and K width. A larger latent than K+V stores
    nothing more; a larger RoPE key than K has no teacher dimensions to rotate."""
    per_layer = kv_values_per_token(teacher_config) // teacher_config.num_hidden_layers
    return per_layer, per_layer // 2


def check_convert_shape(teacher_config, mla_layers: list[int] | None, kv_rank: int, qk_rope_dim: int) -> None:
    """Raise UsageError naming the flag when the hybrid's shape does not fit the teacher."""
    n = teacher_config.num_hidden_layers
    out_of_range = [i for i in mla_layers or [] if i >= n]
    if out_of_range:
        raise UsageError(f"--mla-layers: {out_of_range} out of range for a teacher with {n} layers (valid 0..{n - 1})")
    max_kv_rank, max_rope = mla_shape_limits(teacher_config)
    if kv_rank > max_kv_rank:
        raise UsageError(f"--kv-rank {kv_rank} exceeds the teacher's per-layer K+V width {max_kv_rank}, "
                         f"the maximum (a wider latent caches more than the teacher does)")
    if qk_rope_dim > max_rope:
        raise UsageError(f"--qk-rope-dim {qk_rope_dim} exceeds the teacher's per-layer key width {max_rope}, "
                         f"the maximum (num_key_value_heads x head_dim)")


# ---- zebra convert --------------------------------------------------------------------------------

def calibration_ids(tokenizer, n_tokens: int, seq_len: int = CALIB_SEQ_LEN):
    """[max(1, n_tokens // seq_len), seq_len] tokens of the offline corpus (English text shipped with Python)."""
    from .data import iter_builtin_texts, pack, tokenize

    rows = itertools.islice(pack(tokenize(iter_builtin_texts(), tokenizer), seq_len), max(1, n_tokens // seq_len))
    return torch.tensor(list(rows), dtype=torch.long)


def run_convert(teacher: str, mla_layers: list[int] | None, kv_rank: int, qk_rope_dim: int, q_rank: int | None,
                out: str, calib_tokens: int = 2048, full_rank: bool = False) -> dict:
    """Convert the teacher into a hybrid saved at `out`; returns the report (per-layer init error, KV sizes).

    Everything that can be refused is refused before the teacher's weights load: an unwritable
    `out`, a teacher that cannot be found, and a shape that does not fit the teacher.
    """
    # loaded when converting, not for `zebra --help` (torch and transformers are loaded by `import zebra`)
    from .convert import convert, full_rank_mla_config, hybrid_config, layer_init_errors
    from .teacher import TeacherNotFound, load_teacher, teacher_folder

    try:
        check_writable_folder(out)
    except OSError as e:
        raise UsageError(f"--out {out}: {e}") from None
    try:
        teacher_config = AutoConfig.from_pretrained(teacher_folder(teacher))
    except (TeacherNotFound, OSError, ValueError) as e:
        raise UsageError(f"--teacher {teacher!r}: cannot load its config: {e}") from None
    if not full_rank:
        if mla_layers is None:
            raise UsageError("--mla-layers is required unless --full-rank is given")
        check_convert_shape(teacher_config, mla_layers, kv_rank, qk_rope_dim)
    model, tok = load_teacher(teacher)
    config = (full_rank_mla_config(model.config) if full_rank else
              hybrid_config(model.config, mla_layers, kv_rank=kv_rank, qk_rope_dim=qk_rope_dim, q_rank=q_rank))
    calib = calibration_ids(tok, calib_tokens)
    student = convert(model, config, calib_ids=calib)
    errors = layer_init_errors(model, student, calib)
    student.save_pretrained(out)
    tok.save_pretrained(out)
    return {
        "teacher": teacher,
        "out": str(out),
        "layers": [{"layer": i, "type": t, "init_error": e} for i, (t, e) in enumerate(zip(config.mixer_types, errors))],
        "teacher_kv_bytes_per_token": kv_bytes_per_token(model.config, torch.bfloat16),
        "student_kv_bytes_per_token": kv_bytes_per_token(config, torch.bfloat16),
        "kv_fraction": kv_fraction(config, model.config),
        "kv_dtype": "bfloat16",
    }


def format_convert_report(report: dict) -> str:
    lines = [f"{'layer':>5}  {'type':<5}  {'init rel. error':>15}"]
    lines += [f"{row['layer']:>5}  {row['type']:<5}  {row['init_error']:>15.4f}" for row in report["layers"]]
    lines += [
        f"teacher_kv_bytes_per_token: {report['teacher_kv_bytes_per_token']}",
        f"student_kv_bytes_per_token: {report['student_kv_bytes_per_token']}",
        f"kv_fraction: {report['kv_fraction']:.4f}",
        f"saved: {report['out']}",
    ]
    return "\n".join(lines)


def cmd_convert(args) -> int:
    if args.full_rank:
        given = [f for f in ("--mla-layers", "--kv-rank", "--qk-rope-dim", "--q-rank")
                 if getattr(args, f[2:].replace("-", "_")) is not None]
        if given:
            raise UsageError(f"--full-rank keeps every layer and dimension of the teacher; drop {', '.join(given)}")
    shape = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in CONVERT_DEFAULTS.items()}
    # stdout carries the report only: what libraries print while converting (DeepSpeed's accelerator
    # notice, loaded by transformers) goes to stderr, so `--json` output parses.
    with contextlib.redirect_stdout(sys.stderr):
        report = run_convert(teacher=args.teacher, mla_layers=args.mla_layers, q_rank=args.q_rank, out=args.out,
                             calib_tokens=args.calib_tokens, full_rank=args.full_rank, **shape)
    sys.stdout.write((json.dumps(report, indent=2) if args.json else format_convert_report(report)) + "\n")
    return 0


def add_convert(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("convert", help="compose a hybrid from a teacher with no training (no Ray)",
                       description="Compose an MLA + Mamba2 hybrid from a Llama teacher with no training and save "
                                   "it as a Hugging Face folder; prints each layer's init error and the KV sizes.")
    c.add_argument("--teacher", default="default", help="HF folder, .gguf file, hub id, or 'default' (SmolLM2)")
    c.add_argument("--mla-layers", type=layer_list, default=None, help="e.g. 0,14,29; the rest become Mamba2")
    c.add_argument("--kv-rank", type=positive_int, default=None,
                   help=f"width of the cached KV latent (default {CONVERT_DEFAULTS['kv_rank']})")
    c.add_argument("--qk-rope-dim", type=even_positive_int, default=None,
                   help=f"width of the cached RoPE key, even (default {CONVERT_DEFAULTS['qk_rope_dim']})")
    c.add_argument("--q-rank", type=positive_int, default=None, help="low-rank query width (default: full rank)")
    c.add_argument("--full-rank", action="store_true", help="all layers MLA, no truncation (reproduces the teacher)")
    c.add_argument("--calib-tokens", type=positive_int, default=2048,
                   help=f"calibration tokens for init and init errors (whole sequences of {CALIB_SEQ_LEN}, at least one)")
    c.add_argument("--out", required=True, help="folder to save the hybrid in (created; must be writable)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(fn=cmd_convert)
    return c


# ---- the command --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """`convert` plus every subcommand registered in the "zebra.commands" entry-point group."""
    parser = argparse.ArgumentParser(prog="zebra", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_convert(sub)
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if ep.name in sub.choices:
            raise RuntimeError(f"entry point {ep.name} = {ep.value} ({COMMANDS_GROUP}): zebra {ep.name} exists already")
        ep.load()(sub)
        if ep.name not in sub.choices:
            raise RuntimeError(f"entry point {ep.name} = {ep.value} ({COMMANDS_GROUP}) added no subcommand {ep.name!r}")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("ZEBRA_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as e:
        parser.exit(2, f"zebra {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
