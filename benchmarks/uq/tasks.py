"""The benchmark tasks by name (``protocol.TASKS``): which builder makes each, the ``--quick``
variant, and the split of each seed.

Every task has a *fit* set (what every method trains on), a *validation* set carved from the
training data (the one knob each method may choose is chosen there), an in-distribution *test*
set and an *OOD* set. The classification tasks (``classification_tasks.py``: digits, MNIST-1D,
and ``digits_resnet``, digits with a residual CNN with batch norm) are split once; the
regression tasks (``regression_tasks.py``: diabetes, Boston, concrete) are split anew for
every seed (``protocol.RESPLIT_TASKS``), as in the UCI protocol. Training seeds
otherwise change only the initialisation, the minibatch order and the Monte Carlo noise.
"""

from __future__ import annotations

from benchmarks.uq.classification_tasks import digits_resnet_task, digits_task, mnist1d_task
from benchmarks.uq.protocol import QUICK_FIT_SIZE, QUICK_MNIST1D, RESPLIT_TASKS
from benchmarks.uq.regression_tasks import DATASETS, regression_task
from benchmarks.uq.task_data import Task

__all__ = ["Task", "load_task", "quick_task", "task_for_seed"]


def load_task(name: str, split_seed: int = 0) -> Task:
    """Build the named task (one of ``protocol.TASKS``); ``split_seed`` picks the split of a
    task in ``protocol.RESPLIT_TASKS`` (the classification tasks have one fixed split)."""
    if name in DATASETS:
        return regression_task(name, split_seed)
    return {"digits": digits_task, "digits_resnet": digits_resnet_task,
            "mnist1d": mnist1d_task}[name]()


def quick_task(name: str, split_seed: int = 0) -> Task:
    """The task of ``--quick``: at most ``QUICK_FIT_SIZE`` fit inputs (MNIST-1D generated at
    ``QUICK_MNIST1D`` sequences)."""
    task = mnist1d_task(QUICK_MNIST1D) if name == "mnist1d" else load_task(name, split_seed)
    task.x_fit, task.y_fit = task.x_fit[:QUICK_FIT_SIZE], task.y_fit[:QUICK_FIT_SIZE]
    return task


def task_for_seed(task: Task, seed: int, quick: bool) -> Task:
    """``task`` itself, or for a task split anew per seed its split of ``seed``."""
    if task.name not in RESPLIT_TASKS or task.split_seed == seed:
        return task
    return quick_task(task.name, seed) if quick else load_task(task.name, seed)
