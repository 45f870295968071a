"""The eight SuperGLUE tasks: row parsers for the official jsonl and the Hugging Face hub, and scorers."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import mean

from . import metrics
from .base import DataError, Example, Parser, Scorer, Task

_NO_YES = ("no", "yes")
_COPA_QUESTIONS = {"cause": "What was the cause?", "effect": "What happened as a result?"}
_MULTIRC_MARKUP = re.compile(r"<b>Sent \d+: </b>|<br\s*/?>")


# --- field access with errors that point at the offending row ---------------------------------


def _split_of(where: str) -> str:
    """The split named by the file stem of `where` ("…/val.jsonl:12" -> "val"), used in uids."""
    return Path(where.rsplit(":", 1)[0]).stem


def _get(row: dict, key: str, where: str, prefix: str = "") -> object:
    if not isinstance(row, dict):
        raise DataError(f"{where}: field '{prefix.rstrip('.')}' must be an object, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"{where}: missing field '{prefix}{key}'")
    return row[key]


def _typed(row: dict, key: str, where: str, prefix: str, kind: type, kind_name: str):
    value = _get(row, key, where, prefix)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field '{prefix}{key}' must be {kind_name}, got {type(value).__name__}")
    return value


def _text(row: dict, key: str, where: str, prefix: str = "") -> str:
    return _typed(row, key, where, prefix, str, "a string")


def _object(row: dict, key: str, where: str, prefix: str = "") -> dict:
    return _typed(row, key, where, prefix, dict, "an object")


def _list(row: dict, key: str, where: str, prefix: str = "") -> list:
    return _typed(row, key, where, prefix, list, "a list")


def _label(row: dict, where: str, values: dict, prefix: str = "") -> int:
    """Map an official label value to its index; -1 when the row has no label (test/unlabeled files)."""
    if "label" not in row:
        return -1
    value = row["label"]
    if not isinstance(value, (str, int)) or value not in values:
        raise DataError(f"{where}: unknown value {value!r} in field '{prefix}label' (expected one of {list(values)})")
    return values[value]


def _hub_label(row: dict, where: str, n_labels: int) -> int:
    """Check a hub ClassLabel index (-1 = unlabeled)."""
    value = _get(row, "label", where)
    if not isinstance(value, int) or not -1 <= value < n_labels:
        raise DataError(f"{where}: unknown value {value!r} in field 'label' (expected -1..{n_labels - 1})")
    return value


def _index_map(names: Sequence[object]) -> dict:
    return {name: i for i, name in enumerate(names)}


LabelReader = Callable[[dict, str], int]


def _official(values: dict) -> LabelReader:
    """Label reader for the official jsonl encoding (`values` maps each label value to its index)."""
    return lambda row, where: _label(row, where, values)


def _hub(n_labels: int) -> LabelReader:
    """Label reader for the hub's ClassLabel indices."""
    return lambda row, where: _hub_label(row, where, n_labels)


# --- example builders shared by the official and the hub parsers ------------------------------


def _boolq(uid: str, question: str, passage: str, label: int) -> Example:
    return Example(uid, ((question, passage),), f"boolq question: {question} passage: {passage}", _NO_YES, label)


def _entailment(task: str, uid: str, premise: str, hypothesis: str, label: int, candidates: tuple[str, ...]) -> Example:
    source = f"{task.lower()} premise: {premise} hypothesis: {hypothesis}"
    return Example(uid, ((premise, hypothesis),), source, candidates, label)


def _copa(uid: str, premise: str, choices: tuple[str, str], question: str, label: int, where: str) -> Example:
    if question not in _COPA_QUESTIONS:
        raise DataError(f"{where}: field 'question' must be 'cause' or 'effect', got {question!r}")
    prompt = f"{premise} {_COPA_QUESTIONS[question]}"
    pairs = tuple((prompt, choice) for choice in choices)
    return Example(uid, pairs, f"copa premise: {premise} question: {question}", choices, label)


def _clean_paragraph(text: str) -> str:
    # Older MultiRC releases mark sentences with "<b>Sent N: </b>" and "<br>"; models should see plain text.
    return " ".join(_MULTIRC_MARKUP.sub(" ", text).split())


