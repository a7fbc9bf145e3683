"""SMART selection against a brute-force reference, plus the constraints one by one."""
import itertools
import logging
import math
import random

import pytest

from zebra.smart import (default_min_spacing, is_near_uniform, near_uniform_placements, num_mla_for_budget,
                         select_mla_layers, sensitivity_from_kl)


def brute_force(scores, k, spacing, pin_ends):
    """Every k-subset meeting the constraints; the max-sum one (earliest on ties, as select_mla_layers)."""
    best, best_sum = None, None
    for combo in itertools.combinations(range(len(scores)), k):
        if pin_ends and (combo[0] != 0 or combo[-1] != len(scores) - 1):
            continue
        if any(b - a < spacing for a, b in zip(combo, combo[1:])):
            continue
        total = sum(scores[i] for i in combo)
        if best_sum is None or total > best_sum + 1e-12:
            best, best_sum = list(combo), total
    return best, best_sum


@pytest.mark.parametrize("trial", range(40))
def test_matches_brute_force(trial):
    rng = random.Random(trial)
    n = rng.randint(2, 13)
    k = rng.randint(1, min(n, 5))
    spacing = rng.randint(1, max(1, (n - 1) // max(k - 1, 1)))
    keep = rng.random() < 0.5
    scores = [rng.gauss(0, 1) for _ in range(n)]
    got = select_mla_layers(scores, k, keep_terminal=keep, min_spacing=spacing, placement="spaced")
    want, want_sum = brute_force(scores, k, spacing, keep and k >= 2)
    print(f"n={n} k={k} d={spacing} keep={keep} got={got} want={want}")
    assert sum(scores[i] for i in got) == pytest.approx(want_sum)
    assert got == want


def test_terminal_layers_kept_and_count_met():
    scores = [random.Random(1).random() for _ in range(30)]
    scores[0] = scores[29] = -100.0  # terminal layers are chosen even when they score worst
    got = select_mla_layers(scores, 4, placement="spaced")
    assert len(got) == 4 and got[0] == 0 and got[-1] == 29


def test_without_keep_terminal_follows_scores():
    scores = [0.0] * 30
    for i in (3, 11, 19):
        scores[i] = 1.0
    assert select_mla_layers(scores, 3, keep_terminal=False, placement="spaced") == [3, 11, 19]


def test_highest_scores_preferred():
    scores = [0.0] * 30
    scores[12], scores[13], scores[20] = 5.0, 4.0, 3.0  # 13 sits too close to 12 under spacing 3
    assert select_mla_layers(scores, 4, min_spacing=3, placement="spaced") == [0, 12, 20, 29]
    assert select_mla_layers(scores, 4, min_spacing=1, placement="spaced") == [0, 12, 13, 29]


@pytest.mark.parametrize("n,k", [(30, 3), (16, 4), (32, 8), (28, 6), (7, 7), (5, 1)])
def test_default_spacing_respected(n, k):
    scores = [random.Random(n * k).random() for _ in range(n)]
    got = select_mla_layers(scores, k, placement="spaced")
    spacing = default_min_spacing(n, k)
    assert got == sorted(set(got)) and len(got) == k
    assert all(b - a >= spacing for a, b in zip(got, got[1:])), (got, spacing)


def test_greedy_trap_avoided():
    # Greedy would take layer 7 first and leave no room; at spacing 5 only [0, 5, 10, 15] fits.
    scores = [0.0] * 16
    scores[7] = 10.0
    assert select_mla_layers(scores, 4, min_spacing=5, placement="spaced") == [0, 5, 10, 15]


def test_infeasible_spacing_relaxes(caplog):
    with caplog.at_level(logging.WARNING, logger="zebra.smart"):
        got = select_mla_layers([0.0] * 10, 4, min_spacing=5, placement="spaced")
    assert got == [0, 3, 6, 9]  # relaxed to (10 - 1) // 3 = 3, the largest that fits
    assert "relaxed to 3" in caplog.text


def test_edge_counts_and_bad_inputs():
    assert select_mla_layers([1.0, 2.0], 0) == []
    assert select_mla_layers([1.0, 2.0, 3.0], 3) == [0, 1, 2]
    assert select_mla_layers([1.0, 5.0, 3.0], 1, placement="spaced") == [1]
    assert select_mla_layers([1.0, 5.0, 3.0], 1) == [0]  # near-uniform: layer 0 first, always
    with pytest.raises(ValueError, match="num_mla"):
        select_mla_layers([1.0, 2.0], 3)
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        select_mla_layers([1.0, float("nan")], 1)
    with pytest.raises(ValueError, match="placement"):
        select_mla_layers([1.0, 2.0], 1, placement="uniform")


def obeys_spacing_rule(layers, num_layers):
    """The official shape, spelled out: layer 0 first; every gap floor or ceil of (last - first) / (N - 1);
    fewer layers after the last MLA layer than the smallest gap."""
    if layers[0] != 0:
        return False
    if len(layers) == 1:
        return True
    span = (layers[-1] - layers[0]) / (len(layers) - 1)
    gaps = [b - a for a, b in zip(layers, layers[1:])]
    return (all(g in (math.floor(span), math.ceil(span)) for g in gaps)
            and num_layers - 1 - layers[-1] < math.floor(span))


def near_uniform_brute_force(scores, k):
    """Every k-subset obeying the rule; the max-sum one."""
    valid = [list(c) for c in itertools.combinations(range(len(scores)), k) if obeys_spacing_rule(c, len(scores))]
    return valid, max(valid, key=lambda c: sum(scores[i] for i in c))


@pytest.mark.parametrize("n,k,want", [(16, 4, [0, 5, 10, 14]), (32, 8, [0, 4, 8, 12, 16, 20, 25, 30])])
def test_official_configurations_are_near_uniform_and_chosen_when_scored_best(n, k, want):
    assert obeys_spacing_rule(want, n) and is_near_uniform(want, n) and want in list(near_uniform_placements(n, k))
    scores = [1.0 if i in want else 0.0 for i in range(n)]
    assert select_mla_layers(scores, k) == want


@pytest.mark.parametrize("trial", range(30))
def test_near_uniform_matches_brute_force(trial):
    rng = random.Random(100 + trial)
    n = rng.randint(1, 14)
    k = rng.randint(1, min(n, 5))
    scores = [rng.gauss(0, 1) for _ in range(n)]
    valid, want = near_uniform_brute_force(scores, k)
    got = select_mla_layers(scores, k)
    print(f"n={n} k={k} got={got} want={want} of {len(valid)} placements")
    assert sorted(near_uniform_placements(n, k)) == valid
    assert got == want and obeys_spacing_rule(got, n)


@pytest.mark.parametrize("n,k", [(30, 2), (30, 3), (30, 4), (16, 4), (32, 8), (28, 6), (64, 16), (7, 7)])
def test_near_uniform_placements_obey_the_spacing_rule(n, k):
    scores = [random.Random(n * k).gauss(0, 1) for _ in range(n)]
    got = select_mla_layers(scores, k)
    print(f"{n} layers, {k} MLA: {got}")
    assert len(got) == k and got == sorted(set(got)) and obeys_spacing_rule(got, n)
    assert not is_near_uniform([0, 21, 29], 30)  # the old spaced choice the issue reports


def test_near_uniform_follows_scores_within_the_rule():
    scores = [0.0] * 30
    scores[21] = 5.0  # a spike: the best near-uniform placement through layer 21 of 30
    got = select_mla_layers(scores, 3)
    assert 21 in got and obeys_spacing_rule(got, 30)
    assert select_mla_layers([0.0] * 30, 3) == [0, 10, 20]  # ties: earliest, i.e. uniform blocks


def test_budget_to_count():
    teacher, per = 23040, 320  # SmolLM2 in bf16: 30 x 2 x 3 x 64 values x 2 bytes; one MLA layer (128 + 32) x 2
    assert num_mla_for_budget(0.05, teacher, per) == 3  # 1152 bytes
    assert num_mla_for_budget(960, teacher, per) == 3
    assert num_mla_for_budget(959, teacher, per) == 2
    assert num_mla_for_budget(1.0, teacher, per, num_layers=30) == 30  # capped by the layer count
    assert num_mla_for_budget(400, teacher, per, min_layers=1) == 1
    with pytest.raises(ValueError, match=r"kv_budget 400.*smallest achievable is 2 layer\(s\) = 640"):
        num_mla_for_budget(400, teacher, per, min_layers=2)


def test_sensitivity_from_kl():
    assert sensitivity_from_kl(2.0, [1.5, 2.5, 2.0]) == [0.5, -0.5, 0.0]
    with pytest.raises(ValueError, match=r"kl_with_layer_i_mla\[1\]"):
        sensitivity_from_kl(2.0, [1.0, float("inf")])
