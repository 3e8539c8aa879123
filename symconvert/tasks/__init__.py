"""Tasks: what a kind of model is trained and judged by (see ``tasks.base``).

Registered: ``classification`` (images: cross-entropy, top-1/top-5) and ``language-model``
(``text:ROOT``: BPTT, perplexity). A data source names its task; ``task_for_data(spec)``
finds it.
"""

from symconvert.tasks import classification as _classification  # noqa: F401  (registers)
from symconvert.tasks import language_model as _language_model  # noqa: F401  (registers)
from symconvert.tasks.base import (
    TASKS,
    StepOutput,
    Task,
    get_task,
    list_tasks,
    register_task,
    task_for_data,
)

__all__ = ["TASKS", "StepOutput", "Task", "get_task", "list_tasks", "register_task",
           "task_for_data"]
