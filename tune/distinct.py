"""A Ray Tune searcher wrapper that never launches the same arm twice.

Optuna and HyperOpt sample the categorical "arm" with replacement: with 12 arms and 8 samples they
proposed one arm three times on an H100 run, which spends trials on results the search already has.
DistinctArms asks its searcher again instead. The inner searcher still learns from every proposal:
a repeat is told at once the result its arm has so far (or a failure, when it has none yet) under a
private id, so model-based samplers move away from it.
"""
from __future__ import annotations

import copy
import random
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.util import _set_search_properties_backwards_compatible


class DistinctArms(Searcher):
    """Wraps `searcher` (over {"arm": tune.choice(arms)}) so that each arm runs in at most one trial.

    A proposal of an arm already launched is answered at once and the searcher asked again, up to
    `max_tries` times; then a seeded random arm not yet launched is used (its trial's results do not
    reach the searcher, which never proposed it). When every arm has been launched: FINISHED.
    """

    def __init__(self, searcher: Searcher, arms: list[str], seed: int = 0, max_tries: int = 50):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.arms = list(arms)
        self.max_tries = max_tries
        self.rng = random.Random(seed)
        self.arm_of: dict[str, str] = {}  # trial id -> its arm
        self.inner_id: dict[str, str] = {}  # trial id -> the id the inner searcher knows it by
        self.results: dict[str, dict] = {}  # arm -> its latest result

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return _set_search_properties_backwards_compatible(self.searcher.set_search_properties, metric, mode,
                                                           config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | None:
        launched = set(self.arm_of.values())
        if len(launched) >= len(self.arms):
            return Searcher.FINISHED
        for attempt in range(self.max_tries):
            inner = f"{trial_id}-{attempt}"
            config = self.searcher.suggest(inner)
            if config is None or config == Searcher.FINISHED:
                return config
            arm = config["arm"]
            if arm not in launched:
                self.arm_of[trial_id], self.inner_id[trial_id] = arm, inner
                return config
            known = self.results.get(arm)
            self.searcher.on_trial_complete(inner, result=known, error=known is None)
        arm = self.rng.choice(sorted(set(self.arms) - launched))
        self.arm_of[trial_id] = arm
        return {"arm": arm}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._remember(trial_id, result)
        if trial_id in self.inner_id:
            self.searcher.on_trial_result(self.inner_id[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._remember(trial_id, result)
        if trial_id in self.inner_id:
            self.searcher.on_trial_complete(self.inner_id.pop(trial_id), result=result, error=error)

    def _remember(self, trial_id: str, result: dict | None) -> None:
        if result and self.metric in result and trial_id in self.arm_of:
            self.results[self.arm_of[trial_id]] = result

    # Tuner.restore (ray.tune.search.SearchGenerator, as for ConcurrencyLimiter): a wrapper's own state
    # through get_state/set_state, the innermost searcher's checkpoint through its save/restore.
    def get_state(self) -> dict[str, Any]:
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "searcher"})

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
