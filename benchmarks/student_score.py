"""Does a student-side score predict the distilled student better than the lambda-tradeoff? Measured on the
committed studies' candidates without retraining their chains.

For each committed study (``results/study_{rte,sst2,tweets,tweets_x2}.json``) the script rebuilds the study's
job from the config the study recorded (the teacher fine-tuned again by the same seeded recipe, checked against
the teacher metric the study recorded), and for each of its candidates computes the student-side score
(:func:`minidisc_ray.student_score.student_side_score`: the student the chain would cut from the recovered
candidate, or from the teacher for "no assistant", and the alignment and stability of its gradients under the
candidate's distillation signal, 8 batches of 32 training rows, no student training). Against the study's
recorded students (the mean over its seeds of the student distilled through each candidate) it reports, for
the lambda-tradeoff (the study's paper form, mean over seeds), each student-side statistic and their
combinations (mean rank): Spearman over the candidates and the regret of the argmax (best mean student minus
the argmax's mean student, in points; the study's held-out regret is a different, per-seed measure).

Usage:
    python benchmarks/student_score.py                         # the four studies (~25 min on 2 cores)
    python benchmarks/student_score.py --studies tweets,rte
    python benchmarks/student_score.py --quick                 # a tiny teacher on made-up data, made-up students
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import COMMITTED, REPO, SST2, save_figure, write

from minidisc_ray.candidates import SearchPayload, student_side_score
from minidisc_ray.config.loading import config_from_dict
from minidisc_ray.pipeline import prepare
from minidisc_ray.study.analyse import predictor_rows

STUDIES = ("tweets", "tweets_x2", "rte", "sst2")
SHARED = SST2.parents[2]  # ../shared


def _ranks(x: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def judged(scores: dict[str, list[float]], per_seed: list[list[float]]) -> dict[str, dict[str, Any]]:
    """Each score's Spearman with the mean student and the held-out regret of its argmax (the study's own
    measure, :func:`~minidisc_ray.study.analyse.predictor_rows`; one score per candidate, so one pick for all
    seeds), in metric units."""
    student = np.array(per_seed).T  # seeds x candidates
    return predictor_rows(student, {k: np.tile(np.array(v, dtype=float), (student.shape[0], 1))
                                    for k, v in scores.items()}, [])


def _config(study: dict[str, Any], name: str, root: Path, teachers: dict[str, str]) -> dict[str, Any]:
    raw = json.loads(json.dumps(study["config"]).replace("/tmp/shared", str(SHARED)))
    raw["output_dir"] = str(root / name)
    if raw["teacher"]["model"] in teachers:  # the teacher an earlier study of this run fine-tuned
        raw["teacher"]["model"] = teachers[raw["teacher"]["model"]]
    elif Path(raw["teacher"]["model"]).is_absolute() and not Path(raw["teacher"]["model"]).exists():
        raise SystemExit(f"study {name}: its teacher {raw['teacher']['model']} is another study's; run that study "
                         "first in the same --studies list")
    return raw


def _study(name: str, study: dict[str, Any], raw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    t0 = time.perf_counter()
    cfg = config_from_dict(raw)
    prep = prepare(cfg, cfg.output_dir)
    payload = SearchPayload.from_prepared(prep, with_shapes=False)
    rows = []
    for c in study["candidates"]:
        s = c["sparsity"]
        score = student_side_score(payload, s)
        rows.append({"sparsity": s, "student_metric": c["student_metric"]["mean"],
                     "tradeoff": c["tradeoff"]["mean"], "candidate_metric": c["candidate_metric"]["mean"], **score})
        print(f"[{name}] {rows[-1]}", flush=True)
    out = {"teacher_metric": prep.teacher_metrics["metric"], "study_teacher_metric": study["teacher"]["metric"],
           "teacher_reproduced": None if study["teacher"]["metric"] is None
           else abs(prep.teacher_metrics["metric"] - study["teacher"]["metric"]) < 1e-9,
           "seeds": study["seeds"], "candidates": rows, "student_sparsity": cfg.pruning.student_sparsity,
           "score_seconds": round(sum(r["seconds"] for r in rows), 1), "seconds": round(time.perf_counter() - t0, 1)}
    out["judged"] = judge_study(out, study)
    return out, prep.teacher_dir


def judge_study(res: dict[str, Any], study: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every predictor of one study's candidates, judged against its recorded students."""
    rows = res["candidates"]
    per_seed = [c["student_metric"].get("per_seed", [c["student_metric"]["mean"]]) for c in study["candidates"]]
    s_student = res.get("student_sparsity", study.get("student_sparsity", 0.9))
    scores = {"lambda-tradeoff": [r["tradeoff"] for r in rows],
              "student alignment": [r["alignment"] for r in rows],
              "student stability": [r["stability"] for r in rows],
              "student kd loss (lower)": [-r["kd_loss"] for r in rows]}
    for k in ("alignment", "stability"):
        scores[f"lambda-tradeoff + student {k} (mean rank)"] = list(_ranks(scores["lambda-tradeoff"])
                                                                     + _ranks(scores[f"student {k}"]))
    # a size prior with no measurement at all: the candidate nearest the student from above (no assistant last)
    scores["nearest candidate above the student (a size prior)"] = [
        r["sparsity"] if r["sparsity"] < s_student else -1.0 for r in rows]
    return judged(scores, per_seed)


