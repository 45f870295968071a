"""Task metrics as pure functions over plain lists: fractions in [0, 1] (Matthews correlation in [-1, 1]).

`classification_metrics` reads a custom task's `metric:` (see the README's custom tasks).
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from functools import partial

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
CLASSIFICATION_METRICS = "accuracy, macro_f1, mcc, f1:<class>, f1_mean:<class>,<class>… (or several joined by '+')"


def _check(predictions: Sequence, golds: Sequence) -> None:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} golds")
    if not golds:
        raise ValueError("cannot compute a metric over zero examples")


def accuracy(predictions: Sequence[int], golds: Sequence[int]) -> float:
    """Fraction of predictions equal to the gold label."""
    _check(predictions, golds)
    return sum(p == g for p, g in zip(predictions, golds)) / len(golds)


def _f1(tp: int, fp: int, fn: int) -> float:
    # 2tp / (2tp + fp + fn) is the harmonic mean of precision and recall, and 0 when undefined.
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def binary_f1(predictions: Sequence[int], golds: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (MultiRC's F1a over all answer options)."""
    _check(predictions, golds)
    tp = sum(p == positive and g == positive for p, g in zip(predictions, golds))
    fp = sum(p == positive and g != positive for p, g in zip(predictions, golds))
    fn = sum(p != positive and g == positive for p, g in zip(predictions, golds))
    return _f1(tp, fp, fn)


def macro_f1(predictions: Sequence[int], golds: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the labels present in golds or predictions, as huggingface/evaluate's
    super_glue CB (scikit-learn's f1_score, average="macro", whose labels are the sorted union of both)."""
    _check(predictions, golds)
    # Written out rather than calling f1_score: it is equal (tests/test_metrics.py checks random cases) and a
    # bootstrap scores 1000 resamples per task, where f1_score's input checks cost ~3 ms a call. A label
    # present somewhere has 2tp + fp + fn > 0, so no F1 here is undefined.
    present = set(golds) | set(predictions) - {None}  # None is no answer (Task.score), not a label
    return sum(binary_f1(predictions, golds, positive=c) for c in present) / len(present)


def mean_f1(predictions: Sequence[int], golds: Sequence[int], classes: Sequence[int]) -> float:
    """Unweighted mean of the F1 of the named classes only (TweetEval stance: favor and against), as f1_score(labels=classes, average="macro")."""
    _check(predictions, golds)
    return sum(binary_f1(predictions, golds, positive=c) for c in classes) / len(classes)


def matthews(predictions: Sequence[int | None], golds: Sequence[int]) -> float:
    """Matthews correlation coefficient (scikit-learn's matthews_corrcoef; 0 where it is undefined); no answer (None) is a class of its own."""
    # Imported here: scikit-learn takes ~1 s to import, and only a task scored by MCC needs it.
    from sklearn.metrics import matthews_corrcoef

    _check(predictions, golds)
    return float(matthews_corrcoef(golds, [-1 if p is None else p for p in predictions]))


def classification_metrics(spec: str, label_names: Sequence[str]) -> dict[str, Callable[[Sequence, Sequence], float]]:
    """The metrics that `spec` (a custom task's `metric:`, terms joined by '+') names, each over class indices, by term."""
    chosen: dict[str, Callable[[Sequence, Sequence], float]] = {}
    for term in spec.split("+"):
        name, _, named = (part.strip() for part in term.partition(":"))
        classes = [c.strip() for c in named.split(",")] if named else []
        term = f"{name}:{','.join(classes)}" if classes else name  # the key the scores are stored under, spaces dropped
        unknown = [c for c in classes if c not in label_names]
        if unknown:
            raise ValueError(f"metric {spec!r}: class {unknown[0]!r} is not one of label_names ({', '.join(label_names)})")
        indices = [label_names.index(c) for c in classes]
        if name in ("accuracy", "macro_f1", "mcc") and not classes:
            chosen[term] = {"accuracy": accuracy, "macro_f1": macro_f1, "mcc": matthews}[name]
        elif name == "f1" and len(classes) == 1:
            chosen[term] = partial(binary_f1, positive=indices[0])
        elif name == "f1_mean" and classes:
            chosen[term] = partial(mean_f1, classes=tuple(indices))
        else:
            raise ValueError(f"metric must be one of {CLASSIFICATION_METRICS}, got {spec!r}")
    return chosen


def multirc_em(predictions: Sequence[int], golds: Sequence[int], groups: Sequence[str]) -> float:
    """Fraction of groups (questions) whose every answer option is predicted correctly."""
    _check(predictions, golds)
    if len(groups) != len(golds):
        raise ValueError(f"{len(groups)} groups but {len(golds)} golds")
    all_correct: dict[str, bool] = defaultdict(lambda: True)
    for p, g, group in zip(predictions, golds, groups):
        all_correct[group] = all_correct[group] and p == g
    return sum(all_correct.values()) / len(all_correct)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 between two normalised answers."""
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def max_over_golds(metric: Callable[[str, str], float], prediction: str, golds: Sequence[str]) -> float:
    """The best value of `metric` against any of the gold answers (ReCoRD allows several)."""
    if not golds:
        raise ValueError("no gold answers to compare with")
    return max(metric(prediction, gold) for gold in golds)
