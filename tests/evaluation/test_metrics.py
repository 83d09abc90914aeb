"""The medical VQA metrics (evaluation/metrics.py) against hand-computed values."""

import math

import pytest

from idefics_cog.evaluation import metrics as vqa


def test_normalize_lowercases_strips_punctuation_and_collapses_spaces():
    assert vqa.normalize("  No. ") == "no"
    assert vqa.normalize("The X-ray,\tshows  the patient's LEFT lung!") == "the x ray shows the patients left lung"
    assert vqa.normalize("?!...") == ""


@pytest.mark.parametrize("reference, expected", [("no", "no"), ("No.", "no"), (" YES! ", "yes"), ("no fracture", None),
                                                 ("Normal", None), ("", None)])
def test_a_question_is_closed_when_its_reference_is_yes_or_no(reference, expected):
    assert vqa.closed_answer(reference) == expected


@pytest.mark.parametrize("prediction, reference, correct", [
    ("No.", "no", True), ("NO", "No", True), ("no, it is intact", "no", True), ("Yes!", "YES.", True),
    ("The lung looks normal.", "no", False),  # "no" inside "normal" is not the word no
    ("It is not broken.", "no", False),  # ... nor inside "not"
    ("I don't know.", "no", False),  # ... nor inside "know" (and "don't" becomes "dont")
    ("nothing there", "no", False), ("yesterday", "yes", False),
    ("Yes, there is no fracture.", "yes", True),  # both words: the first one is the verdict
    ("Yes, there is no fracture.", "no", False),
    ("yes or no", "no", False),  # a hedge is no better than always answering yes
    ("", "yes", False), ("", "no", False),  # an empty answer is wrong
    ("It is a fracture.", "yes", False),  # no verdict at all
])
def test_closed_accuracy_matches_whole_words_and_the_first_verdict(prediction, reference, correct):
    scores = vqa.score(prediction, reference)
    assert scores["closed"] and scores["correct"] is correct


def test_recall_f1_and_exact_match_by_hand():
    # reference [left, lower, lobe] (3 tokens), prediction [the, lower, left, lung] (4): overlap {left, lower} = 2
    # recall 2/3, precision 2/4, F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7
    assert vqa.recall("The lower left lung.", "Left lower lobe") == pytest.approx(2 / 3)
    assert vqa.f1("The lower left lung.", "Left lower lobe") == pytest.approx(4 / 7)
    assert vqa.exact_match("The lower left lung.", "Left lower lobe") == 0.0
    assert vqa.exact_match("  LEFT lower-lobe!", "left lower lobe") == 1.0  # "-" is a space, case and "!" ignored
    # Tokens are a multiset: the reference [left, left, lung] has "left" twice; the prediction [left, lung] once.
    # recall 2/3 (left once, lung), precision 2/2, F1 = 2 * (2/3 * 1) / (2/3 + 1) = (4/3) / (5/3) = 4/5
    assert vqa.recall("left lung", "left, left lung") == pytest.approx(2 / 3)
    assert vqa.f1("left lung", "left, left lung") == pytest.approx(4 / 5)


def test_bleu_by_hand():
    # prediction [the, left, lung] (3 tokens), reference [the, left, lung, is, clear] (5):
    # p1 = 3/3; p2 = (2 + 1) / (2 + 1); p3 = (1 + 1) / (1 + 1); p4 = (0 + 1) / (0 + 1)  (add-one for n >= 2)
    # brevity penalty exp(1 - 5/3) = exp(-2/3), so BLEU = exp(-2/3) = 0.5134
    assert vqa.bleu("The left lung.", "The left lung is clear") == pytest.approx(math.exp(-2 / 3))
    # prediction [right, lung, clear], reference [left, lung]: p1 = 1/3 (lung); p2 = (0 + 1) / (2 + 1) = 1/3;
    # p3 = (0 + 1) / (1 + 1) = 1/2; p4 = (0 + 1) / (0 + 1) = 1; no brevity penalty (3 >= 2)
    # BLEU = (1/3 * 1/3 * 1/2 * 1) ** (1/4) = (1/18) ** (1/4) = 0.4855
    assert vqa.bleu("right lung clear", "left lung") == pytest.approx((1 / 18) ** 0.25)
    assert vqa.bleu("Fracture.", "fracture") == 1.0  # a one-word match scores 1, not 0 for lack of 4-grams
    assert vqa.bleu("lung", "fracture") == 0.0  # no unigram in common