def _multirc(uid: str, group: str, paragraph: str, question: str, answer: str, label: int) -> Example:
    source = f"multirc question: {question} answer: {answer} paragraph: {paragraph}"
    return Example(uid, ((paragraph, f"{question} {answer}"),), source, _NO_YES, label, group=group)


def _record_passage(text: str) -> str:
    # Highlights follow the article as "\n@highlight\n<summary>"; join them as sentences.
    parts = [part.strip() for part in text.split("@highlight") if part.strip()]
    return " ".join(part if part[-1] in ".!?\"'" else f"{part}." for part in parts)


def _record(
    uid: str, group: str, passage: str, query: str, entities: Iterable[str], answers: Iterable[str], where: str
) -> Example:
    candidates = tuple(dict.fromkeys(entities))  # dedupe, keeping first-mention order
    if not candidates:
        raise DataError(f"{where}: the passage has no entities to choose from")
    if "@placeholder" not in query:
        raise DataError(f"{where}: query {query!r} has no @placeholder")
    golds = tuple(sorted(set(answers)))
    label = next((i for i, candidate in enumerate(candidates) if candidate in golds), -1)
    if golds and label < 0:
        raise DataError(f"{where}: none of the answers {list(golds)} is an entity of the passage")
    passage = _record_passage(passage)
    pairs = tuple((passage, query.replace("@placeholder", candidate)) for candidate in candidates)
    source = f"record query: {query} passage: {passage}"
    return Example(uid, pairs, source, candidates, label, group=group, answers=golds)


def _wic(uid: str, word: str, sentence1: str, sentence2: str, label: int) -> Example:
    source = f"wic word: {word} sentence1: {sentence1} sentence2: {sentence2}"
    return Example(uid, ((f"{word}: {sentence1}", sentence2),), source, _NO_YES, label)


def _wsc(uid: str, text: str, span1: str, span2: str, label: int) -> Example:
    question = f'Does "{span2}" refer to "{span1}"?'
    return Example(uid, ((text, question),), f"wsc text: {text} question: {question}", _NO_YES, label)


# --- official jsonl parsers --------------------------------------------------------------------

_BOOL_LABELS = {False: 0, True: 1}
_INT_LABELS = {0: 0, 1: 1}


def _uid(task: str, row: dict, where: str) -> str:
    return f"{task}/{_split_of(where)}/{_get(row, 'idx', where)}"


# BoolQ, CB, RTE, COPA and WiC rows have the same fields in both formats; only the label encoding differs.


def _boolq_parser(label_of: LabelReader) -> Parser:
    def parse(row: dict, where: str) -> list[Example]:
        question, passage = _text(row, "question", where), _text(row, "passage", where)
        return [_boolq(_uid("BoolQ", row, where), question, passage, label_of(row, where))]

    return parse


def _entailment_parser(task: str, label_names: tuple[str, ...], label_of: LabelReader) -> Parser:
    def parse(row: dict, where: str) -> list[Example]:
        premise, hypothesis = _text(row, "premise", where), _text(row, "hypothesis", where)
        return [_entailment(task, _uid(task, row, where), premise, hypothesis, label_of(row, where), label_names)]

    return parse


def _copa_parser(label_of: LabelReader) -> Parser:
    def parse(row: dict, where: str) -> list[Example]:
        choices = (_text(row, "choice1", where), _text(row, "choice2", where))
        premise, question = _text(row, "premise", where), _text(row, "question", where)
        return [_copa(_uid("COPA", row, where), premise, choices, question, label_of(row, where), where)]

    return parse


def _wic_parser(label_of: LabelReader) -> Parser:
    def parse(row: dict, where: str) -> list[Example]:
        word, sentence1, sentence2 = (_text(row, key, where) for key in ("word", "sentence1", "sentence2"))
        return [_wic(_uid("WiC", row, where), word, sentence1, sentence2, label_of(row, where))]

    return parse


