"""A run's task-free scores: every seen task's test examples answered as `crpt bank predict` without a task answers
their rows (each row read by every entry whose task reads it, routed among them by `continual_rpt.routing`, and
answered by the entry chosen, reading it as its own task does), and scored in the home task's terms.
"""

from __future__ import annotations

from continual_rpt.backbones import Backbone
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import predict_from_bank
from continual_rpt.routing import bank_contenders, route_readings
from continual_rpt.tasks import DataError, Example, Task, TaskData, task_from_meta


def answer_as(task, other_meta: dict, index: int) -> int | None:
    """Another entry's answer `index`, in `task`'s terms: the same label where both tasks name it (Amazon and Yelp
    share theirs), else None, no answer: `Task.score` counts it wrong and as no other class's prediction."""
    if task.kind == other_meta["kind"] == "classification" and other_meta["label_names"][index] in task.label_names:
        return task.label_names.index(other_meta["label_names"][index])
    return None


def read_test_rows(tasks: dict[str, Task], home: str, d: TaskData) -> list[dict[str, Example]]:
    """Each test example of task `home` as every one of `tasks` reading its row reads it (in `tasks`' order): as
    `crpt bank predict` offers a row (`reads_row`, then `parse_inputs`); `home` reads it as the example itself."""
    parsed: dict[tuple[str, str], list[Example]] = {}  # (task, where the row was read) -> its examples

    def read(name: str, where: str, row: dict) -> list[Example]:
        if (name, where) not in parsed:
            try:
                parsed[name, where] = tasks[name].parse_inputs(row, where) if tasks[name].reads_row(row) else []
            except DataError:  # the fields are there but hold what this task cannot read
                parsed[name, where] = []
        return parsed[name, where]

    sources = [d.test_rows[example] for example in d.test]
    return [{name: example if name == home else read(name, s.where, s.row)[s.k] for name in tasks
             if name == home or len(read(name, s.where, s.row)) > s.k} for example, s in zip(d.test, sources)]


def task_free_answers(bank: PromptBank, names: list[str], data: dict, backbone: Backbone, aware: dict[str, list[int]],
                      cache: dict, router: str = "mahalanobis") -> dict[str, list[tuple[str, int]]]:
    """Every seen task's test examples answered as `crpt bank predict` without a task answers their rows: the entry
    of `names` each is routed to, and its answer (an index in that entry's own task).

    Like `route`, an example is routed among the entries reading its row (`read_test_rows`), each compared with
    the row as it reads it, and the entry chosen answers its own reading: on a seq2seq or decoder backbone a
    task's source names the task and its candidates are its labels. `aware` holds each task's task-aware answers,
    reused where an example is routed home; `cache` keeps the test inputs' features (`reading_features`) between calls.
    """
    contenders = bank_contenders(bank, names)
    tasks = {name: task_from_meta(bank.get(name).meta, bank.path / name) for name in names}
    out = {}
    for name in names:
        readings = read_test_rows(tasks, name, data[name])
        routed = [chosen for chosen, _ in route_readings(backbone, readings, contenders, router, bank.path, cache=cache,
                                                         keys=[(name, i) for i in range(len(readings))])]
        answers = list(aware[name])
        for other in names:
            away = [i for i, n in enumerate(routed) if n == other != name]  # routed home: the task-aware answer stands
            if away:
                for i, answer in zip(away, predict_from_bank(bank, other, [readings[i][other] for i in away], backbone)):
                    answers[i] = answer
        out[name] = list(zip(routed, answers))
    return out


def task_free_scores(bank: PromptBank, names: list[str], data: dict, backbone: Backbone, aware: dict[str, list[int]],
                     cache: dict, router: str = "mahalanobis") -> tuple[dict, dict] | None:
    """Every seen task's test score from `task_free_answers` (None if an entry is missing or holds no route state):
    another entry's answer counts where both tasks name it (Amazon and Yelp share labels), else none (`answer_as`).
    Returns (scores, confusion)."""
    if not all(name in bank and bank.get(name).route is not None for name in names):
        return None  # a strategy that writes its entries only at the end of the stream, or entries made before routing
    metas = {name: bank.get(name).meta for name in names}
    scores, confusion = {}, {}
    for name, answered in task_free_answers(bank, names, data, backbone, aware, cache, router).items():
        d = data[name]
        scores[name] = d.task.score(d.test, [a if n == name else answer_as(d.task, metas[n], a) for n, a in answered])
        confusion[name] = {other: sum(n == other for n, _ in answered) for other in names}
    return scores, confusion
