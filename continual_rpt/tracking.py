"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through Accelerate's tracking API.

`crpt train` and `crpt run` open one tracker for the whole command (`report_to`, none by default);
while it is open, the learner reports each training step's loss and learning rates and each dev
evaluation, and the run each task's scores (one row of the accuracy matrix) and the final metrics.
Every value is logged at one step counter that counts training steps across the whole command,
so a stream's tasks follow each other on one axis (Weights & Biases requires a rising step).
Nothing opens a network connection unless the user chose wandb (or pointed MLflow at a server).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
INSTALL = {"tensorboard": "'continual-rpt[tracking]'", "wandb": "wandb", "mlflow": "mlflow"}  # what to install when a tracker's package is missing


class _Open:
    """The tracker of the command that is running, and the training steps it has counted."""

    def __init__(self, accelerator, step: int) -> None:
        self.accelerator, self.step = accelerator, step


_open: list[_Open] = []  # at most one: set by `session`, read by `step_done` and `log`, so the learner needs no tracker passed down


def check_report_to(report_to: str) -> None:
    """Refuse an unknown tracker, or one whose package is not installed, before any work."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to: {report_to!r} is not one of {', '.join(REPORT_TO)}")
    if report_to == "none":
        return
    try:
        from accelerate.tracking import get_available_trackers
    except ImportError as err:
        raise ValueError(f"report_to {report_to}: needs the tracking extra ({err}); pip install 'continual-rpt[tracking]'") from None
    if report_to not in [str(t) for t in get_available_trackers()]:
        raise ValueError(f"report_to {report_to}: its package is not installed; pip install {INSTALL[report_to]}")


def flat(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested configuration as one level of `a.b.c` keys with scalar values (what trackers take as hyperparameters)."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flat(item, f"{name}.{i}."))
        else:
            out[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return out


@contextmanager
def session(report_to: str, folder: Path, run_name: str, config: dict, step: int = 0):
    """While open, `log` and `step_done` report to `report_to` (files under `folder` for TensorBoard); none: a no-op.

    `step`: training steps a resumed run kept (its finished tasks'); counting continues after them, and
    TensorBoard drops whatever a killed process logged after them (SummaryWriter's purge_step).
    """
    check_report_to(report_to)
    if report_to == "none":
        yield
        return
    from accelerate import Accelerator

    accelerator = Accelerator(log_with=report_to, project_dir=folder)
    accelerator.init_trackers(run_name, config=flat(config), init_kwargs={"tensorboard": {"purge_step": step + 1}})
    _open.append(_Open(accelerator, step))
    try:
        yield
    finally:
        _open.pop()
        accelerator.end_training()


def steps() -> int | None:
    """Training steps the open tracker has counted (None when none is open): where a resumed run continues."""
    return _open[-1].step if _open else None


def step_done(values: dict[str, float]) -> None:
    """One training step done: count it and log `values` (loss, learning rates) at it."""
    for tracker in _open:
        tracker.step += 1
        tracker.accelerator.log(values, step=tracker.step)


def log(values: dict[str, float | str]) -> None:
    """Log `values` (scores, metrics; text for strings) at the current step of the open tracker, if any."""
    for tracker in _open:
        tracker.accelerator.log(values, step=tracker.step)