def _parse_multirc(row: dict, where: str) -> list[Example]:
    split, paragraph_idx = _split_of(where), _get(row, "idx", where)
    passage = _object(row, "passage", where)
    paragraph = _clean_paragraph(_text(passage, "text", where, "passage."))
    examples = []
    for qi, question in enumerate(_list(passage, "questions", where, "passage.")):
        q_prefix = f"passage.questions[{qi}]."
        question_idx = _get(question, "idx", where, q_prefix)
        question_text = _text(question, "question", where, q_prefix)
        group = f"{paragraph_idx}/{question_idx}"
        for ai, answer in enumerate(_list(question, "answers", where, q_prefix)):
            a_prefix = f"{q_prefix}answers[{ai}]."
            uid = f"MultiRC/{split}/{paragraph_idx}/q{question_idx}/a{_get(answer, 'idx', where, a_prefix)}"
            answer_text, label = _text(answer, "text", where, a_prefix), _label(answer, where, _INT_LABELS, a_prefix)
            examples.append(_multirc(uid, group, paragraph, question_text, answer_text, label))
    return examples


def _span(span: dict, where: str, prefix: str) -> tuple[int, int]:
    start, end = _get(span, "start", where, prefix), _get(span, "end", where, prefix)
    if not isinstance(start, int) or not isinstance(end, int):
        raise DataError(f"{where}: fields '{prefix}start' and '{prefix}end' must be integers")
    return start, end


def _parse_record(row: dict, where: str) -> list[Example]:
    split, passage_idx = _split_of(where), _get(row, "idx", where)
    passage = _object(row, "passage", where)
    text = _text(passage, "text", where, "passage.")
    entity_list = _list(passage, "entities", where, "passage.")
    spans = [_span(span, where, f"passage.entities[{i}].") for i, span in enumerate(entity_list)]
    # Official entity spans have an inclusive end offset.
    entities = [text[start : end + 1] for start, end in sorted(spans)]
    examples = []
    for qi, qa in enumerate(_list(row, "qas", where)):
        prefix = f"qas[{qi}]."
        query_idx = _get(qa, "idx", where, prefix)
        # Test rows carry no answers: such queries are unlabeled.
        gold = _list(qa, "answers", where, prefix) if "answers" in qa else []
        answers = [_text(answer, "text", where, f"{prefix}answers[{ai}].") for ai, answer in enumerate(gold)]
        uid = f"ReCoRD/{split}/{passage_idx}/q{query_idx}"
        examples.append(_record(uid, str(query_idx), text, _text(qa, "query", where, prefix), entities, answers, where))
    return examples


def _parse_wsc(row: dict, where: str) -> list[Example]:
    target = _object(row, "target", where)
    span1, span2 = _text(target, "span1_text", where, "target."), _text(target, "span2_text", where, "target.")
    return [_wsc(_uid("WSC", row, where), _text(row, "text", where), span1, span2, _label(row, where, _BOOL_LABELS))]


# --- Hugging Face aps/super_glue parsers ---------------------------------------------------------


def _hub_multirc(row: dict, where: str) -> list[Example]:
    idx = _object(row, "idx", where)
    p, q, a = (_get(idx, key, where, "idx.") for key in ("paragraph", "question", "answer"))
    paragraph = _clean_paragraph(_text(row, "paragraph", where))
    question, answer = _text(row, "question", where), _text(row, "answer", where)
    uid = f"MultiRC/{_split_of(where)}/{p}/q{q}/a{a}"
    return [_multirc(uid, f"{p}/{q}", paragraph, question, answer, _hub_label(row, where, 2))]


def _span_texts(spans: object, where: str) -> list[str]:
    # `datasets` returns a sequence-of-dict feature as a dict of lists; other exports keep a list of dicts.
    if isinstance(spans, dict):
        return list(_list(spans, "text", where, "entity_spans."))
    if isinstance(spans, list):
        return [_text(span, "text", where, "entity_spans[].") for span in spans]
    raise DataError(f"{where}: field 'entity_spans' must be a list or an object")


def _hub_record(row: dict, where: str) -> list[Example]:
    idx = _object(row, "idx", where)
    passage_idx, query_idx = _get(idx, "passage", where, "idx."), _get(idx, "query", where, "idx.")
    # entity_spans is ordered by position, unlike the alphabetically sorted `entities`.
    entities = _span_texts(_get(row, "entity_spans", where), where)
    answers = _list(row, "answers", where)
    uid = f"ReCoRD/{_split_of(where)}/{passage_idx}/q{query_idx}"
    passage, query = _text(row, "passage", where), _text(row, "query", where)
    return [_record(uid, str(query_idx), passage, query, entities, answers, where)]


