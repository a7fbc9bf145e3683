"""The outputs of `zebra tune`: the Pareto front of KV cache against quality, as a Markdown table and
a PNG, and the best arm written out as a job spec for the full pipeline.

A row is one trial as search.py collects it: {"trial_id", "key", "num_mla", "kv_rank", "q_rank",
"qk_rope_dim", "kv_bytes_per_token", "kv_fraction", "mla_layers", "kl", "ppl", "step",
"stopped_early", "status"}; kl is None for a trial that errored before reporting.
"""
from __future__ import annotations

import io

import yaml

from jobs.spec import JobSpec, load_spec

COLUMNS = ("KV fraction", "KV bytes/token", "MLA layers (which)", "kv_rank", "q_rank", "qk_rope_dim", "held-out KL",
           "perplexity", "steps")


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both KV fraction and KL (lower is better on each), by KV fraction.

    Of rows equal on both, the first is kept. Rows without a KL are left out.
    """
    front, best_kl = [], float("inf")
    for row in sorted((r for r in rows if r["kl"] is not None), key=lambda r: (r["kv_fraction"], r["kl"])):
        if row["kl"] < best_kl:
            front.append(row)
            best_kl = row["kl"]
    return front


def best_row(rows: list[dict]) -> dict | None:
    """The lowest KL; a tie goes to the smaller KV cache."""
    scored = [r for r in rows if r["kl"] is not None]
    return min(scored, key=lambda r: (r["kl"], r["kv_bytes_per_token"])) if scored else None


def pareto_table(rows: list[dict], summary: dict) -> str:
    """Markdown: the budget, how many configurations were rejected and tried, and the front."""
    front, best = pareto_front(rows), best_row(rows)
    lines = [
        f"# Tune: {summary['name']}",
        "",
        f"- KV budget: {summary['budget']}",
        (f"- configurations in the search space: {summary['configurations']}; over the KV budget (never "
         f"launched): {summary['rejected']}"),
        (f"- trials: {len(rows)} ({sum(r['stopped_early'] for r in rows)} stopped early by ASHA, "
         f"{sum(r['status'] != 'ok' for r in rows)} failed); each trial: {summary['steps']} KD steps"),
        f"- best (lowest held-out KL): {best['key'] if best else 'none'}",
        *_timing(summary),
        "",
        "## Pareto front: KV cache against held-out KL (no trial is better on both)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---:|" * len(COLUMNS),
    ]
    lines += [_table_row(r) for r in front]
    return "\n".join(lines) + "\n"


def _timing(summary: dict) -> list[str]:
    if summary.get("search_s") is None:
        return []
    rate = summary.get("trials_per_hour")
    return [f"- wall time: shared init/ILD/SMART {summary['shared_s']:.0f} s, trials {summary['search_s']:.0f} s"
            + (f" ({rate:.0f} trials/hour)" if rate else "")]


def _table_row(r: dict) -> str:
    steps = f"{r['step']} (stopped early)" if r["stopped_early"] else str(r["step"])
    cells = [f"{r['kv_fraction']:.2%}", str(r["kv_bytes_per_token"]), f"{r['num_mla']} ({r['mla_layers']})",
             str(r["kv_rank"]), str(r["q_rank"] or "full"), str(r["qk_rope_dim"]), f"{r['kl']:.4f}", f"{r['ppl']:.2f}",
             steps]
    return "| " + " | ".join(cells) + " |"


def pareto_plot(rows: list[dict], budget_fraction: float | None) -> bytes:
    """PNG: every trial (KV fraction, KL), early-stopped ones hollow, the front as a step line, the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stopped, style in ((False, {"color": "tab:blue"}), (True, {"facecolors": "none", "edgecolors": "tab:gray"})):
        pts = [r for r in rows if r["kl"] is not None and r["stopped_early"] == stopped]
        ax.scatter([100 * r["kv_fraction"] for r in pts], [r["kl"] for r in pts], s=36, **style,
                   label="stopped early (KL when stopped)" if stopped else "ran all steps")
    front = pareto_front(rows)
    ax.step([100 * r["kv_fraction"] for r in front], [r["kl"] for r in front], where="post", color="tab:red",
            label="Pareto front")
    for r in front:
        ax.annotate(r["key"], (100 * r["kv_fraction"], r["kl"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if budget_fraction is not None:
        ax.axvline(100 * budget_fraction, color="black", linestyle="--", linewidth=1, label="KV budget")
    ax.set_xlabel("KV cache, % of the teacher's bytes per token")
    ax.set_ylabel("held-out KL(teacher || hybrid), nats/token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)
    return out.getvalue()


def best_spec(spec: JobSpec, row: dict) -> JobSpec:
    """The input spec for a full run of the best arm: its ranks and MLA layer count in the student
    section (SMART chooses the layers again on the run's own ILD students), no tune section, the
    name <name>-best and storage <storage>/best."""
    data = spec.model_dump(mode="json", exclude={"tune"})
    data["name"] = f"{spec.name}-best"
    data["storage"]["uri"] = f"{spec.storage.uri.rstrip('/')}/best"
    data["student"].update(kv_rank=row["kv_rank"], q_rank=row["q_rank"], qk_rope_dim=row["qk_rope_dim"],
                           num_mla_layers=row["num_mla"], mla_layers=None, kv_budget=None)
    return load_spec(data, source=spec.source)


def best_spec_yaml(spec: JobSpec, row: dict) -> str:
    """best_spec as YAML, headed by what the search measured."""
    head = (f"# The best configuration of `zebra tune {spec.source or ''}`: {row['key']} (trial {row['trial_id']}),\n"
            f"# held-out KL {row['kl']:.4f}, perplexity {row['ppl']:.2f}, KV {row['kv_fraction']:.2%} of the "
            f"teacher's, MLA layers {row['mla_layers']} in the search.\n"
            "# Run it: python -m jobs.run <this file> (relative paths are relative to the working directory).\n")
    return head + yaml.safe_dump(best_spec(spec, row).model_dump(mode="json"), sort_keys=False)
