"""SuperGLUE tasks: parsing, dev/test splitting, few-shot sampling and official metrics."""

from .base import DataError, Example, Task
from .data import TaskData, load_task_data, read_jsonl
from .superglue import SUPERGLUE, get_task

__all__ = ["SUPERGLUE", "DataError", "Example", "Task", "TaskData", "get_task", "load_task_data", "read_jsonl"]
