"""Many jobs, one study database: the documented cluster setup (``search.optuna_storage: postgresql://...``) on a
real PostgreSQL server, started here on a Unix socket only (Debian's ``postgresql`` package; ``.ci/run`` installs
it). One Optuna study per job; a job marks the trials its own killed predecessor left RUNNING as failed and never
touches another job's live trials.

Marked ``postgres``: the default run leaves it out (a bare clone has no server); selected, a missing server is a
failure, not a skip."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from minidisc_ray.candidates import SearchPayload
from minidisc_ray.config import config_from_dict
from minidisc_ray.pipeline import prepare
from minidisc_ray.search.driver import check_optuna_storage, optuna_study

from .conftest import make_tokenizer, save_tiny_teacher
from .servers import postgres_server
from .test_search_ray import tiny_config

pytestmark = [pytest.mark.postgres]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as (url, version):
        print(f"PostgreSQL server: {version}")
        yield url


def test_two_jobs_share_the_database_but_never_a_study_or_each_others_trials(
        postgres_url: str, tmp_path: Path, sst2_dir: Path) -> None:
    check_optuna_storage(postgres_url)
    teacher = save_tiny_teacher(tmp_path / "teacher", make_tokenizer(tmp_path / "tok"), seed=3)
    jobs = []
    for name in ("a", "b"):
        cfg = config_from_dict(tiny_config(teacher, tmp_path / name, sst2_dir,
                                           pruning={"grid": [0.5, 0.7, 0.9], "importance_samples": 16},
                                           search={"strategy": "optuna", "optuna_storage": postgres_url}))
        prep = prepare(cfg, tmp_path / name)
        jobs.append((cfg, SearchPayload.from_prepared(prep), tmp_path / name))
    (cfg_a, pay_a, out_a), (cfg_b, pay_b, out_b) = jobs
    storage, name_a, _ = optuna_study(cfg_a, pay_a, out_a)
    _, name_b, _ = optuna_study(cfg_b, pay_b, out_b)
    assert name_a != name_b, "same config, two jobs: two studies"
    study_a = optuna.create_study(study_name=name_a, storage=storage, direction="maximize")
    study_b = optuna.create_study(study_name=name_b, storage=storage, direction="maximize")
    live_b = study_b.ask()  # job b's trial, running right now
    dead_a = study_a.ask()  # job a was killed while this trial ran
    done_a = study_a.ask({"sparsity": optuna.distributions.CategoricalDistribution([0.5, 0.7, 0.9])})
    study_a.tell(done_a, 0.8)
    # job a reruns (its lock guarantees its predecessor is dead): its own RUNNING trial is failed, b's is not
    _, again, done = optuna_study(cfg_a, pay_a, out_a)
    assert again == name_a
    assert done == [done_a.params["sparsity"]]
    states_a = {t.number: t.state for t in study_a.get_trials(deepcopy=False)}
    assert states_a[dead_a.number] == optuna.trial.TrialState.FAIL
    assert states_a[done_a.number] == optuna.trial.TrialState.COMPLETE
    assert study_b.get_trials(deepcopy=False)[live_b.number].state == optuna.trial.TrialState.RUNNING
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert {name_a, name_b} <= names
    assert dataclasses.is_dataclass(cfg_a)
