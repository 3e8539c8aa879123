"""Tasks: what a kind of model is trained and judged by (see ``tasks.base``).

Registered: ``classification`` (images: cross-entropy, top-1/top-5) and ``language-model``
(``text:ROOT``: BPTT, perplexity); for ``hf:`` models ``hf-causal-lm`` and ``hf-embedding``
(``text:ROOT`` read with the model's tokenizer), ``hf-classification`` (``tsv:ROOT``). A
data source names its task; ``task_for_data(spec)`` finds it.
"""

# importing a task module registers the task and its data sources; a new task is one line here
from symconvert.tasks import classification, hf_classify, hf_text, images, language_model  # noqa: F401
from symconvert.tasks.base import (
    TASK_KEY,
    TASKS,
    Metric,
    StepOutput,
    Task,
    check_data,
    get_task,
    list_tasks,
    register_task,
    task_for_data,
    task_for_scores,
    task_of,
)

__all__ = ["TASK_KEY", "TASKS", "Metric", "StepOutput", "Task", "check_data", "get_task",
           "list_tasks", "register_task", "task_for_data", "task_for_scores", "task_of"]
