"""SMART layer selection (Zebra-Llama, arXiv 2505.17272: Sensitivity Measure-Aware Replacement of
Transformer layers): which layers of the hybrid are MLA, the rest being Mamba2.

    scores = sensitivity_from_kl(kl_all_mamba, kl_per_layer)        # [num_layers], higher = MLA helps more
    n = num_mla_for_budget(0.05, teacher_kv_bytes, mla_layer_bytes, num_layers=30, min_layers=2)
    layers = select_mla_layers(scores, n)                           # e.g. [0, 10, 20]

The paper's recipe: score layer i by how much the KL divergence to the teacher drops when layer i of
the all-Mamba2 student (after ILD) is MLA instead, and place the MLA layers near-uniformly over
the depth, preferring high scores.

placement="near_uniform" (the default) is the shape of every official configuration ([0, 5, 10, 14]
of 16 layers for Llama-3.2-1B, [0, 4, 8, 12, 16, 20, 25, 30] of 32 for Llama-3.1-8B): layer 0 first,
then gaps of floor(D / (N - 1)) or ceil(D / (N - 1)) layers, D = last - first. We add one rule the
official lists also obey, so that a placement spans the depth rather than bunching at the start:
the layers after the last MLA layer are fewer than the smallest gap (num_layers - 1 - last <
floor(D / (N - 1))). Among all placements of that shape the one with the largest summed score
is chosen, exactly (a dynamic program per last layer over the gap sequences).

placement="spaced" is the older, looser rule: a minimum distance between chosen layers
(min_spacing), optionally pinning the first and last layers (keep_terminal), maximising the summed
score exactly. Its choices such as [0, 21, 29] are far from uniform.
- A min_spacing that no choice of num_mla layers can satisfy is relaxed to the largest one that
  can ((num_layers - 1) // (num_mla - 1)), with a warning; this equals lowering it by one until a
  choice exists, because feasibility depends only on the spacing.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

PLACEMENTS = ("near_uniform", "spaced")


def sensitivity_from_kl(kl_all_mamba: float, kl_with_layer_i_mla: Sequence[float]) -> list[float]:
    """Score per layer: KL(teacher || all-Mamba2 student) minus the KL with only layer i made MLA.

    kl_with_layer_i_mla: [num_layers] KL divergences (nats per token, same data as kl_all_mamba).
    A positive score means making layer i MLA brings the student closer to the teacher.
    """
    values = [kl_all_mamba, *kl_with_layer_i_mla]
    bad = [i - 1 for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        where = "kl_all_mamba" if bad[0] < 0 else f"kl_with_layer_i_mla[{bad[0]}]"
        raise ValueError(f"{where} is not finite ({values[bad[0] + 1]!r}); KL values must be finite numbers")
    return [kl_all_mamba - kl for kl in kl_with_layer_i_mla]


def default_min_spacing(num_layers: int, num_mla: int) -> int:
    """max(1, num_layers // (2 * num_mla)): half the uniform gap, leaving room to follow the scores.

    Always feasible: (num_mla - 1) * spacing <= num_layers / 2 <= num_layers - 1.
    """
    return max(1, num_layers // (2 * max(num_mla, 1)))


def max_feasible_spacing(num_layers: int, num_mla: int) -> int:
    """Largest spacing at which num_mla layers fit in [0, num_layers): (num_mla - 1) * d <= num_layers - 1."""
    return num_layers if num_mla <= 1 else (num_layers - 1) // (num_mla - 1)


def select_mla_layers(
    scores: Sequence[float],
    num_mla: int,
    keep_terminal: bool = True,
    min_spacing: int | None = None,
    placement: str = "near_uniform",
) -> list[int]:
    """Sorted indices of the num_mla layers to make MLA.

    scores: [num_layers] sensitivity per layer (higher = more benefit from MLA over Mamba2).
    placement: "near_uniform" (official shape, see the module docstring; keep_terminal and
    min_spacing do not apply) or "spaced":
      keep_terminal: with num_mla >= 2, layers 0 and num_layers - 1 are always chosen.
      min_spacing: least index distance between two chosen layers (1 allows neighbours); None uses
      default_min_spacing.
    Among all choices meeting the constraints the one with the largest summed score is returned;
    ties go to earlier layers.
    """
    num_layers = len(scores)
    _check_selection_args(scores, num_mla)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if num_mla == 0:
        return []
    if placement == "near_uniform":
        return _best_near_uniform(scores, num_mla)
    spacing = default_min_spacing(num_layers, num_mla) if min_spacing is None else min_spacing
    if spacing < 1:
        raise ValueError(f"min_spacing must be >= 1, got {spacing}")
    feasible = max_feasible_spacing(num_layers, num_mla)
    if spacing > feasible:
        log.warning("min_spacing %d leaves no room for %d MLA layers in %d; relaxed to %d",
                    spacing, num_mla, num_layers, feasible)
        spacing = feasible
    return _best_spaced_subset(scores, num_mla, spacing, keep_terminal and num_mla >= 2)


def near_uniform_gaps(last: int, num_mla: int) -> tuple[int, ...]:
    """The gaps allowed between consecutive MLA layers of a near-uniform placement ending at `last`:
    floor and ceil of last / (num_mla - 1) (one value when it divides)."""
    small, rest = divmod(last, num_mla - 1)
    return (small,) if rest == 0 else (small, small + 1)


def near_uniform_lasts(num_layers: int, num_mla: int) -> list[int]:
    """The possible last MLA layers of a near-uniform placement (num_mla >= 2): those whose tail
    num_layers - 1 - last is shorter than the smallest gap."""
    return [last for last in range(num_mla - 1, num_layers)
            if num_layers - 1 - last < near_uniform_gaps(last, num_mla)[0]]


def is_near_uniform(layers: Sequence[int], num_layers: int) -> bool:
    """Whether sorted `layers` obey the near-uniform rule in a model of num_layers layers."""
    if not layers or layers[0] != 0 or layers[-1] >= num_layers:
        return False
    if len(layers) == 1:
        return True
    gaps = near_uniform_gaps(layers[-1], len(layers))
    steps = [b - a for a, b in zip(layers, layers[1:])]
    return all(g in gaps for g in steps) and num_layers - 1 - layers[-1] < gaps[0]


def near_uniform_placements(num_layers: int, num_mla: int) -> Iterator[list[int]]:
    """Every near-uniform placement of num_mla layers (for inspection and tests; the selection
    does not enumerate them)."""
    if num_mla == 1:
        yield [0]
        return
    for last in near_uniform_lasts(num_layers, num_mla):
        gaps = near_uniform_gaps(last, num_mla)
        big = last - gaps[0] * (num_mla - 1)  # how many gaps take the larger value
        for where in itertools.combinations(range(num_mla - 1), big):
            steps = [gaps[-1] if j in where else gaps[0] for j in range(num_mla - 1)]
            yield list(itertools.accumulate(steps, initial=0))


def _best_near_uniform(scores: Sequence[float], num_mla: int) -> list[int]:
    """Max-sum near-uniform placement. For each possible last layer, best[p] holds the best sum of a
    path 0 -> p in the steps taken so far, with every step one of the allowed gaps. O(L^2 * N)."""
    if num_mla == 1:
        return [0]
    best_sum, best_path = -math.inf, None
    for last in near_uniform_lasts(len(scores), num_mla):
        gaps = near_uniform_gaps(last, num_mla)
        paths = {0: (scores[0], [0])}
        for _ in range(num_mla - 1):
            step: dict[int, tuple[float, list[int]]] = {}
            for p, (total, path) in sorted(paths.items()):
                for g in gaps:
                    q = p + g
                    if q <= last and (q not in step or total + scores[q] > step[q][0]):
                        step[q] = (total + scores[q], path + [q])
            paths = step
        if last in paths and paths[last][0] > best_sum:
            best_sum, best_path = paths[last]
    return best_path


def _check_selection_args(scores: Sequence[float], num_mla: int) -> None:
    if not 0 <= num_mla <= len(scores):
        raise ValueError(f"num_mla must lie in [0, {len(scores)}] (the number of layers), got {num_mla}")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"scores[{bad[0]}] is not finite ({scores[bad[0]]!r})")


def _best_spaced_subset(scores: Sequence[float], k: int, spacing: int, pin_ends: bool) -> list[int]:
    """Max-sum choice of k indices, consecutive ones >= spacing apart (pin_ends: first 0, last L-1).

    best[i] holds, for the current count j, the best sum of j picks whose last pick is i; a running
    prefix maximum over best[: i - spacing + 1] gives the best place for the previous pick. O(k * L).
    """
    n, neg = len(scores), -math.inf
    best = [s if (not pin_ends or i == 0) else neg for i, s in enumerate(scores)]
    parents: list[list[int]] = []
    for _ in range(k - 1):
        prev, best, parent = best, [neg] * n, [-1] * n
        run_val, run_arg = neg, -1
        for i in range(spacing, n):
            if prev[i - spacing] > run_val:
                run_val, run_arg = prev[i - spacing], i - spacing
            if run_arg >= 0 and run_val > neg:
                best[i], parent[i] = run_val + scores[i], run_arg
        parents.append(parent)
    last = n - 1 if pin_ends else max(range(n), key=lambda i: (best[i], -i))
    chosen = [last]
    for parent in reversed(parents):
        chosen.append(parent[chosen[-1]])
    return sorted(chosen)


def num_mla_for_budget(
    kv_budget: float,
    teacher_kv_bytes: int,
    per_mla_layer_bytes: int,
    *,
    num_layers: int | None = None,
    min_layers: int = 1,
) -> int:
    """Largest number of MLA layers whose KV cache fits the budget (Mamba2 layers cache nothing per token).

    kv_budget: bytes per token of context, or, when <= 1, a fraction of teacher_kv_bytes (0.05 = 5%).
    teacher_kv_bytes, per_mla_layer_bytes: bytes per token of context (zebra.kv, same dtype).
    num_layers caps the count; min_layers is the least usable count (2 when terminal layers are kept).
    Raises ValueError naming the budget and the smallest achievable cache when min_layers do not fit.
    """
    if kv_budget <= 0 or per_mla_layer_bytes <= 0 or teacher_kv_bytes <= 0:
        raise ValueError(f"kv_budget ({kv_budget}), teacher_kv_bytes ({teacher_kv_bytes}) and "
                         f"per_mla_layer_bytes ({per_mla_layer_bytes}) must be positive")
    budget = kv_budget * teacher_kv_bytes if kv_budget <= 1 else kv_budget
    count = int(budget // per_mla_layer_bytes)
    if num_layers is not None:
        count = min(count, num_layers)
    if count < min_layers:
        smallest = min_layers * per_mla_layer_bytes
        raise ValueError(
            f"kv_budget {kv_budget} = {budget:.0f} bytes/token fits {count} MLA layer(s) of {per_mla_layer_bytes} "
            f"bytes/token; the smallest achievable is {min_layers} layer(s) = {smallest} bytes/token "
            f"({smallest / teacher_kv_bytes:.2%} of the teacher's {teacher_kv_bytes})"
        )
    return count
