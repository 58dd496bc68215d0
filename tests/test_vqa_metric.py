"""VQA accuracy: answer normalisation, leave-one-out averaging, reports and the majority baseline."""

from __future__ import annotations

import pytest

from blip_core.eval.vqa import majority_answer_baseline, normalize_answer, vqa_accuracy, vqa_report


@pytest.mark.parametrize("raw, normal", [
    ("Yes", "yes"),
    ("Two", "2"),
    ("the red one.", "red 1"),
    ("A dog", "dog"),
    ("an apple", "apple"),
    ("dont know", "don't know"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("red, blue", "red blue"),
    ("black/white", "black white"),
    ("  Left\t", "left"),
    ("none", "0"),
    ("10:30", "10:30"),
])
def test_normalization(raw, normal):
    assert normalize_answer(raw) == normal


def test_leave_one_out_accuracy_worked_by_hand():
    ten = lambda k: ["red"] * k + ["blue"] * (10 - k)  # noqa: E731
    # k matches out of 10: the k subsets without a matching annotator see k-1, the other 10-k see k
    assert vqa_accuracy("red", ten(0)) == 0.0
    assert vqa_accuracy("red", ten(1)) == pytest.approx(0.3)  # (1 * 0 + 9 * 1/3) / 10
    assert vqa_accuracy("red", ten(2)) == pytest.approx(0.6)  # (2 * 1/3 + 8 * 2/3) / 10, not 2/3
    assert vqa_accuracy("red", ten(3)) == pytest.approx(0.9)  # (3 * 2/3 + 7 * 1) / 10
    assert vqa_accuracy("red", ten(4)) == 1.0
    assert vqa_accuracy("blue", ten(3)) == 1.0
    assert vqa_accuracy("green", ten(5)) == 0.0


def test_matching_is_after_normalization():
    answers = ["2", "two", "Two.", "2", "3", "3", "three", "2 ", "4", "the 2"]
    assert vqa_accuracy("two", answers) == 1.0  # six annotators said 2 in some form
    assert vqa_accuracy("3", answers) == pytest.approx(0.9)
    assert vqa_accuracy("four", answers) == pytest.approx(0.3)
    assert vqa_accuracy("yes", ["yes"]) == pytest.approx(1 / 3)  # one answer: no subsets
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_report_overall_and_per_kind():
    answers = [["yes"] * 10, ["no"] * 8 + ["yes"] * 2, ["red"] * 2 + ["blue"] * 8, ["2"] * 10, []]
    kinds = ["exists", "exists", "color", "count", "count"]
    report = vqa_report(["yes", "yes", "red", "two", "3"], answers, kinds)
    assert report["questions"] == 4 and report["unanswered"] == 1
    assert report["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.6 + 1.0) / 4)
    assert report["per_kind"] == {
        "color": {"accuracy": pytest.approx(60.0), "questions": 1},
        "count": {"accuracy": 100.0, "questions": 1},
        "exists": {"accuracy": pytest.approx(80.0), "questions": 2},
    }
    with pytest.raises(ValueError):
        vqa_report(["yes"], answers, kinds)


def test_majority_answer_baseline():
    train = [["yes"] * 10, ["yes"] * 9 + ["no"], ["no"] * 10, ["red"] * 10, ["red"] * 6 + ["blue"] * 4,
             ["2"] * 5 + ["two"] * 5]
    train_kinds = ["exists", "exists", "exists", "color", "color", "count"]
    test = [["no"] * 10, ["yes"] * 10, ["blue"] * 10, ["red"] * 2 + ["blue"] * 8, ["3"] * 10]
    test_kinds = ["exists", "exists", "color", "color", "count"]
    base = majority_answer_baseline(train, test, test_kinds, train_kinds)
    # "yes" 19, "red" 16, "no" 11, "2" 10 (after normalisation): always "yes"
    assert base["answer"] == "yes"
    assert base["accuracy"] == pytest.approx(100 * 1 / 5)
    assert base["per_kind"]["exists"]["accuracy"] == 50.0 and base["per_kind"]["color"]["accuracy"] == 0.0
    prior = base["per_kind_prior"]
    assert prior["answers"] == {"color": "red", "count": "2", "exists": "yes"}
    assert prior["accuracy"] == pytest.approx(100 * (0 + 1 + 0 + 0.6 + 0) / 5)
    assert prior["per_kind"]["color"]["accuracy"] == pytest.approx(30.0)
