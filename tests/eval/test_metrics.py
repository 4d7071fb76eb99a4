"""The answer metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from tuner.eval.metrics import (
    anls,
    bleu,
    box_accuracy,
    box_iou,
    choice_accuracy,
    choice_letter,
    exact_match,
    iou,
    levenshtein,
    metrics_for,
    normalise,
    normalised_match,
    parse_boxes,
    rouge_l,
    score_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Answer is TWO.", "answer is 2"),
        ("1,000 dollars", "1000 dollars"),
        ("3.0", "3"),
        ("It is 3.50 m!", "it is 3.50 m"),
        ("A red square.", "red square"),
    ],
)
def test_normalise(text, expected):
    assert normalise(text) == expected


def test_exact_and_normalised_match():
    assert exact_match(" Red. ", ["Red."]) == 1.0
    assert exact_match("red", ["Red."]) == 0.0
    assert normalised_match("red", ["Red."]) == 1.0
    assert normalised_match("two apples", ["blue", "2 apples"]) == 1.0  # the best reference counts
    assert normalised_match("three apples", ["2 apples"]) == 0.0


def test_anls():
    assert levenshtein("kitten", "sitting") == 3
    # 3 edits over 7 characters: 1 - 3/7.
    assert anls("kitten", ["sitting"]) == pytest.approx(4 / 7)
    assert anls("Kitten ", ["KITTEN"]) == 1.0  # case and outer whitespace do not count
    assert anls("abc", ["xyz"]) == 0.0  # distance 1.0 >= 0.5
    assert anls("abcd", ["abxy"]) == 0.0  # distance exactly 0.5 scores 0
    assert anls("", [""]) == 1.0


def test_choice_accuracy():
    assert [choice_letter(text) for text in ["B", "(C) a dog", "D. cat", "The answer is A.", "Apple"]] == [
        "B",
        "C",
        "D",
        "A",
        None,
    ]
    assert choice_accuracy("(B) a cat", ["B"]) == 1.0
    assert choice_accuracy("Answer: b", ["B."]) == 1.0
    assert choice_accuracy("C", ["B"]) == 0.0
    assert choice_accuracy("I do not know", ["B"]) == 0.0


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("I think the answer is B", "B"),  # the pronoun I is no option
        ("A cat is shown, so the answer is C", "C"),  # nor is the article A
        ("The answer is not A; the answer is (D).", "D"),  # the last answer phrase counts
        ("the answer is a cat", None),
        ("A cat.", None),
        ("A. a cat", "A"),
        ("(A) a cat", "A"),
        ("Correct option: b", "B"),
    ],
)
def test_choice_letter_of_sentences(answer, letter):
    assert choice_letter(answer) == letter
    assert choice_accuracy(answer, [letter or "E"]) == float(letter is not None)


def test_parse_boxes_in_each_family_convention():
    # Qwen2-VL: corner pairs (the box special tokens may or may not have been decoded).
    assert parse_boxes("<|box_start|>(10,20),(110,220)<|box_end|>") == [(10.0, 20.0, 110.0, 220.0)]
    assert parse_boxes("the cat(10, 20),(110, 220)") == [(10.0, 20.0, 110.0, 220.0)]
    # Qwen2.5-VL / Qwen3-VL: JSON bbox_2d lists, several objects, corners given in any order.
    text = '[{"bbox_2d": [5, 6, 50, 60], "label": "a"}, {"bbox_2d": [90, 80, 70, 60], "label": "b"}]'
    assert parse_boxes(text) == [(5.0, 6.0, 50.0, 60.0), (70.0, 60.0, 90.0, 80.0)]
    assert parse_boxes("no box here, 1 2 3 4") == []


def test_box_iou_and_accuracy():
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    reference = ['{"bbox_2d": [0, 0, 10, 10]}']
    assert box_iou("[0, 0, 10, 20]", reference) == pytest.approx(0.5)
    assert box_accuracy("[0, 0, 10, 20]", reference) == 1.0  # IoU 0.5 counts
    assert box_accuracy("[5, 5, 15, 15]", reference) == 0.0
    assert box_iou("a cat", reference) == 0.0
    # Two reference boxes: mean of the best IoU each; accuracy needs both.
    two = ["[0, 0, 10, 10] [20, 20, 30, 30]"]
    assert box_iou("[0, 0, 10, 10]", two) == pytest.approx(0.5)
    assert box_accuracy("[0, 0, 10, 10]", two) == 0.0


def test_rouge_l():
    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", ["The cat was on the mat."]) == pytest.approx(5 / 6)
    # LCS "a b" (2): P = 2/2, R = 2/4, F = 2 * 1 * 0.5 / 1.5.
    assert rouge_l("a b", ["a x b y"]) == pytest.approx(2 / 3)
    assert rouge_l("dog", ["cat"]) == 0.0


def test_bleu():
    assert bleu("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    # 1-grams 5/6; 2-grams 3/5 -> (3+1)/(5+1); 3-grams 1/4 -> 2/5; 4-grams 0/3 -> 1/4; equal lengths.
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(expected)
    # A short answer pays the brevity penalty exp(1 - 6/3); its 1-3-grams all match, 4-grams 0/0 -> 1.
    assert bleu("the cat sat", ["the cat sat on the mat"]) == pytest.approx(math.exp(1 - 2))
    assert bleu("dog", ["the cat"]) == 0.0


def test_auto_metrics_follow_the_reference():
    assert metrics_for("A red square.") == ("normalised_match", "exact_match", "anls", "rouge_l", "bleu")
    assert metrics_for("(B)") == ("choice_accuracy",)
    assert metrics_for('{"bbox_2d": [1, 2, 3, 4]}') == ("box_accuracy", "box_iou")
    assert score_answer("b", ["B"]) == {"choice_accuracy": 1.0}
    assert score_answer("Red", ["red"], ["exact_match", "anls"]) == {"exact_match": 0.0, "anls": 1.0}
