"""Record keys that cannot go stale: every config field is in the key table (``minidisc_ray.keys``), and walking
every field through the real key functions (candidate, chain stage, halving rung, study unit, Optuna study name)
changes exactly the keys the table says it decides."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from minidisc_ray import keys
from minidisc_ray.candidates import SearchPayload
from minidisc_ray.chain.runner import ChainRunner
from minidisc_ray.config import Config, config_from_dict
from minidisc_ray.keys import TABLE, config_fields, field_value
from minidisc_ray.pipeline import Prepared, prepare
from minidisc_ray.records import KEY_VERSION, EvaluationStore
from minidisc_ray.search.arms import make_payload
from minidisc_ray.search.driver import optuna_study_name
from minidisc_ray.search.optuna_kd import optuna_kd_study_name
from minidisc_ray.study.trials import StudyPayload

from .conftest import make_tokenizer, save_tiny_teacher
from .test_search_ray import tiny_config


def _changed(cfg: Config, path: str, value: Any) -> Config:
    section, _, name = path.rpartition(".")
    if not section:
        return dataclasses.replace(cfg, **{name: value})
    sub = getattr(cfg, section)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{name: value})})


def _other(value: Any) -> Any:
    """A different value of the same kind (validity does not matter: keys do not validate)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.05 if value < 0.9 else value - 0.05
    if isinstance(value, str):
        return value + "-x"
    if isinstance(value, tuple):
        return value[:-1]
    if value is None:
        return 7
    raise AssertionError(f"no other value for {value!r}")


def _keys(prep: Prepared, cfg: Config, out: Path) -> dict[str, str]:
    """Each kind's key for ``cfg`` through the functions the job uses. A rung is keyed by its own steps, however
    ``search.halving_*`` derived them: the rung compared is the one of the base config's first rung's steps."""
    rung_steps = make_payload(SearchPayload.from_prepared(prep), prep.cfg).rungs[:1]
    prep = dataclasses.replace(prep, cfg=cfg)
    payload = SearchPayload.from_prepared(prep, with_shapes=False)  # the shapes per budget: no key depends on them
    halving = make_payload(payload, cfg)
    runner = ChainRunner(prep, out, "key test", "run", str(out / "tune"))
    study = StudyPayload(payload, cfg.distill, sorted(cfg.pruning.grid), cfg.pruning.importance_samples,
                         cfg.pruning.batch_size, cfg.seed, halving)
    return {
        keys.CANDIDATE: payload.evaluation_key("candidate", 0.5),
        keys.STAGE: runner.key("assistant", "teacher-key", prep.teacher, cfg.distill),
        keys.ARM: dataclasses.replace(halving, rungs=rung_steps).rung_key(0.5, 0),
        keys.STUDY: study.key({"kind": "path", "sparsity": 0.5, "seed": cfg.seed}),
        keys.OPTUNA: optuna_study_name(cfg, payload, out) + " " + optuna_kd_study_name(cfg, payload, halving, [0.5],
                                                                                        out),
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, sst2_dir: Path) -> tuple[Prepared, Path]:
    tmp = tmp_path_factory.mktemp("keys")
    teacher = save_tiny_teacher(tmp / "teacher", make_tokenizer(tmp / "tok"), seed=3)
    cfg = config_from_dict(tiny_config(teacher, tmp / "run", sst2_dir,
                                       pruning={"grid": [0.5, 0.7, 0.9], "importance_samples": 16}))
    prep = prepare(cfg, tmp / "run")
    return dataclasses.replace(prep, importance=SearchPayload.from_prepared(prep).importance), tmp / "run"


def test_the_table_names_every_config_field_once() -> None:
    fields = config_fields()
    assert len(fields) == len(set(fields))
    missing = sorted(set(fields) - set(TABLE))
    assert not missing, f"config fields missing from minidisc_ray.keys.TABLE (add them, with why): {missing}"
    extra = sorted(set(TABLE) - set(fields))
    assert not extra, f"TABLE names fields the config does not have: {extra}"
    for path, entry in TABLE.items():
        assert entry.why, path
        assert entry.direct <= set(keys.KINDS), path
        assert entry.direct or entry.via or entry.why, path


