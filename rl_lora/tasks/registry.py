"""Finding a task by the name a recipe gives it in ``data.task``, and making it.

Names: ``arithmetic`` and ``dataset`` (built in), ``module.path:factory``, ``path/to/file.py:factory``,
or an entry point in group ``rl_lora.tasks``. A factory is called as ``factory(config, **data.task_kwargs)``
and returns an object with the task protocol (rl_lora/tasks/base.py). The built-in tasks are found by
module path like any plug-in, so nothing here imports them until a recipe asks for one.
"""

from __future__ import annotations

import inspect
from typing import Any

from rl_lora.config.schema import RecipeConfig
from rl_lora.tasks.base import Metric
from rl_lora.utils.errors import ConfigError
from rl_lora.utils.plugins import PluginKind, resolve

ENTRY_POINT_GROUP = "rl_lora.tasks"
BUILTIN_TASKS = {
    "arithmetic": "rl_lora.tasks.arithmetic.task:make_task",
    "dataset": "rl_lora.tasks.dataset:make_task",
}
TASK_PLUGINS = PluginKind("task", ENTRY_POINT_GROUP, BUILTIN_TASKS, ConfigError)


def make_task(config: RecipeConfig) -> Any:
    """The recipe's task, checked for the protocol; ConfigError naming the task otherwise."""
    name = config.data.task
    factory = resolve(TASK_PLUGINS, BUILTIN_TASKS.get(name, name))
    try:
        inspect.signature(factory).bind(config, **config.data.task_kwargs)
    except TypeError as exc:
        raise ConfigError(f"task '{name}': its factory cannot be called as factory(config, **data.task_kwargs) "
                          f"({exc})") from None
    except ValueError:  # no signature to check (a builtin or C callable)
        pass
    task = factory(config, **config.data.task_kwargs)
    missing = [attr for attr in ("metric", "train_dataset", "evaluate") if not hasattr(task, attr)]
    if missing:
        raise ConfigError(f"task '{name}': the factory's result has no {', '.join(missing)} (rl_lora/tasks/base.py "
                          "says what a task provides)")
    if not isinstance(task.metric, Metric):
        raise ConfigError(f"task '{name}': its metric must be an rl_lora.tasks.base.Metric, "
                          f"got {type(task.metric).__name__}")
    return task
