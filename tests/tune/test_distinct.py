"""tune.distinct.DistinctArms around the real Optuna and HyperOpt searchers (no Ray cluster: the
searcher protocol driven directly, as Tune's SearchGenerator would)."""
import pytest
from ray import tune
from ray.tune.search import Searcher

from tune.distinct import DistinctArms

ARMS = [f"arm{i}" for i in range(6)]


def _searcher(kind: str, seed: int) -> Searcher:
    if kind == "optuna":
        pytest.importorskip("optuna")
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    pytest.importorskip("hyperopt")
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=seed)


def _wrapped(kind: str, seed: int = 0) -> DistinctArms:
    searcher = DistinctArms(_searcher(kind, seed), ARMS, seed=seed)
    assert searcher.set_search_properties("kl", "min", {"arm": tune.choice(ARMS)})
    return searcher


def _run(searcher: DistinctArms, first: int, last: int, kl) -> list[str]:
    """Trials first..last-1 one after another: suggest, one intermediate result, complete (results as
    Tune reports them, with training_iteration)."""
    arms = []
    for i in range(first, last):
        config = searcher.suggest(f"t{i}")
        arm = config["arm"]
        searcher.on_trial_result(f"t{i}", {"kl": kl(arm) + 1.0, "step": 1, "training_iteration": 1})
        searcher.on_trial_complete(f"t{i}", {"kl": kl(arm), "step": 2, "training_iteration": 2})
        arms.append(arm)
    return arms


@pytest.mark.parametrize("kind", ["optuna", "hyperopt"])
def test_every_arm_once_then_finished(kind):
    searcher = _wrapped(kind)
    arms = _run(searcher, 0, len(ARMS), kl=lambda a: float(ARMS.index(a)))
    assert sorted(arms) == sorted(ARMS)  # 6 samples of 6 arms: no repeat
    assert searcher.suggest("t-extra") == Searcher.FINISHED


def test_the_bare_searcher_repeats_arms():
    """The reason for the wrapper: Optuna alone proposes an arm again within a few samples."""
    bare = _searcher("optuna", 0)
    bare.set_search_properties("kl", "min", {"arm": tune.choice(ARMS)})
    seen = []
    for i in range(len(ARMS)):
        arm = bare.suggest(f"t{i}")["arm"]
        bare.on_trial_complete(f"t{i}", {"kl": float(ARMS.index(arm))})
        seen.append(arm)
    assert len(set(seen)) < len(seen)


def test_concurrent_trials_get_distinct_arms():
    """Suggestions while earlier trials still run (no result yet): still distinct."""
    searcher = _wrapped("optuna", seed=3)
    arms = [searcher.suggest(f"t{i}")["arm"] for i in range(4)]
    assert len(set(arms)) == 4


def test_restore_keeps_the_launched_arms(tmp_path):
    kl = lambda a: float(ARMS.index(a))  # noqa: E731
    first = _wrapped("optuna")
    before = _run(first, 0, 3, kl)
    # what Tune's SearchGenerator saves and restores: the wrapper's state and the inner searcher's checkpoint
    state, path = first.get_state(), str(tmp_path / "searcher.pkl")
    first.searcher.save(path)
    second = DistinctArms(_searcher("optuna", 0), ARMS)  # a fresh process's searcher, as Tuner.restore builds
    second.set_state(state)
    second.searcher.restore(path)
    after = _run(second, 3, len(ARMS), kl)
    assert sorted(before + after) == sorted(ARMS)
    assert second.suggest("t-extra") == Searcher.FINISHED