def _quick(root: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_glue_dir, make_tokenizer, save_tiny_teacher

    tok = make_tokenizer(root / "tok")
    teacher = save_tiny_teacher(root / "teacher", tok, seed=5)
    glue = make_glue_dir(root / "SST-2", n_train=300, n_dev=60)
    grid = [0.5, 0.7, 0.9]
    made_up = {"teacher": {"metric": None, "path": str(teacher)}, "seeds": 1,
               "config": {"task": {"data": str(glue), "max_length": 32},
                          "teacher": {"model": str(teacher), "finetune": "never"},
                          "pruning": {"grid": grid, "student_sparsity": 0.9, "importance_samples": 64},
                          "recovery": {"steps": 2, "batch_size": 16}},
               "candidates": [{"sparsity": s, "student_metric": {"mean": 0.5 + 0.1 * k}, "tradeoff": {"mean": 0.6},
                               "candidate_metric": {"mean": 0.5}} for k, s in enumerate(grid)]}
    return made_up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--studies", default=",".join(STUDIES))
    ap.add_argument("--rejudge", action="store_true", help="judge the scores the results file holds again (no "
                    "scoring): after a predictor is added here")
    args = ap.parse_args()
    if args.rejudge:
        data = json.loads((COMMITTED / "student_score.json").read_text())
        for name, res in data["studies"].items():
            res["judged"] = judge_study(res, json.loads((COMMITTED / f"study_{name}.json").read_text()))
        (COMMITTED / "student_score.json").write_text(json.dumps(data, indent=1, default=float))
        print(f"rejudged {COMMITTED / 'student_score.json'}")
        return
    root = Path(tempfile.mkdtemp(prefix="score-")) if args.quick else REPO / "runs" / "score-bench"
    if args.quick:
        studies = {"made-up": _quick(root)}
    else:
        studies = {n: json.loads((COMMITTED / f"study_{n}.json").read_text()) for n in args.studies.split(",")}
    teachers: dict[str, str] = {}
    results = {}
    for name, study in studies.items():
        res, teacher_dir = _study(name, study, _config(study, name, root, teachers) if not args.quick
                                  else {"output_dir": str(root / name), **study["config"]})
        teachers[str(Path(study["teacher"]["path"]))] = teacher_dir  # a later study trains from the same teacher
        results[name] = res
        print(f"[{name}] " + "; ".join(f"{k}: rho {v['spearman']:+.2f}, regret {v['regret']['mean']:.4f}"
                                         for k, v in res["judged"].items()), flush=True)
    write("student_score", {"studies": results}, args.quick)
    _plot(results, args.quick)


def _plot(results: dict[str, Any], quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, (name, res) in zip(axs[0], results.items(), strict=True):
        rows = res["candidates"]
        x = [r["sparsity"] for r in rows]
        ax.plot(x, [r["student_metric"] for r in rows], "k*-", label="student (study mean)")
        twin = ax.twinx()
        twin.plot(x, [r["alignment"] for r in rows], "o--", color="tab:blue", label="alignment")
        twin.plot(x, [r["stability"] for r in rows], "s--", color="tab:orange", label="stability")
        ax.set_title(name)
        ax.set_xlabel("candidate unit sparsity (0.9: no assistant)")
        ax.set_ylabel("student metric")
        twin.set_ylabel("student-side score")
        ax.legend(loc="lower left", fontsize=7)
        twin.legend(loc="lower right", fontsize=7)
    save_figure(fig, "student_score", quick)


if __name__ == "__main__":
    main()
