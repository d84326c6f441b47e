"""A new strategy is one module: ``tests/toy_strategy.py`` registers ``toy-ends``, and the config validates it
against its declared facts, the driver runs it on real Ray Tune, and ``minidisc study`` replays it, with no other
file naming it."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from minidisc_ray.config import config_from_dict
from minidisc_ray.errors import ConfigError
from minidisc_ray.strategies import REGISTRY
from minidisc_ray.study.records import SeedRecord
from minidisc_ray.study.replay import replayed, strategy_picks
from minidisc_ray.tradeoff import Tradeoff

from .test_search_ray import tiny_config


@pytest.fixture()
def toy() -> Iterator[str]:
    """Registers the toy (re-running its module's ``@register``) and removes it afterwards, so the registry the
    other tests see holds the built-in strategies only."""
    from tests import toy_strategy

    importlib.reload(toy_strategy)
    yield toy_strategy.Ends.name
    REGISTRY.pop(toy_strategy.Ends.name, None)


def test_the_config_validates_a_new_strategy_by_its_declared_facts(toy: str, tmp_path: Path) -> None:
    base = tiny_config(tmp_path / "teacher", tmp_path / "out", tmp_path / "data", search={"strategy": toy})
    assert config_from_dict(base).search.strategy == toy
    offline = {**base, "teacher": {**base["teacher"], "placement": "offline"}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(offline)
    fields = [p.field for p in err.value.problems]
    assert fields == ["search.strategy"], fields
    assert "teacher.placement: offline" in str(err.value)
    assert toy not in str(err.value).split("use one of")[-1], "the refusal must not offer the toy as a fix"
    workers = {**base, "search": {**base["search"], "trial_workers": 2}}
    with pytest.raises(ConfigError, match="search.trial_workers"):
        config_from_dict(workers)
    REGISTRY.pop(toy)
    with pytest.raises(ConfigError, match=f"search.strategy.*{toy}"):
        config_from_dict(base)


def test_the_study_replays_a_new_strategy(toy: str) -> None:
    assert toy in replayed()
    rec = SeedRecord(seed=0, metric=[0.84, 0.83, 0.80], actual=[0.5, 0.7, 0.9], student=[0.75, 0.78, 0.72],
                     assistant=[0.8, 0.8, None], eval_cpu=[10.0] * 3, chain_cpu=[100.0, 80.0, 40.0], direct=0.70,
                     direct_cpu=90.0, sandwich=None, sandwich_cpu=0.0)
    picks = strategy_picks(rec, Tradeoff(0.2), 1, 6, 0)
    # tradeoff at the ends: 0.84 + 0.2 x 0.5 = 0.94 against 0.80 + 0.2 x 0.9 = 0.98: the sparser end wins;
    # it paid two evaluations and the chain through its pick
    assert picks[toy] == {"pick": 2, "evaluated": 2, "cpu": 10.0 + 10.0 + 40.0}


@pytest.mark.ray
def test_the_driver_runs_a_new_strategy_on_ray_tune(toy: str, ray_session: None, tmp_path: Path, teacher_dir: Path,
                                                   sst2_dir: Path) -> None:
    from minidisc_ray.search.driver import run_search

    grid = [0.5, 0.7, 0.9]
    cfg = config_from_dict(tiny_config(teacher_dir, tmp_path / "run", sst2_dir, search={"strategy": toy},
                                       pruning={"grid": grid, "importance_samples": 64, "student_sparsity": 0.9}))
    summary = run_search(cfg, tmp_path / "run")
    evaluated = sorted(c["sparsity"] for c in summary["candidates"])
    assert evaluated == [0.5, 0.9], evaluated
    best = max(summary["candidates"], key=lambda c: (c["tradeoff"], c["sparsity"]))
    assert summary["chosen_sparsity"] == best["sparsity"]
    assert summary["strategy"] == toy
    written = json.loads((tmp_path / "run" / "search.json").read_text())
    assert written["chosen_sparsity"] == summary["chosen_sparsity"]