def _hub_wsc(row: dict, where: str) -> list[Example]:
    span1, span2 = _text(row, "span1_text", where), _text(row, "span2_text", where)
    return [_wsc(_uid("WSC", row, where), _text(row, "text", where), span1, span2, _hub_label(row, where, 2))]


# --- scorers (fractions; Task.score turns them into percent) -----------------------------------


def _golds(examples: Sequence[Example]) -> list[int]:
    return [example.label for example in examples]


def _score_accuracy(examples: Sequence[Example], predictions: Sequence[int]) -> dict[str, float]:
    return {"accuracy": metrics.accuracy(predictions, _golds(examples))}


def _score_cb(examples: Sequence[Example], predictions: Sequence[int]) -> dict[str, float]:
    golds = _golds(examples)
    return {"accuracy": metrics.accuracy(predictions, golds), "macro_f1": metrics.macro_f1(predictions, golds)}


def _score_multirc(examples: Sequence[Example], predictions: Sequence[int]) -> dict[str, float]:
    golds, groups = _golds(examples), [example.group for example in examples]
    return {"f1a": metrics.binary_f1(predictions, golds), "em": metrics.multirc_em(predictions, golds, groups)}


def _score_record(examples: Sequence[Example], predictions: Sequence[int]) -> dict[str, float]:
    texts = ["" if p is None else example.candidates[p] for example, p in zip(examples, predictions)]  # None: no answer
    return {
        name: mean(metrics.max_over_golds(metric, text, example.answers) for text, example in zip(texts, examples))
        for name, metric in (("f1", metrics.token_f1), ("em", metrics.exact_match))
    }


# --- the task registry ---------------------------------------------------------------------------

_CB_LABELS = ("entailment", "contradiction", "neutral")
_RTE_LABELS = ("entailment", "not_entailment")
_FALSE_TRUE = ("False", "True")
_ACCURACY = ("accuracy",)


def _entailment_task(name: str, label_names: tuple[str, ...], metric_names: tuple[str, ...], scorer: Scorer) -> Task:
    official = _entailment_parser(name, label_names, _official(_index_map(label_names)))
    hub = _entailment_parser(name, label_names, _hub(len(label_names)))
    return Task(name, "classification", label_names, metric_names, name.lower(), official, hub, scorer, ("premise", "hypothesis"))


SUPERGLUE: dict[str, Task] = {
    task.name: task
    for task in (
        Task("BoolQ", "classification", _FALSE_TRUE, _ACCURACY, "boolq",
             _boolq_parser(_official(_BOOL_LABELS)), _boolq_parser(_hub(2)), _score_accuracy, ("question", "passage")),
        _entailment_task("CB", _CB_LABELS, ("accuracy", "macro_f1"), _score_cb),
        Task("COPA", "choice", (), _ACCURACY, "copa", _copa_parser(_official(_INT_LABELS)), _copa_parser(_hub(2)), _score_accuracy,
             ("premise", "choice1", "choice2", "question")),
        Task(
            "MultiRC", "classification", _FALSE_TRUE, ("f1a", "em"), "multirc",
            _parse_multirc, _hub_multirc, _score_multirc, ("passage.text", "passage.questions"),
        ),
        Task("ReCoRD", "choice", (), ("f1", "em"), "record", _parse_record, _hub_record, _score_record,
             ("passage.text", "passage.entities", "qas")),
        _entailment_task("RTE", _RTE_LABELS, _ACCURACY, _score_accuracy),
        Task("WiC", "classification", _FALSE_TRUE, _ACCURACY, "wic",
             _wic_parser(_official(_BOOL_LABELS)), _wic_parser(_hub(2)), _score_accuracy, ("word", "sentence1", "sentence2")),
        # wsc.fixed repairs span texts that are not substrings of the text; the labels are unchanged.
        Task("WSC", "classification", _FALSE_TRUE, _ACCURACY, "wsc.fixed", _parse_wsc, _hub_wsc, _score_accuracy,
             ("text", "target.span1_text", "target.span2_text")),
    )
}


def get_task(name: str) -> Task:
    """Look a task up by name, case-insensitively ("rte" -> RTE)."""
    by_lower = {task_name.lower(): task for task_name, task in SUPERGLUE.items()}
    try:
        return by_lower[name.lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(SUPERGLUE)}") from None
