"""report.md of a run, with PNG plots: stages (wall time, tokens), KV cache, init errors, ILD/KD/DPO
loss curves, SMART scores, DPO held-out preference metrics, eval table. Built from the stages' typed
outputs (jobs.outputs) alone, so a rerun rewrites it without redoing work."""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jobs.outputs import StageOutput  # noqa: E402

log = logging.getLogger(__name__)


def write_report(name: str, infos: dict[str, StageOutput], out_dir: Path) -> Path:
    """Write out_dir/report.md and its PNGs from the outputs by stage name; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# Zebra run `{name}`\n", _stages(infos), _kv(infos), _init_errors(infos), _ild(infos),
             _plot_curves(infos, out_dir), _plot_smart(infos, out_dir), _kd(infos), _dpo(infos), _eval(infos)]
    path = out_dir / "report.md"
    path.write_text("\n".join(p for p in parts if p))
    log.info("report: %s", path)
    return path


def _stages(infos: dict) -> str:
    rows = ["## Stages\n", "| stage | wall time (s) | tokens | training tokens/s | peak GPU GiB | restarts |",
            "|---|---:|---:|---:|---:|---|"]
    for s, i in infos.items():
        history = getattr(i, "history", [])
        rows.append(f"| {s} | {i.wall_s:.1f} | {i.tokens:,} | {_speed(history)} | "
                    f"{_peak(history)} | {_restarts(history)} |")
    return "\n".join(rows) + "\n"


def _speed(history: list[dict]) -> str:
    """Median training tokens/s over a stage's reports after the first (which pays for start-up)."""
    speeds = sorted(h["tokens_per_s"] for h in history[1:] if "tokens_per_s" in h)
    return f"{speeds[len(speeds) // 2]:,.0f}" if speeds else "-"


def _peak(history: list[dict]) -> str:
    peaks = [h["peak_gpu_gib"] for h in history if "peak_gpu_gib" in h]
    return f"{max(peaks):.2f}" if peaks else "-"


def _restarts(history: list[dict]) -> str:
    """The checkpoint steps a training stage's worker groups restarted from ("none" without a restart)."""
    starts = sorted({h["resumed_from"] for h in history if h.get("resumed_from")})
    return ", ".join(f"from step {s}" for s in starts) or "none"


def _kv(infos: dict) -> str:
    if "init" not in infos or "export" not in infos:
        return ""
    teacher = infos["init"].kv_bytes_per_token["teacher"]
    student = infos["export"].kv_bytes_per_token
    return (f"## KV cache (bf16)\n\nteacher {teacher:,} bytes/token, hybrid {student:,} bytes/token: "
            f"fraction {student / teacher:.4f}\n")


def _init_errors(infos: dict) -> str:
    if "init" not in infos:
        return ""
    errs = infos["init"].init_errors
    rows = ["## Init error per layer (relative, before ILD)\n", "| layer | MLA | Mamba2 |", "|---:|---:|---:|"]
    rows += [f"| {i} | {a:.4f} | {b:.4f} |" for i, (a, b) in enumerate(zip(errs["mla"], errs["mamba"]))]
    return "\n".join(rows) + "\n"


def _ild(infos: dict) -> str:
    if "ild" not in infos:
        return ""
    i = infos["ild"]
    return "## ILD held-out loss (official ILD loss, summed over layers)\n\n" + "\n".join(
        f"- {k}: {i.loss_before[k]:.5f} -> {i.loss_after[k]:.5f}" for k in i.loss_before) + "\n"


def _kd(infos: dict) -> str:
    if "kd" not in infos:
        return ""
    i = infos["kd"]
    text = f"## KD\n\nMLA layers {i.mla_layers}; held-out KL(teacher || hybrid) {i.kl_before:.4f} -> {i.kl_after:.4f}\n"
    if i.ppl_after is not None:
        text += (f"\nHeld-out perplexity: hybrid {i.ppl_before:.2f} -> {i.ppl_after:.2f}, teacher {i.ppl_teacher:.2f} "
                 f"({i.ppl_after / i.ppl_teacher:.2f}x the teacher's)\n")
    return text


DPO_METRICS = {
    "pref_accuracy": "preference accuracy: log p(chosen) > log p(rejected)",
    "logp_margin": "mean log p(chosen) - log p(rejected)",
    "reward_margin": "mean implicit reward margin (0 for the reference itself)",
    "reward_accuracy": "fraction with a positive reward margin",
}


def _dpo(infos: dict) -> str:
    if "dpo" not in infos:
        return ""
    i = infos["dpo"]
    rows = [f"## DPO\n\n{i.pairs:,} training pairs; {i.held_out_pairs} held-out pairs, before -> after:\n",
            "| metric | before | after |", "|---|---:|---:|"]
    rows += [f"| {label} | {i.before[k]:.4f} | {i.after[k]:.4f} |" for k, label in DPO_METRICS.items()]
    return "\n".join(rows) + "\n"


def _plot_curves(infos: dict, out_dir: Path) -> str:
    stages = [s for s in ("ild", "kd", "dpo") if s in infos and infos[s].history]
    if not stages:
        return ""
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, s in zip(axes[0], stages):
        hist = infos[s].history
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], marker=".")
        ax.set(title=f"{s} training loss", xlabel="optimizer step", ylabel="loss")
    fig.tight_layout()
    fig.savefig(out_dir / "losses.png", dpi=100)
    plt.close(fig)
    return "## Loss curves\n\n![losses](losses.png)\n"


def _plot_smart(infos: dict, out_dir: Path) -> str:
    if "smart" not in infos:
        return ""
    scores, chosen = infos["smart"].scores, set(infos["smart"].mla_layers)
    if scores is None:  # smart disabled: the spec gave the layers
        return f"## SMART\n\nMLA layers: {sorted(chosen)} (given by student.mla_layers; not scored)\n"
    fig, ax = plt.subplots(figsize=(max(5, len(scores) * 0.3), 3.5))
    ax.bar(range(len(scores)), scores, color=["tab:red" if i in chosen else "tab:gray" for i in range(len(scores))])
    ax.set(title="SMART: KL(all Mamba2) - KL(layer i MLA); red = chosen", xlabel="layer", ylabel="nats/token")
    fig.tight_layout()
    fig.savefig(out_dir / "smart_scores.png", dpi=100)
    plt.close(fig)
    return f"## SMART\n\nMLA layers: {sorted(chosen)}\n\n![smart scores](smart_scores.png)\n"


def _eval(infos: dict) -> str:
    rows = infos["eval"].rows if "eval" in infos else None
    if not rows:
        return ""
    from serve.eval import markdown_table  # here: lm-eval is a heavy import

    return "## Eval\n\n" + markdown_table(rows)