def test_an_empty_prediction_scores_zero_and_an_empty_reference_only_matches_an_empty_prediction():
    assert vqa.score("", "left lung") == {"closed": False, "correct": None, "recall": 0.0, "f1": 0.0,
                                         "exact_match": 0.0, "bleu": 0.0}
    assert vqa.score("...", "") == {"closed": False, "correct": None, "recall": 1.0, "f1": 1.0, "exact_match": 1.0,
                                   "bleu": 1.0}
    assert vqa.score("lung", "")["recall"] == vqa.score("lung", "")["f1"] == vqa.score("lung", "")["bleu"] == 0.0


def test_aggregate_splits_closed_and_open_questions():
    pairs = [("No.", "no"), ("normal", "no"), ("Yes", "yes"),  # closed: 2 of 3 right
             ("left lung", "the left lung"), ("", "right lobe")]  # open: recall 2/3 and 0
    metrics = vqa.aggregate([vqa.score(p, r) for p, r in pairs])
    assert metrics["questions"] == 5 and metrics["closed"] == 3 and metrics["open"] == 2
    assert metrics["closed_accuracy"] == pytest.approx(2 / 3)
    assert metrics["open_recall"] == pytest.approx((2 / 3 + 0) / 2)
    # exact match: "No." = "no" and "Yes" = "yes": 2 of 5. F1: 1, 0, 1, 2*(1 * 2/3)/(1 + 2/3) = 4/5, 0
    assert metrics["exact_match"] == pytest.approx(2 / 5)
    assert metrics["f1"] == pytest.approx((1 + 0 + 1 + 4 / 5 + 0) / 5)
    assert metrics["errors"] == 0
    only_open = vqa.aggregate([vqa.score("x", "left lung")])
    assert only_open["closed_accuracy"] is None and only_open["closed"] == 0


def test_bleu_is_sacrebleus_add_one_smoothed_sentence_bleu_on_normalised_words():
    """The by-hand values above come out of sacrebleu (smooth_method add-k, k = 1; tokenize none, our normalised
    words): the convention is that of the hand-written BLEU it replaced, to 1e-15 on 20,000 random pairs."""
    from sacrebleu import sentence_bleu

    hypothesis, reference = "The lower-left lung, clear", "left lower lung is clear"
    expected = sentence_bleu(vqa.normalize(hypothesis), [vqa.normalize(reference)], smooth_method="add-k",
                             smooth_value=1, tokenize="none").score / 100
    assert vqa.bleu(hypothesis, reference) == pytest.approx(expected) and 0 < expected < 1
    # sacrebleu's defaults (13a tokenizer, exp smoothing, case kept) would give another number
    assert sentence_bleu(hypothesis, [reference]).score / 100 != pytest.approx(expected)


YES_NO = [{"text": "yes", "probability": 0.3, "logprob": -1.2, "mean_logprob": -1.2, "tokens": 1},
          {"text": "no", "probability": 0.7, "logprob": -0.36, "mean_logprob": -0.36, "tokens": 1}]


def test_a_choice_is_right_when_the_most_probable_candidate_is_the_reference():
    assert vqa.choice_score(YES_NO, "No.") == {"choice": "no", "choice_probability": 0.7, "choice_correct": True}
    assert vqa.choice_score(YES_NO, "yes")["choice_correct"] is False
    options = [{"text": "H&E", "probability": 0.5}, {"text": "PAS", "probability": 0.2}]
    assert vqa.choice_score(options, "h&e")["choice_correct"] is True  # normalised as answers are


def test_a_verbose_right_answer_is_wrong_by_words_and_right_by_choices():
    """The gap the two closed accuracies make visible: an answer that says "no" without the word."""
    record = {**vqa.score("The image shows an intact bone.", "no"), **vqa.choice_score(YES_NO, "no")}
    metrics = vqa.aggregate([record, vqa.score("left", "left lung")])
    assert metrics["closed_accuracy"] == 0.0 and metrics["choice_accuracy"] == 1.0
    assert metrics["chosen"] == 1 and metrics["closed"] == 1
    assert vqa.aggregate([vqa.score("no", "no")])["choice_accuracy"] is None  # not scored by choices: n/a


def test_a_question_whose_choices_failed_counts_as_wrong_by_choices_and_is_counted():
    """Else a scoring failure would drop a question from one row only and widen the gap between the two."""
    right = {**vqa.score("no", "no"), **vqa.choice_score(YES_NO, "no")}
    failed = {**vqa.score("no", "no"), "choice_error": "choices: ... do not fit the model's context"}
    metrics = vqa.aggregate([right, failed])
    assert metrics["closed_accuracy"] == 1.0 and metrics["choice_accuracy"] == 0.5
    assert metrics["chosen"] == 2 and metrics["choice_errors"] == 1 and metrics["errors"] == 0
