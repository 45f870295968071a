"""SuperGLUE metrics against values computed by hand."""

import random

import pytest
from sklearn.metrics import f1_score

from continual_rpt.tasks import Example, get_task
from continual_rpt.tasks.metrics import (
    accuracy,
    binary_f1,
    exact_match,
    macro_f1,
    max_over_golds,
    multirc_em,
    normalize_answer,
    token_f1,
)


def test_accuracy():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75


def test_macro_f1_three_classes_by_hand():
    golds = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    # class 0: tp 2 fp 0 fn 1 -> F1 = 4/5; class 1: tp 1 fp 1 fn 1 -> 2/4; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(preds, golds) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)


def test_macro_f1_counts_a_never_predicted_class_as_zero():
    # class 2 has golds but no predictions: F1 0; classes 0 and 1 are perfect.
    assert macro_f1([0, 1, 1], [0, 1, 2]) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_cb_macro_f1_averages_the_labels_present_as_evaluate_does():
    # Golds 0 1 0 1, predictions 0 1 1 1: label 0 tp 1 fp 0 fn 1 -> 2/3, label 1 tp 2 fp 1 fn 0 -> 4/5; label 2
    # appears nowhere, so evaluate's super_glue (scikit-learn, average="macro") leaves it out: 73.3, not 48.9.
    # Fails on main: it averaged over all three classes, label 2's undefined F1 as 0 (48.9).
    examples = [_classification(str(i), g) for i, g in enumerate([0, 1, 0, 1])]
    assert get_task("CB").score(examples, [0, 1, 1, 1])["macro_f1"] == pytest.approx(100 * (2 / 3 + 4 / 5) / 2)


def test_macro_f1_equals_scikit_learn_on_random_cases():
    rng = random.Random(0)
    for _ in range(300):
        n, classes = rng.randint(1, 12), rng.randint(1, 4)
        golds, preds = [rng.randrange(classes) for _ in range(n)], [rng.randrange(classes) for _ in range(n)]
        assert macro_f1(preds, golds) == pytest.approx(f1_score(golds, preds, average="macro"))


def test_binary_f1_by_hand():
    golds = [1, 1, 1, 0, 0]
    preds = [1, 1, 0, 1, 0]
    # tp 2, fp 1, fn 1 -> precision 2/3, recall 2/3 -> F1 2/3
    assert binary_f1(preds, golds) == pytest.approx(2 / 3)
    assert binary_f1([0, 0], [0, 0]) == 0.0  # no positives anywhere: undefined, counted as 0


def test_multirc_em_one_of_two_questions_wrong():
    groups = ["p0/q0", "p0/q0", "p0/q0", "p0/q1", "p0/q1"]
    golds = [1, 0, 1, 0, 1]
    preds = [1, 0, 1, 1, 1]  # q0 all right, q1 has one wrong answer option
    assert multirc_em(preds, golds, groups) == 0.5


def test_normalize_answer_drops_case_punctuation_and_articles():
    assert normalize_answer("  The Cat's  hat, a Red one!") == "cats hat red one"
    assert normalize_answer("Anthem") == "anthem"  # "an" inside a word is not an article


def test_token_f1_partial_overlap_by_hand():
    # tokens "barack obama" vs "obama jr": 1 common -> precision 1/2, recall 1/2 -> F1 1/2
    assert token_f1("Barack Obama", "Obama Jr.") == pytest.approx(0.5)
    # "the" is dropped: "new york city" vs "new york": precision 2/3, recall 1 -> F1 0.8
    assert token_f1("New York City", "the New York") == pytest.approx(0.8)
    assert token_f1("Paris", "London") == 0.0


def test_exact_match_and_max_over_golds():
    assert exact_match("the Blues", "Blues") == 1.0
    assert max_over_golds(exact_match, "Chelsea FC", ["Chelsea", "Chelsea F.C."]) == 1.0
    assert max_over_golds(token_f1, "Chelsea", ["Blues", "Chelsea FC"]) == pytest.approx(2 / 3)


def test_metrics_reject_mismatched_lengths():
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        accuracy([], [])


def _classification(uid: str, label: int, group: str = "") -> Example:
    return Example(uid, (("a", "b"),), "src", ("no", "yes"), label, group=group)


def test_cb_score_is_mean_of_accuracy_and_macro_f1_in_percent():
    cb = get_task("CB")
    examples = [_classification(str(i), g) for i, g in enumerate([0, 0, 0, 1, 1, 2])]
    scores = cb.score(examples, [0, 0, 1, 1, 2, 2])
    f1 = 100 * (4 / 5 + 1 / 2 + 2 / 3) / 3
    assert scores == pytest.approx({"accuracy": 100 * 4 / 6, "macro_f1": f1, "score": (100 * 4 / 6 + f1) / 2})


def test_multirc_score():
    golds, groups = [1, 0, 1, 0], ["q0", "q0", "q1", "q1"]
    examples = [_classification(str(i), gold, group) for i, (gold, group) in enumerate(zip(golds, groups))]
    scores = get_task("MultiRC").score(examples, [1, 0, 1, 1])
    # tp 2 fp 1 fn 0 -> F1a 4/5; q0 right, q1 wrong -> em 50
    assert scores == pytest.approx({"f1a": 80.0, "em": 50.0, "score": 65.0})


def test_record_score_takes_the_best_gold():
    candidates = ("Chelsea", "the Blues", "Mourinho")
    first = Example("r/0", (), "src", candidates, 0, group="0", answers=("Chelsea", "the Blues"))
    second = Example("r/1", (), "src", candidates, 2, group="1", answers=("Jose Mourinho",))
    # query 0: "the Blues" matches the second gold -> em 1, f1 1
    assert get_task("ReCoRD").score([first], [1]) == pytest.approx({"f1": 100.0, "em": 100.0, "score": 100.0})
    # query 1 predicted "Mourinho": em 0, f1 2/3 (precision 1, recall 1/2)
    scores = get_task("ReCoRD").score([first, second], [1, 2])
    assert scores == pytest.approx({"f1": 100 * (1 + 2 / 3) / 2, "em": 50.0, "score": 100 * (1 + 2 / 3 + 1) / 4})


def test_score_rejects_bad_input():
    rte = get_task("RTE")
    with pytest.raises(ValueError, match="predictions"):
        rte.score([_classification("0", 1)], [])
    with pytest.raises(ValueError, match="out of range"):
        rte.score([_classification("0", 1)], [2])
    with pytest.raises(ValueError, match="unlabeled"):
        rte.score([_classification("0", -1)], [0])
