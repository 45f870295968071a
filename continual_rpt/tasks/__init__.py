"""Tasks: SuperGLUE and custom datasets; parsing, dev/test splitting, few-shot sampling, official metrics."""

from .base import DataError, Example, Task
from .data import TaskData, load_task_data, read_jsonl
from .superglue import SUPERGLUE, get_task

__all__ = ["SUPERGLUE", "DataError", "Example", "Task", "TaskData", "get_task", "load_task_data", "read_jsonl"]
from .custom import CustomTaskConfig, custom_config_from_dict, custom_task, load_custom_data, read_custom_examples

__all__ += ["CustomTaskConfig", "custom_config_from_dict", "custom_task", "load_custom_data", "read_custom_examples"]
from .stored import read_examples, task_from_meta

__all__ += ["read_examples", "task_from_meta"]
