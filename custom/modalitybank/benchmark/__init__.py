"""The paper's downstream experiments (Tables I-III) as one command: ``modalitybank benchmark``.

:mod:`~modalitybank.benchmark.plan` (tables, rows, budget from ``configs/benchmark.json``),
:mod:`~modalitybank.benchmark.stages` (computed once, resumed, timed),
:mod:`~modalitybank.benchmark.segment` (the segmentation bundle: train, evaluate, example),
:mod:`~modalitybank.benchmark.results` (tables, CSVs, figures) and
:mod:`~modalitybank.benchmark.run` (the pipeline).
"""

from modalitybank.benchmark.run import Benchmark, run_benchmark

__all__ = ["Benchmark", "run_benchmark"]
