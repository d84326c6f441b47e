"""``minidisc study CONFIG``: can the lambda-tradeoff's pick be trusted on this task and teacher?

For every candidate TA on the study's grid and every seed, one Ray Tune trial (a *path*) does what a
search and then ``minidisc run`` would do with that TA:

1. the candidate's search score: pruned from the teacher, recovered for ``recovery.steps``, evaluated
   (the value every strategy ranks by the lambda-tradeoff);
2. trial distillation with the **chain's budget**: teacher -> TA for ``distill.steps``, the student
   pruned from the TA by the TA's importance, TA -> student for ``distill.steps`` (the recipe of the
   Ray Train stages: warm-up and decay, evaluation every ``eval_every``, early stop, best weights kept).
   A candidate at the student's own sparsity is the run without a TA: teacher -> student only.

and one more trial (an *arm*) trains what that candidate's arm of a halving round trains
(:class:`~minidisc_ray.search.arms.ArmRun`: recovered candidate, student cut from it, distilled for
``search.halving_steps``), its student evaluated at every rung and every ``distill.eval_every``, so that
``halving`` and ``auto`` are replayed on what their arms really are.

Per seed, one more trial distils the student directly from the teacher with the TA path's total
budget (``2 x distill.steps``: *direct KD at the same compute*), and one runs the ``sandwich``
schedule over the same grid. Seeds vary every random draw of training (data order, dropout) and the
recovery; the fine-tuned teacher and its importance ranking stay those of the job's seed, as in
``minidisc run``.

From those records, with nothing trained again: each strategy's pick on each seed's curve (bisection
and Optuna are replayed with the real searcher and sampler, :mod:`minidisc_ray.search.replay`), its
regret against the best student, the Spearman correlation between tradeoff and student metric, the
range of lambda that would have picked the best TA (for both tradeoff forms), and each strategy's
cost in CPU-seconds against exhaustive trial distillation. Intervals are percentile bootstraps over
seeds. Every trial is recorded in ``OUTPUT/evaluations`` when it finishes, so a rerun continues.

Modules: :mod:`.trials` (what one trial trains, plain torch), :mod:`.records` (the trials' records per seed),
:mod:`.replay` (each strategy replayed on one seed), :mod:`.analyse` (regret, cost, correlation and their
bootstrap intervals) and :mod:`.run` (the command: the Tune experiments and ``study.{json,md,png}``).
"""
