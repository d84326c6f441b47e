"""Every report minidisc-ray writes: the run's (``report.{json,md}``, ``tradeoff.png``, ``metric_vs_params.png``),
the comparison's (``compare.*``), the study's (``study.*``), the model card, and the halving evidence lines, with one
plotting helper (:func:`figure`) that benchmarks use too.

Modules: :mod:`.figures` (the plotting helpers and sparsity labels), :mod:`.card` (the model card), :mod:`.evidence`
(the halving round's evidence lines), :mod:`.run` (``minidisc run``'s report), :mod:`.compare` (``minidisc
compare``'s) and :mod:`.study` (``minidisc study``'s).
"""

from minidisc_ray.report.card import model_card
from minidisc_ray.report.compare import compare_markdown, plot_compare, write_compare
from minidisc_ray.report.evidence import evidence_lines
from minidisc_ray.report.figures import PARAM_SPARSITY, UNIT_SPARSITY, figure, label
from minidisc_ray.report.run import assistants_of, keep_line, plot_run, run_markdown, run_report, write_run
from minidisc_ray.report.study import partial_stage_lines, plot_study, study_markdown, write_study

__all__ = [
    "PARAM_SPARSITY", "UNIT_SPARSITY", "assistants_of", "compare_markdown", "evidence_lines", "figure", "keep_line",
    "label", "model_card", "partial_stage_lines", "plot_compare", "plot_run", "plot_study", "run_markdown",
    "run_report", "study_markdown", "write_compare", "write_run", "write_study",
]
