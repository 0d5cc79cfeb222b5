"""Tests for rewards.py and support/answers.py: answer judging, stage-1 outcome reward, box geometry, stage-2 grounding reward.

Every expected value is computed by hand; the arithmetic is in a comment where it is not obvious."""
import random

import pytest

import rewards
from rewards import (RewardWeights, box_area, box_intersection, box_iou, coverage, grounding_reward, l1_distance,
                     outcome_reward, stage2_reward)
from support import answers
from support.answers import accuracy, answer_index, choice_index, normalize_answer, same_answer, vote_key

CHOICES = ["red", "blue", "green", "yellow"]  # A, B, C, D; the correct one in these tests is B = blue


# ----------------------------------------------------------------------------- answers

@pytest.mark.parametrize("text, expected", [
    ("  Red  ", "red"),
    ("The   Red \n Car.", "red car"),
    ('"blue"', "blue"),
    ("'Left.'", "left"),            # quotes off, then the '.' now at the end
    ("(B)", "b"),
    ("[yes]!", "yes"),              # '!' off, then the brackets
    ("Yes!!", "yes"),
    ("An apple?", "apple"),
    ("a", "a"),                     # a lone letter is not an article
    ("Theater", "theater"),         # "the" only as a whole word
    ("(a) and (b)", "(a) and (b)"),  # not one surrounding pair: kept
    ("red (dark)", "red (dark)"),
    ("3.5", "3.5"),
    ("", ""),
    (" \n\t ", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("pred, expected", [
    ("B", 1),
    ("b", 1),
    ("(B)", 1),
    ("[B]", 1),
    ("B.", 1),
    ("B)", 1),
    ("B:", 1),
    ("Option B", 1),
    ("option b.", 1),
    ("B. blue", 1),
    ("(B) Blue.", 1),
    ("B the blue", 1),
    ("blue", 1),                    # the option text itself
    ("  The Blue. ", 1),
    ("B. red", None),               # letter B, text of option A: contradiction
    ("B. purple", None),
    ("E", None),                    # beyond 4 options
    ("(E) blue", None),             # E out of range, "(e) blue" is no option text
    ("", None),
    ("purple", None),
    ("bed", None),                  # not letter b followed by "ed"
    ("A", 0),
    ("D", 3),
    ("Yellow", 3),
])
def test_choice_index(pred, expected):
    assert choice_index(pred, CHOICES) == expected


def test_choice_index_article_reading():
    # "A red car": letter A + "red car" contradicts A ("blue car"), but the whole text, article
    # dropped, is option B's text.
    assert choice_index("A red car", ["blue car", "red car"]) == 1
    assert choice_index("A red car", ["red car", "blue car"]) == 0


@pytest.mark.parametrize("pred, answer, choices, expected", [
    # free-form: normalised exact match
    ("Red.", "red", None, 1.0),
    ("the red car", "Red car", None, 1.0),
    ("blue", "red", None, 0.0),
    ("red car", "red", None, 0.0),
    (None, "red", None, 0.0),
    ("", "", None, 0.0),            # an empty prediction is never right
    # multiple choice, answer given as the letter
    ("B", "B", CHOICES, 1.0),
    ("(b)", "B", CHOICES, 1.0),
    ("blue", "B", CHOICES, 1.0),
    ("B. Blue", "B", CHOICES, 1.0),
    ("A", "B", CHOICES, 0.0),
    ("B. red", "B", CHOICES, 0.0),  # contradiction: names no option
    ("red", "B", CHOICES, 0.0),
    ("E", "B", CHOICES, 0.0),
    (None, "B", CHOICES, 0.0),
    # answer given as the option text
    ("B", "blue", CHOICES, 1.0),
    ("Blue.", "blue", CHOICES, 1.0),
    ("C", "blue", CHOICES, 0.0),
    ("green", "Blue", CHOICES, 0.0),
    ("B", "(B)", CHOICES, 1.0),     # answer letter in brackets
    # duplicate option texts: "cat" names option A first, but it equals the correct option C's text
    ("cat", "C", ["cat", "dog", "Cat."], 1.0),
])
def test_accuracy(pred, answer, choices, expected):
    assert accuracy(pred, answer, choices) == expected


@pytest.mark.parametrize("answer", ["purple", "E"])
def test_accuracy_answer_not_an_option(answer):
    with pytest.raises(ValueError):
        accuracy("B", answer, CHOICES)


# V* style options: whole sentences that differ in one word or phrase
VSTAR = ["The color of the umbrella is yellow.", "The color of the umbrella is blue.",
         "The color of the umbrella is red.", "The color of the umbrella is white."]
REL = ["The dog is on the left side of the cat.", "The dog is on the right side of the cat."]


@pytest.mark.parametrize("pred, answer, expected", [
    # numbers compared by value
    ("3.0", "3", 1.0),
    ("3", "3.0", 1.0),
    ("3.00", "3", 1.0),
    ("1,000", "1000", 1.0),
    ("1000", "1,000", 1.0),
    ("50%", "50", 1.0),              # the '%' sign is dropped on both sides
    ("50", "50%", 1.0),
    ("0.5", "50%", 0.0),             # no conversion between fractions and percents
    ("3.5", "3", 0.0),
    ("-3", "3", 0.0),
    ("1,000", "100", 0.0),
    ("three", "3", 1.0),             # number words zero..twenty
    ("one", "1", 1.0),               # "one" counts only alone ...
    ("the red one", "1", 0.0),       # ... not as a pronoun
    # a number inside one short sentence
    ("There are 3 dogs.", "3", 1.0),
    ("There are three dogs.", "3", 1.0),
    ("I count 3 dogs in the picture", "3", 1.0),
    ("There are 4 dogs.", "3", 0.0),
    ("There are 3 or 4 dogs.", "3", 0.0),       # two numbers, and a listing word
    ("3 dogs and 2 cats", "3", 0.0),
    ("not 3", "3", 0.0),
    ("more than 3", "3", 0.0),                  # hedge
    ("at least 3", "3", 0.0),
    ("The 3rd dog", "3", 0.0),                  # an ordinal is not a number token
    ("There are 3. Or maybe 4", "3", 0.0),      # two sentences
    ("There are 3 dogs\nand 4 cats", "3", 0.0),
    ("I looked at every part of the picture very carefully and I can count 3 dogs", "3", 0.0),  # 16 words
    # a short reference ending a short one-sentence prediction
    ("The umbrella is yellow.", "yellow", 1.0),
    ("It is yellow", "yellow", 1.0),
    ("It's yellow.", "yellow", 1.0),
    ("It\u2019s yellow.", "yellow", 1.0),      # curly apostrophe
    ("The answer is yellow", "yellow", 1.0),
    ("Answer: yellow", "yellow", 1.0),
    ("The color of the umbrella in the picture is yellow.", "yellow", 1.0),
    ("It is on the left side", "the left side", 1.0),   # the reference's article is dropped
    ("The umbrella is not yellow.", "yellow", 0.0),     # negated
    ("It isn't yellow", "yellow", 0.0),
    ("not yellow", "yellow", 0.0),
    ("yellow or blue", "yellow", 0.0),                  # several candidates
    ("blue or yellow", "yellow", 0.0),
    ("It is blue and yellow", "yellow", 0.0),
    ("red, yellow", "yellow", 0.0),                     # a comma list
    ("The yellow umbrella", "yellow", 0.0),             # not at the end
    ("yellowish", "yellow", 0.0),                       # whole words only
    ("It is blue. No, yellow", "yellow", 0.0),          # two sentences
    ("I looked at every part of the picture very carefully and the umbrella is yellow", "yellow", 0.0),  # 16 words
    # yes / no opening a prediction
    ("Yes, the umbrella is yellow.", "yes", 1.0),
    ("Yes. It is.", "yes", 1.0),
    ("No, there is no dog.", "no", 1.0),
    ("The answer is no", "no", 1.0),
    ("Yes or no", "yes", 0.0),
    ("Yes, no", "yes", 0.0),
    ("No, it is yellow", "yes", 0.0),
    ("no", "No, the spots are on a banana.", 1.0),      # a reference opening with its verdict
    ("Yes", "No, the spots are on a banana.", 0.0),
    # a reference that is a sentence "... is P": the prediction states P
    ("tan", "The countertop is tan.", 1.0),
    ("It is tan", "The countertop is tan.", 1.0),
    ("blue", "The countertop is tan.", 0.0),
    ("tan", "The countertop is not tan.", 0.0),         # P = "not tan"
])
def test_accuracy_free_form_rules(pred, answer, expected):
    assert accuracy(pred, answer) == expected


@pytest.mark.parametrize("pred, answer, choices, expected", [
    # a letter anywhere it is explicit
    ("The answer is B", "B", CHOICES, 1.0),
    ("The answer is B.", "B", CHOICES, 1.0),
    ("the answer is b.", "B", CHOICES, 1.0),           # lower case when a mark or the end follows
    ("Answer: (B)", "B", CHOICES, 1.0),
    ("Answer: B", "B", CHOICES, 1.0),
    ("The correct option is (B) blue.", "B", CHOICES, 1.0),
    ("I choose B because it is blue", "B", CHOICES, 1.0),
    ("The answer is B, blue", "B", CHOICES, 1.0),
    ("I think the answer is B", "B", CHOICES, 1.0),    # the opening "I" is a pronoun, not a letter
    ("The answer is A", "B", CHOICES, 0.0),
    # two letters, or a letter and text that disagree
    ("A or B", "B", CHOICES, 0.0),
    ("(A) or (B)", "B", CHOICES, 0.0),
    ("B and C", "B", CHOICES, 0.0),
    ("A. The answer is B", "B", CHOICES, 0.0),
    ("(B) red", "B", CHOICES, 0.0),
    ("The answer is B, red", "B", CHOICES, 0.0),
    ("I choose B because it is red", "B", CHOICES, 0.0),
    ("The answer is E", "B", CHOICES, 0.0),            # out of range
    # the option's text inside a sentence
    ("The umbrella is blue.", "B", CHOICES, 1.0),
    ("It is blue", "blue", CHOICES, 1.0),
    ("not blue", "B", CHOICES, 0.0),
    ("blue or red", "B", CHOICES, 0.0),
    ("There are 3 dogs.", "B", ["2", "3", "4"], 1.0),
    ("It is dark red", "B", ["red", "dark red"], 1.0),  # states both: the longer option wins
    ("It is red", "A", ["red", "dark red"], 1.0),
    # V* options: the short answer inside exactly one option
    ("yellow", "A", VSTAR, 1.0),
    ("Yellow.", "A", VSTAR, 1.0),
    ("The umbrella is yellow.", "A", VSTAR, 1.0),      # its answer phrase "yellow"
    ("A", "A", VSTAR, 1.0),
    ("blue", "A", VSTAR, 0.0),
    ("umbrella", "A", VSTAR, 0.0),                     # in every option
    ("purple", "A", VSTAR, 0.0),
    ("not yellow", "A", VSTAR, 0.0),
    ("B. The color of the umbrella is yellow.", "A", VSTAR, 0.0),   # letter B, text of A
    ("left", "A", REL, 1.0),
    ("On the left.", "A", REL, 1.0),
    ("right", "A", REL, 0.0),
    ("the dog", "A", REL, 0.0),
])
def test_accuracy_multiple_choice_rules(pred, answer, choices, expected):
    assert accuracy(pred, answer, choices) == expected


@pytest.mark.parametrize("answer, choices, expected", [
    ("B", CHOICES, 1),
    ("(c)", CHOICES, 2),
    ("Yellow.", CHOICES, 3),
    ("The color of the umbrella is blue", VSTAR, 1),
])
def test_answer_index(answer, choices, expected):
    assert answer_index(answer, choices) == expected


@pytest.mark.parametrize("pred, answer, expected", [
    ("\u2014", "yes", 0.0),            # symbols the tokenizer drops: never a crash
    ("\u2014", "\u2014", 1.0),          # ... still equal after normalisation
    ("yes", "%", 0.0),
    ("%", "3", 0.0),
])
def test_accuracy_symbols_only(pred, answer, expected):
    assert accuracy(pred, answer) == expected
    assert accuracy(pred, "A", [answer, "other"]) == expected


def test_answer_judging_never_raises_random():
    # random mixes of words, letters, numbers and marks: accuracy is 0 or 1, vote_key a string or None
    pieces = list("abAB .,;:!?/&%()[]'\"-\n\u2019\u2014") + ["the", "is", "answer", "(B)", "1,000", "not", "or",
                                                          "It's", "yellow", "three", "yes", "no"]
    rng = random.Random(0)
    for _ in range(3000):
        pred = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        ref = rng.choice(["yes", "No, it is.", "3", "yellow", "The countertop is tan.", "%"])
        assert accuracy(pred, ref) in (0.0, 1.0)
        assert accuracy(pred, rng.choice("ABCD"), VSTAR) in (0.0, 1.0)
        assert vote_key(pred) is None or vote_key(pred).startswith(("text:", "number:", "list:"))
        assert vote_key(pred, CHOICES) is None or isinstance(vote_key(pred, CHOICES), str)


def test_one_sentence_names_at_most_one_candidate():
    # the end anchor and the single-number rule: however the words are arranged, a prediction is right
    # for at most one of several one-word answers, so listing candidates earns nothing
    candidates = ["red", "blue", "green", "3", "4", "left"]
    filler = ["the", "umbrella", "is", "it", "and", "or", "not", ",", "there", "are", "dogs", "."]
    rng = random.Random(0)
    for _ in range(2000):
        pred = " ".join(rng.choice(candidates + filler) for _ in range(rng.randint(1, 8)))
        assert sum(accuracy(pred, c) for c in candidates) <= 1.0, pred


# ----------------------------------------------------------------------------- votes

@pytest.mark.parametrize("pred, choices, expected", [
    ("yellow", None, "text:yellow"),
    ("Yellow.", None, "text:yellow"),
    ("The umbrella is yellow.", None, "text:yellow"),
    ("It is yellow", None, "text:yellow"),
    ("It's yellow", None, "text:yellow"),
    ("blue", None, "text:blue"),
    ("It is not yellow", None, "text:not yellow"),
    ("yellow or blue", None, "text:yellow or blue"),
    ("3", None, "number:3"),
    ("3.0", None, "number:3"),
    ("three", None, "number:3"),
    ("There are 3 dogs.", None, "number:3"),
    ("1,000", None, "number:1000"),
    ("2.50", None, "number:2.5"),
    ("The two dogs are brown", None, "text:brown"),   # the answer phrase after "are" holds no number
    ("Yes, it is.", None, "text:yes"),
    ("No.", None, "text:no"),
    ("B", CHOICES, "option:B"),
    ("The answer is (B)", CHOICES, "option:B"),
    ("blue", CHOICES, "option:B"),
    ("purple", CHOICES, "text:purple"),                # names no option
    (None, None, None),
    ("", None, None),
    (" . ", None, None),
    (3, None, None),                                   # not a string
    ("\u2014", None, "text:\u2014"),                      # no token at all: the normalised text
])
def test_vote_key(pred, choices, expected):
    assert vote_key(pred, choices) == expected


@pytest.mark.parametrize("a, b, choices, expected", [
    ("yellow", "The umbrella is yellow.", None, True),
    ("It is yellow", "Yellow.", None, True),
    ("yellow", "blue", None, False),
    ("yellow", "It is not yellow", None, False),
    ("3", "There are three dogs.", None, True),
    ("3", "4", None, False),
    ("B", "The answer is (B)", CHOICES, True),
    ("B", "blue", CHOICES, True),
    ("B", "C", CHOICES, False),
    (None, None, None, False),                         # no answer is never the same answer
    ("", "", None, False),
])
def test_same_answer(a, b, choices, expected):
    assert same_answer(a, b, choices) == expected
    assert same_answer(b, a, choices) == expected


def test_vote_paraphrases_fall_into_one_vote():
    preds = ["yellow", "Yellow.", "The umbrella is yellow.", "It is yellow", "blue"]
    assert [vote_key(p) for p in preds] == ["text:yellow"] * 4 + ["text:blue"]


# ----------------------------------------------------------------------------- stage 1

@pytest.mark.parametrize("pred, answer, choices, malformed, crops, acc, fmt, tool, total", [
    ("B", "B", CHOICES, 0, 1, 1.0, 0.0, 1.0, 2.0),     # 0.8 + 1.2
    ("B", "B", CHOICES, 0, 3, 1.0, 0.0, 1.0, 2.0),     # more crops, same bonus
    ("B", "B", CHOICES, 0, 0, 1.0, 0.0, 0.0, 0.8),     # right but never cropped: no tool bonus
    ("A", "B", CHOICES, 0, 2, 0.0, 0.0, 0.0, 0.0),     # wrong: no tool bonus even with crops
    ("B", "B", CHOICES, 1, 1, 1.0, -1.0, 1.0, 1.8),    # 0.8 - 0.2 + 1.2
    ("B", "B", CHOICES, 2, 0, 1.0, -1.0, 0.0, 0.6),    # 0.8 - 0.2
    ("A", "B", CHOICES, 1, 1, 0.0, -1.0, 0.0, -0.2),
    (None, "B", CHOICES, 0, 1, 0.0, 0.0, 0.0, 0.0),    # no answer
    (None, "B", CHOICES, 1, 0, 0.0, -1.0, 0.0, -0.2),
    ("Red.", "red", None, 0, 1, 1.0, 0.0, 1.0, 2.0),   # free-form
])
def test_outcome_reward(pred, answer, choices, malformed, crops, acc, fmt, tool, total):
    r, parts = outcome_reward(pred, answer, choices, malformed, crops)
    assert r == pytest.approx(total)
    assert parts == pytest.approx({"acc": acc, "format": fmt, "tool": tool, "total": total})


def test_outcome_reward_custom_weights():
    # 1.0*1 + 0.5*(-1) + 0.5*1 = 1.0
    r, _ = outcome_reward("B", "B", CHOICES, 1, 1, RewardWeights(acc=1.0, format=0.5, tool=0.5))
    assert r == pytest.approx(1.0)


def test_reward_weights_defaults():
    assert RewardWeights() == RewardWeights(acc=0.8, format=0.2, tool=1.2, geo=1.0)


@pytest.mark.parametrize("malformed, crops", [(-1, 0), (0, -1)])
def test_outcome_reward_negative_counts(malformed, crops):
    with pytest.raises(ValueError):
        outcome_reward("B", "B", CHOICES, malformed, crops)


# ----------------------------------------------------------------------------- box geometry

A = (0, 0, 10, 10)
IMG = (100, 50)  # W, H

@pytest.mark.parametrize("box, expected", [
    (A, 100.0),
    ((0.5, 0, 2, 2), 3.0),          # 1.5 * 2
    ((5, 5, 5, 10), 0.0),           # zero width
    ((10, 0, 0, 10), 0.0),          # inverted
    ([2, 3, 6, 4], 4.0),            # lists work too
])
def test_box_area(box, expected):
    assert box_area(box) == pytest.approx(expected)


@pytest.mark.parametrize("b, inter, iou", [
    ((5, 0, 15, 10), 50.0, 50 / 150),    # 5x10 overlap; union 100 + 100 - 50
    (A, 100.0, 1.0),
    ((10, 0, 20, 10), 0.0, 0.0),          # shares an edge only: half-open, no area
    ((20, 20, 30, 30), 0.0, 0.0),
    ((2, 2, 4, 4), 4.0, 4 / 100),         # contained: union is A
    ((0, 5, 5, 20), 25.0, 25 / 150),      # 5x5 overlap; union 100 + 75 - 25
])
def test_intersection_and_iou(b, inter, iou):
    assert box_intersection(A, b) == pytest.approx(inter)
    assert box_intersection(b, A) == pytest.approx(inter)
    assert box_iou(A, b) == pytest.approx(iou)
    assert box_iou(b, A) == pytest.approx(iou)


def test_iou_of_two_empty_boxes_is_zero():
    assert box_iou((1, 1, 1, 1), (2, 2, 2, 2)) == 0.0


@pytest.mark.parametrize("pred, b1, expected", [
    (A, (5, 0, 15, 10), 0.5),             # 50 of b1's 100
    ((0, 0, 100, 50), A, 1.0),            # pred contains b1
    ((2, 2, 4, 4), A, 0.04),              # 4 of 100
    (A, (3, 3, 3, 3), 0.0),               # empty b1
])
def test_coverage(pred, b1, expected):
    assert coverage(pred, b1) == pytest.approx(expected)


@pytest.mark.parametrize("a, b, expected", [
    (A, A, 0.0),
    (A, (5, 0, 15, 10), 0.025),           # (5/100 + 0 + 5/100 + 0) / 4
    (A, (0, 10, 10, 20), 0.1),            # (0 + 10/50 + 0 + 10/50) / 4: y is normalised by H
    ((0, 0, 100, 50), (0, 0, 0, 0), 0.5),  # (0 + 0 + 1 + 1) / 4
])
def test_l1_distance(a, b, expected):
    assert l1_distance(a, b, IMG) == pytest.approx(expected)
    assert l1_distance(b, a, IMG) == pytest.approx(expected)


def test_l1_distance_bad_image_size():
    with pytest.raises(ValueError):
        l1_distance(A, A, (0, 10))


# ----------------------------------------------------------------------------- stage 2

B1 = (10, 10, 30, 20)   # 20 x 10 = 200 px^2
B2 = (0, 0, 50, 40)     # 50 x 40 = 2000 px^2, contains B1
GT = [B1, B2]
KEYS = {"coverage", "gate", "iou", "l1", "geo"}

@pytest.mark.parametrize("pred, cov, gate, iou, l1", [
    # perfect box on B1
    (B1, 1.0, 1.0, 1.0, 1.0),
    # the box B2: covers B1, so the gate opens; IoU with B2 is 1 (with B1 only 200/2000)
    (B2, 1.0, 1.0, 1.0, 1.0),
    # whole image: covers B1; IoU max(200/5000, 2000/5000) = 0.4;
    # L1 to B2 (0 + 0 + 50/100 + 10/50)/4 = 0.175 (to B1 0.4) -> 0.825; geo 0.5*0.4 + 0.5*0.825
    ((0, 0, 100, 50), 1.0, 1.0, 0.4, 0.825),
    # just below the gate: covers 170 of B1's 200 = 0.85; L1 to B1 (3/100)/4 = 0.0075 -> 0.9925
    ((13, 10, 30, 20), 0.85, 0.0, 0.0, 0.9925),
    # exactly at the gate: 180/200 = 0.9 is not > 0.9; L1 to B1 (2/100)/4 = 0.005 -> 0.995
    ((12, 10, 30, 20), 0.9, 0.0, 0.0, 0.995),
    # far corner: L1 to B1 (60/100 + 20/50 + 70/100 + 30/50)/4 = 0.575,
    #             to B2 (70/100 + 30/50 + 50/100 + 10/50)/4 = 0.5 -> r_l1 0.5
    ((70, 30, 100, 50), 0.0, 0.0, 0.0, 0.5),
    # far outside the image: L1 > 1, r_l1 clipped to 0
    ((-1000, -1000, -900, -900), 0.0, 0.0, 0.0, 0.0),
])
def test_grounding_reward(pred, cov, gate, iou, l1):
    geo = 0.5 * iou + 0.5 * l1
    r, parts = grounding_reward(pred, GT, IMG)
    assert r == pytest.approx(geo)
    assert parts == pytest.approx({"coverage": cov, "gate": gate, "iou": iou, "l1": l1, "geo": geo})


def test_grounding_reward_no_crop():
    r, parts = grounding_reward(None, GT, IMG)
    assert r == 0.0 and parts == {k: 0.0 for k in KEYS}


def test_grounding_reward_ranks_tight_over_large():
    # stage 2's point: the whole image (0.6125) scores below the tight box (1.0)
    assert grounding_reward((0, 0, 100, 50), GT, IMG)[0] < grounding_reward(B1, GT, IMG)[0]


@pytest.mark.parametrize("tau, omega, expected", [
    (0.85, 0.5, 0.9475),   # gate opens at 0.9 > 0.85: IoU max(180/200, 180/2000) = 0.9; 0.5*0.9 + 0.5*0.995
    (0.9, 0.5, 0.4975),    # strict gate: 0.9 is not > 0.9 -> 0.5*0 + 0.5*0.995
    (0.85, 1.0, 0.9),      # omega 1: IoU only
    (0.85, 0.0, 0.995),    # omega 0: L1 only
    (0.0, 0.25, 0.97125),  # 0.25*0.9 + 0.75*0.995
])
def test_grounding_reward_tau_and_omega(tau, omega, expected):
    r, _ = grounding_reward((12, 10, 30, 20), GT, IMG, tau=tau, omega=omega)
    assert r == pytest.approx(expected)


@pytest.mark.parametrize("gt, kwargs", [
    ([], {}),
    ([(5, 5, 5, 10), B2], {}),   # empty B1
    (GT, {"tau": 1.5}),
    (GT, {"tau": -0.1}),
    (GT, {"omega": 2.0}),
    (GT, {"omega": -0.5}),
])
def test_grounding_reward_errors(gt, kwargs):
    with pytest.raises(ValueError):
        grounding_reward(B1, gt, IMG, **kwargs)


def test_grounding_reward_bounds_random():
    # r_geo and its parts stay in [0, 1]; IoU part is 0 whenever the gate is shut
    rng = random.Random(0)
    for _ in range(500):
        x1, x2 = sorted(rng.uniform(-20, 120) for _ in range(2))
        y1, y2 = sorted(rng.uniform(-20, 70) for _ in range(2))
        r, p = grounding_reward((x1, y1, x2, y2), GT, IMG)
        assert all(0.0 <= p[k] <= 1.0 for k in KEYS)
        assert p["gate"] == 1.0 or p["iou"] == 0.0
        assert r == p["geo"]


STAGE2_KEYS = {"acc", "format", "tool", "outcome", "total"} | KEYS

@pytest.mark.parametrize("pred, crops, box, w, mode, outcome, geo, total", [
    ("B", 1, B1, RewardWeights(), "add", 2.0, 1.0, 3.0),                     # 2.0 + 1.0*1.0
    ("B", 1, (0, 0, 100, 50), RewardWeights(geo=2.0), "add", 2.0, 0.6125, 3.225),  # 2.0 + 2*0.6125
    ("B", 0, None, RewardWeights(), "add", 0.8, 0.0, 0.8),                   # no crop: no bonus, no r_geo
    ("A", 1, B1, RewardWeights(), "add", 0.0, 1.0, 1.0),                     # wrong but well boxed
    ("A", 1, (0, 0, 100, 50), RewardWeights(), "geo_only", 0.0, 0.6125, 0.6125),
    ("B", 1, B1, RewardWeights(geo=0.5), "geo_only", 2.0, 1.0, 0.5),         # outcome logged, not paid
])
def test_stage2_reward(pred, crops, box, w, mode, outcome, geo, total):
    r, parts = stage2_reward(pred, "B", CHOICES, 0, crops, box, GT, IMG, w=w, mode=mode)
    assert r == pytest.approx(total)
    assert set(parts) == STAGE2_KEYS
    assert parts["outcome"] == pytest.approx(outcome)
    assert parts["geo"] == pytest.approx(geo)
    assert parts["total"] == pytest.approx(total)


def test_stage2_reward_passes_tau_and_omega():
    # box at coverage 0.9: shut at tau 0.9, open at 0.85 (see test_grounding_reward_tau_and_omega)
    shut, _ = stage2_reward("B", "B", CHOICES, 0, 1, (12, 10, 30, 20), GT, IMG)
    open_, parts = stage2_reward("B", "B", CHOICES, 0, 1, (12, 10, 30, 20), GT, IMG, tau=0.85, omega=1.0)
    assert shut == pytest.approx(2.0 + 0.4975)
    assert open_ == pytest.approx(2.0 + 0.9) and parts["gate"] == 1.0


def test_stage2_reward_unknown_mode():
    with pytest.raises(ValueError):
        stage2_reward("B", "B", CHOICES, 0, 1, B1, GT, IMG, mode="multiply")
    assert rewards.MODES == ("add", "geo_only")


def test_an_options_exact_text_wins_over_an_out_of_range_letter():
    assert answers.choice_index("x", ["x", "y"]) == 0 and answers.accuracy("x", "A", ["x", "y"]) == 1.0
    assert answers.choice_index("y.", ["x", "y"]) == 1 and answers.accuracy("B", "B", ["x", "y"]) == 1.0


def test_options_that_are_letters_read_a_bare_letter_as_a_position():
    """["B", "A"] with answer "A" (the letter, as answer_index reads it: the first option): the exact
    prediction "A" is right and "B" wrong, as the answer itself is read."""
    assert answers.answer_index("A", ["B", "A"]) == 0
    assert answers.accuracy("A", "A", ["B", "A"]) == 1.0 and answers.accuracy("(A)", "A", ["B", "A"]) == 1.0
    assert answers.accuracy("B", "A", ["B", "A"]) == 0.0
    assert answers.accuracy("x", "A", ["x", "y"]) == 1.0          # out of letter range: the text still names it


# ----------------------------------------------------------------------------- as a careful person judges (issue 28)

VSTAR_Q = "What is the color of the woman's umbrella?"
PEOPLE_RIGHT = [   # (prediction, answer, choices, question): a careful person calls each right
    # corrected negations name the right option
    ("It is not red; it is yellow.", "yellow", None, VSTAR_Q),
    ("Not red, but yellow.", "B", ["red", "yellow", "blue", "green"], VSTAR_Q),
    ("The umbrella isn't blue - it is yellow", "yellow", None, VSTAR_Q),
    ("It's not A, it's (B)", "B", ["red", "yellow", "blue", "green"], VSTAR_Q),
    # boxed and bold answers
    (r"\boxed{B}", "B", ["red", "yellow", "blue", "green"], VSTAR_Q),
    (r"The answer is $\boxed{yellow}$.", "yellow", None, VSTAR_Q),
    (r"\boxed{42}", "42", None, "How many chairs are there?"),
    ("**B**", "B", ["red", "yellow"], VSTAR_Q),
    # hedged sentences
    ("The umbrella appears to be yellow in color.", "yellow", None, VSTAR_Q),
    ("It seems to be yellow.", "yellow", None, VSTAR_Q),
    ("The umbrella looks yellow.", "yellow", None, VSTAR_Q),
    ("It is probably yellow.", "yellow", None, VSTAR_Q),
    ("It looks like it is yellow.", "B", ["red", "yellow", "blue", "green"], VSTAR_Q),
    # a short positional answer inside a longer sentence
    ("The cup is on the left side.", "left", None, "Is the cup on the left or right side of the laptop?"),
    ("The cup is to the left of the laptop.", "left", None, "Is the cup on the left or right side of the laptop?"),
    ("The dog is on the right of the car.", "right", None, "Is the dog on the left or right of the car?"),
    ("The lamp is above the sofa.", "above", None, "Is the lamp above or below the sofa?"),
    ("The cup is to the left of the laptop.", "A", ["left", "right"], "Is the cup left or right of the laptop?"),
    # units against bare numbers, both ways; unit words against abbreviations
    ("2.5 meters", "2.5 m", None, "How tall is the door?"),
    ("2.5", "2.5 m", None, "How tall is the door?"),
    ("The door is 2.5 m tall.", "2.5", None, "How tall is the door?"),
    ("It is 30 km", "30 kilometers", None, "How far is the town?"),
    ("50 percent", "50%", None, "What is the discount?"),
    ("The speed limit is 65 mph.", "65", None, "What is the speed limit?"),
    # "no" answered by a negative sentence
    ("There is no dog in the picture.", "no", None, "Is there a dog in the picture?"),
    ("The man is not wearing a hat.", "No", None, "Is the man wearing a hat?"),
    ("The light isn't on.", "no", None, "Is the light on?"),
    # unordered lists
    ("red and white", "white and red", None, "What colors is the flag?"),
    ("The flag is red and white.", "white and red", None, "What colors is the flag?"),
    ("blue, red and white", "red, white and blue", None, "What colors is the flag?"),
    ("cat & dog", "dog and cat", None, "Which animals are there?"),
    # Chinese
    ("答案是B", "B", ["红色", "黄色", "蓝色"], "伞是什么颜色?"),
    ("答案：(B)", "B", ["红色", "黄色", "蓝色"], "伞是什么颜色?"),
    ("选B", "B", ["红色", "黄色"], "伞是什么颜色?"),
    ("黄色。", "黄色", None, "伞是什么颜色?"),
    ("伞是黄色的", "黄色", None, "伞是什么颜色?"),
    ("答案是黄色", "黄色", None, "伞是什么颜色?"),
    ("Ｂ", "B", ["红色", "黄色"], "伞是什么颜色?"),
]
PEOPLE_WRONG = [   # the traps that strictness protects against: each stays wrong
    ("It is not yellow.", "yellow", None, VSTAR_Q),                                  # a negation of the answer
    ("It is not B.", "B", ["red", "yellow", "blue", "green"], VSTAR_Q),              # the right option, negated
    ("Not yellow; it is red.", "yellow", None, VSTAR_Q),                             # corrected away from it
    ("It is not red; it is blue.", "B", ["red", "yellow", "blue", "green"], VSTAR_Q),
    ("red or yellow", "yellow", None, VSTAR_Q),                                      # two options named
    ("A or B", "B", ["red", "yellow"], VSTAR_Q),
    ("The umbrella is red and yellow.", "yellow", None, VSTAR_Q),
    (r"\boxed{A}", "B", ["red", "yellow"], VSTAR_Q),
    (r"\boxed{A} or \boxed{B}", "B", ["red", "yellow"], VSTAR_Q),
    ("It appears to be red.", "yellow", None, VSTAR_Q),
    ("It is not yellow in color.", "yellow", None, VSTAR_Q),
    ("The cup is to the left of the laptop, which is on the right.", "left", None, "Is the cup left or right of the laptop?"),
    ("The cup is not on the left.", "left", None, "Is the cup left or right of the laptop?"),
    ("The cup is on the right side.", "left", None, "Is the cup left or right of the laptop?"),
    ("The cup is to the right of the laptop.", "A", ["left", "right"], "Is the cup left or right of the laptop?"),
    ("12.5 m", "2.5 m", None, "How tall is the door?"),                              # a number inside a longer one
    ("2.5 km", "2.5 m", None, "How tall is the door?"),                              # another unit
    ("25", "2.5", None, "How tall is the door?"),
    ("There are 12 dogs.", "2", None, "How many dogs?"),
    ("There is a dog in the picture.", "no", None, "Is there a dog in the picture?"),
    ("No, there is a dog. Yes.", "no", None, "Is there a dog?"),
    ("The sign is not red.", "no", None, "Is the sign not red?"),                    # the question itself negates
    ("red and white", "red, white and blue", None, "What colors is the flag?"),      # a list missing an item
    ("red or white", "white and red", None, "What colors is the flag?"),
    ("not red and white", "white and red", None, "What colors is the flag?"),
    ("答案是A", "B", ["红色", "黄色"], "伞是什么颜色?"),
    ("伞不是黄色的", "黄色", None, "伞是什么颜色?"),
    ("红色", "黄色", None, "伞是什么颜色?"),
    ("答案是A或B", "B", ["红色", "黄色"], "伞是什么颜色?"),
]


@pytest.mark.parametrize("pred, answer, choices, question", PEOPLE_RIGHT)
def test_what_a_careful_person_calls_right(pred, answer, choices, question):
    assert accuracy(pred, answer, choices, question) == 1.0


@pytest.mark.parametrize("pred, answer, choices, question", PEOPLE_WRONG)
def test_the_traps_stay_wrong(pred, answer, choices, question):
    assert accuracy(pred, answer, choices, question) == 0.0


def test_one_answer_phrased_four_ways_is_one_vote():
    """The prober's votes: paraphrases of one full-resolution answer are one group (a majority), by the
    same rules that judge the rewards."""
    from support.judge import RuleJudge
    for paraphrases in (["yellow", "The umbrella appears to be yellow in color.", r"\\boxed{yellow}", "It is not red; it is yellow."],
                        ["2.5", "The door is 2.5 m tall.", "2.5 meters", r"\\boxed{2.5}"],
                        ["red and white", "The flag is white and red.", "white, red", "**red and white**"]):
        assert len({vote_key(p) for p in paraphrases}) == 1, [vote_key(p) for p in paraphrases]
        assert RuleJudge().groups(paraphrases) == [0, 0, 0, 0]
