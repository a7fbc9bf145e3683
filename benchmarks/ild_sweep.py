"""How far ILD gets in a fixed number of steps, per learning rate: one decoder layer at a time.

ILD trains every student layer on its own input (the teacher's hidden state before that layer) against the
teacher's output of that layer and of its attention (jobs/stages/ild.py, zebra.losses.ild_loss); the layers
do not interact, so one layer trained alone on a CPU shows how the recipe's settings move the held-out ILD
loss. For each chosen layer and mixer kind (Mamba2 or MLA, initialised by zebra.convert as the init stage
does), the layer's mixer is trained for `--steps` steps of `--batch` sequences with each learning rate of
`--lrs` (AdamW, linear warmup then cosine to zero, gradient clipped to 1.0, as jobs.train does), on the same
batches in the same order, and its held-out ILD loss is measured on held-out sequences of the same corpus.
The first learning rate is the baseline; the table gives each one's held-out loss over the baseline's.

    python -m benchmarks.ild_sweep                       # the default teacher on the shared prose corpus
    python -m benchmarks.ild_sweep --tiny                # a random tiny Llama on random tokens: a smoke run

The steps here hold far fewer tokens than a GPU run's (4 x 512 against 16 x 2048): a larger batch takes a
larger rate, so a rate that wins here is, if anything, on the low side for the GPU spec.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from jobs.stages.ild import _layer_and_mixer
from jobs.train import lr_ratio
from zebra.convert import convert, hybrid_config
from zebra.losses import ild_loss

log = logging.getLogger("benchmarks.ild_sweep")


def layer_states(teacher, ids: Tensor, layers: list[int], batch: int = 8) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """For each layer i of `layers`: (its input, its output, its attention's output), each [n, seq, d_model],
    from the teacher on ids [n, seq] (the ILD targets of cluster.teacher.LocalTeacher.hidden_states)."""
    from cluster.teacher import LocalTeacher

    local = LocalTeacher(lambda: teacher, torch.device("cpu"))
    parts: dict[int, list[list[Tensor]]] = {i: [[], [], []] for i in layers}
    for s in range(0, len(ids), batch):
        hidden, mixers = local.hidden_states(ids[s:s + batch], mixers=True)
        for i in layers:
            for part, t in zip(parts[i], (hidden[i], hidden[i + 1], mixers[i])):
                part.append(t.float())
    return {i: tuple(torch.cat(p) for p in parts[i]) for i in layers}


def held_out_loss(layer, states: tuple[Tensor, Tensor, Tensor], batch: int = 8) -> float:
    """The ILD loss of one layer (token mean over the held-out sequences)."""
    x, out, mixer = states
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            pos = torch.arange(x.shape[1]).expand(len(x[s:s + batch]), -1)
            got, mixed = _layer_and_mixer(layer, x[s:s + batch], pos)
            total += float(ild_loss(got, out[s:s + batch], mixed, mixer[s:s + batch])) * len(x[s:s + batch])
    return total / len(x)


def train_layer(layer, states: tuple[Tensor, Tensor, Tensor], lr: float, steps: int, batch: int,
                warmup_frac: float = 0.02, seed: int = 0) -> list[float]:
    """Train the layer's mixer (only) as the ILD stage does; the training losses."""
    x, out, mixer = states
    params = [p for n, p in layer.named_parameters() if n.startswith("mixer.")]
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, round(warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_ratio(step, warmup, steps, 0.0))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    losses = []
    for step in range(steps):
        rows = order[torch.arange(step * batch, (step + 1) * batch) % len(x)]
        pos = torch.arange(x.shape[1]).expand(batch, -1)
        got, mixed = _layer_and_mixer(layer, x[rows], pos)
        loss = ild_loss(got, out[rows], mixed, mixer[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
    return losses


def corpus_ids(tokenizer, source: str, seq_len: int, n_train: int, n_held: int) -> tuple[Tensor, Tensor]:
    """Training sequences from the corpus's start and held-out ones from documents after them, packed."""
    from zebra.data import iter_texts, pack, tokenize

    need = (n_train + n_held) * seq_len
    texts, got = [], 0
    for text in iter_texts(source):
        texts.append(text)
        got += len(text) // 3  # ~3+ characters a token: enough text, tokenised below
        if got >= 2 * need:
            break
    seqs = list(pack(tokenize(texts, tokenizer), seq_len))
    if len(seqs) < n_train + n_held:
        raise ValueError(f"{source}: {len(seqs)} sequences of {seq_len} tokens, need {n_train + n_held}")
    ids = torch.tensor(seqs[: n_train + n_held])
    return ids[:n_train], ids[-n_held:]


def students(teacher, kinds: list[str], calib: Tensor, kv_rank: int, qk_rope_dim: int) -> dict[str, torch.nn.Module]:
    """The init stage's pure students of each kind ("mamba", "mla")."""
    n = teacher.config.num_hidden_layers
    out = {}
    for kind in kinds:
        mla = list(range(n)) if kind == "mla" else []
        cfg = hybrid_config(teacher.config, mla, kv_rank=kv_rank, qk_rope_dim=qk_rope_dim)
        out[kind] = convert(teacher, cfg, calib if kind == "mla" else None).float()
    return out


def run(teacher, train_ids: Tensor, held_ids: Tensor, layers: list[int], kinds: list[str], lrs: list[float],
        steps: int, batch: int, kv_rank: int, qk_rope_dim: int) -> list[dict]:
    t0 = time.perf_counter()
    train, held = layer_states(teacher, train_ids, layers), layer_states(teacher, held_ids, layers)
    log.info("teacher states of %d + %d sequences: %.1f s", len(train_ids), len(held_ids), time.perf_counter() - t0)
    rows = []
    for kind, student in students(teacher, kinds, train_ids[:8], kv_rank, qk_rope_dim).items():
        for i in layers:
            base = student.model.layers[i]
            row = {"kind": kind, "layer": i, "init": held_out_loss(base, held[i]), "lrs": {}}
            for lr in lrs:
                layer = copy.deepcopy(base)
                t = time.perf_counter()
                losses = train_layer(layer, train[i], lr, steps, batch)
                row["lrs"][lr] = {"held_out": held_out_loss(layer, held[i]), "train_last": sum(losses[-10:]) / 10,
                                  "seconds": time.perf_counter() - t}
                log.info("%s layer %d lr %g: held-out ILD loss %.4f -> %.4f (%.0f s)", kind, i, lr, row["init"],
                         row["lrs"][lr]["held_out"], row["lrs"][lr]["seconds"])
            rows.append(row)
    return rows


def table(rows: list[dict], lrs: list[float]) -> str:
    head = ["mixer", "layer", "init"] + [f"lr {lr:g}" for lr in lrs] + [f"lr {lr:g} / lr {lrs[0]:g}" for lr in lrs[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        got = [r["lrs"][lr]["held_out"] for lr in lrs]
        lines.append("| " + " | ".join([r["kind"], str(r["layer"]), f"{r['init']:.4f}", *(f"{g:.4f}" for g in got),
                                        *(f"{g / got[0]:.3f}" for g in got[1:])]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="default", help="teacher source (zebra.teacher), default SmolLM2-135M")
    p.add_argument("--corpus", default="$ZEBRA_DATA/corpus/prose-v1.jsonl.xz")
    p.add_argument("--tiny", action="store_true", help="a random tiny Llama on random tokens (smoke run)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: 3 15 27 (tiny: 1)")
    p.add_argument("--kinds", nargs="+", choices=["mamba", "mla"], default=["mamba", "mla"])
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 5e-4, 1e-3, 2e-3],
                   help="learning rates; the first is the baseline (the prose specs' ild.lr)")
    p.add_argument("--steps", type=int, default=None, help="default 150 (tiny: 4)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default 512 (tiny: 32)")
    p.add_argument("--train-seqs", type=int, default=None, help="default 128 (tiny: 8)")
    p.add_argument("--held-seqs", type=int, default=None, help="default 16 (tiny: 4)")
    p.add_argument("--kv-rank", type=int, default=128)
    p.add_argument("--qk-rope-dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/benchmarks/ild_sweep.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.tiny
    seq_len, steps = args.seq_len or (32 if tiny else 512), args.steps or (4 if tiny else 150)
    n_train, n_held = args.train_seqs or (8 if tiny else 128), args.held_seqs or (4 if tiny else 16)
    layers = args.layers or ([1] if tiny else [3, 15, 27])
    torch.manual_seed(0)
    if tiny:
        from benchmarks.decode import tiny_pair

        teacher = tiny_pair()[0].float()
        ids = torch.randint(0, teacher.config.vocab_size, (n_train + n_held, seq_len))
        train_ids, held_ids = ids[:n_train], ids[n_train:]
        kv_rank, rope = 16, 8
    else:
        from transformers import AutoTokenizer

        from zebra.data import data_root
        from zebra.teacher import load_teacher_model, teacher_folder

        folder = teacher_folder(args.teacher)
        teacher = load_teacher_model(folder, torch.float32)
        corpus = args.corpus.replace("$ZEBRA_DATA", str(data_root()))
        train_ids, held_ids = corpus_ids(AutoTokenizer.from_pretrained(folder), corpus, seq_len, n_train, n_held)
        kv_rank, rope = args.kv_rank, args.qk_rope_dim
    rows = run(teacher, train_ids, held_ids, layers, args.kinds, args.lrs, steps, args.batch, kv_rank, rope)
    report = {"teacher": "tiny" if tiny else args.teacher, "corpus": None if tiny else args.corpus, "steps": steps,
              "batch": args.batch, "seq_len": seq_len, "train_seqs": n_train, "held_seqs": n_held,
              "lrs": args.lrs, "rows": [{**r, "lrs": {str(k): v for k, v in r["lrs"].items()}} for r in rows],
              "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(rows, args.lrs))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
