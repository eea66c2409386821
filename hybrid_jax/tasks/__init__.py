"""Training tasks behind one interface (`Task`), chosen by `config.task`."""

import ml_collections

from hybrid_jax.tasks.base import Evaluate, Task, TrainStep
from hybrid_jax.tasks.classification import ClassificationTask
from hybrid_jax.tasks.reid import ReidTask
from hybrid_jax.train.config import ConfigError, check_keys, check_values

TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "reid": ReidTask}


def task_class(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"config.task={name!r}; choose one of {tuple(TASKS)}.") from None


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every check a config passes before a run reads data: keys, values, and the task's own."""
    check_keys(config)
    check_values(config)
    task_class(config.task).check_config(config)


def make_task(config: ml_collections.ConfigDict) -> Task:
    """The checked config's task, with its training data described."""
    check_config(config)
    return task_class(config.task)(config)


__all__ = ["TASKS", "Evaluate", "Task", "TrainStep", "check_config", "make_task", "task_class"]