def test_every_field_changes_exactly_the_keys_the_table_says(prepared: tuple[Prepared, Path]) -> None:
    prep, out = prepared
    base = _keys(prep, prep.cfg, out)
    assert len(set(base.values())) == len(base), "every kind keys differently"
    wrong = []
    walked = 0
    for path, entry in TABLE.items():
        value = field_value(prep.cfg, path)
        for other in ([_other(value)] if path != "teacher.placement" else ["sharded", "offline"]):
            cfg = _changed(prep.cfg, path, other)
            got = _keys(prep, cfg, out)
            walked += 1
            for kind in keys.KINDS:
                decided = keys.config_part(cfg, kind) != keys.config_part(prep.cfg, kind)
                expected = kind in entry.direct and decided
                if (got[kind] != base[kind]) != expected:
                    wrong.append(f"{path}={other!r}: {kind} key {'changed' if not expected else 'did not change'}")
    assert walked >= len(TABLE)
    assert not wrong, "\n".join(wrong)


def test_an_offline_teachers_top_k_decides_its_candidates(prepared: tuple[Prepared, Path]) -> None:
    prep, out = prepared
    offline = _changed(prep.cfg, "teacher.placement", "offline")
    a = _keys(prep, offline, out)
    b = _keys(prep, _changed(offline, "teacher.top_k", 8), out)
    for kind in (keys.CANDIDATE, keys.STAGE, keys.OPTUNA):
        assert a[kind] != b[kind], kind


def test_the_same_weights_with_another_config_are_another_teacher(prepared: tuple[Prepared, Path]) -> None:
    """The stale reuse a closing note found: same weights, another dropout, same directory."""
    prep, out = prepared
    base = _keys(prep, prep.cfg, out)
    teacher = prep.teacher
    other = type(teacher)(type(teacher.config).from_dict({**teacher.config.to_dict(), "hidden_dropout_prob": 0.3}))
    other.load_state_dict(teacher.state_dict())
    got = _keys(dataclasses.replace(prep, teacher=other), prep.cfg, out)
    for kind in (keys.CANDIDATE, keys.ARM, keys.STUDY, keys.OPTUNA):
        assert got[kind] != base[kind], kind


def test_one_optuna_study_per_job_directory(prepared: tuple[Prepared, Path], tmp_path: Path) -> None:
    """Two jobs with the same config in two output directories never share an Optuna study (each marks the trials
    its killed predecessor left RUNNING as failed: in a shared study it would fail the other job's live ones);
    a rerun in the same directory continues its own."""
    prep, out = prepared
    payload = SearchPayload.from_prepared(prep)
    hp = make_payload(payload, prep.cfg)
    assert optuna_study_name(prep.cfg, payload, out) == optuna_study_name(prep.cfg, payload, out)
    assert optuna_study_name(prep.cfg, payload, out) != optuna_study_name(prep.cfg, payload, tmp_path / "other")
    assert (optuna_kd_study_name(prep.cfg, payload, hp, [0.5], out)
            != optuna_kd_study_name(prep.cfg, payload, hp, [0.5], tmp_path / "other"))


def test_records_of_an_older_key_version_are_reported_once_and_not_found(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = EvaluationStore(tmp_path / "evaluations")
    store.put("abc", {"metric": 0.5, "sparsity": 0.5})
    record = json.loads((tmp_path / "evaluations" / "abc.json").read_text())
    assert record["key_version"] == KEY_VERSION
    old = {k: v for k, v in record.items() if k != "key_version"}  # what versions before the table wrote
    (tmp_path / "evaluations" / "old.json").write_text(json.dumps({**old, "key": "old"}))
    capsys.readouterr()
    EvaluationStore(tmp_path / "evaluations")
    EvaluationStore(tmp_path / "evaluations")
    err = capsys.readouterr().err
    assert err.count("record(s)") == 1, err
    assert "1 record(s)" in err
    assert f"now {KEY_VERSION}" in err
