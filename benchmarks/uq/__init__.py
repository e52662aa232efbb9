"""The uncertainty benchmark (see README.md in this folder): ``protocol`` holds its tasks,
methods, knobs and budgets; ``run`` is the entry point (``python benchmarks/uq/run.py``)."""
