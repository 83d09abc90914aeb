"""The standard medical VQA metrics (LLaVA-Med's): closed (yes/no) accuracy by the answer's first whole yes/no
word, open recall, and token F1, exact match and smoothed sentence BLEU-4 on normalised text; and the accuracy of
`choices`, the most probable of the candidate answers (yes/no, or the dataset's options)."""

import re
from collections import Counter

from sacrebleu.metrics import BLEU

YES_NO = ("yes", "no")

_APOSTROPHE = re.compile(r"['\u2019]")
_NOT_A_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """Lowercase; "don't" -> "dont", "x-ray" -> "x ray", "no," -> "no"."""
    return " ".join(_NOT_A_WORD.sub(" ", _APOSTROPHE.sub("", text.lower())).split())


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def closed_answer(reference: str) -> str | None:
    """`yes` or `no` for a closed question, else None."""
    answer = normalize(reference)
    return answer if answer in YES_NO else None


def verdict(prediction: str) -> str | None:
    """The first whole word `yes` or `no` ("no" in "normal" is not one)."""
    return next((token for token in tokens(prediction) if token in YES_NO), None)


def _overlap(prediction: list[str], reference: list[str]) -> int:
    return sum((Counter(prediction) & Counter(reference)).values())


def recall(prediction: str, reference: str) -> float:
    pred, ref = tokens(prediction), tokens(reference)
    if not ref:
        return float(not pred)
    return _overlap(pred, ref) / len(ref)


def f1(prediction: str, reference: str) -> float:
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = _overlap(pred, ref)
    if not common:
        return 0.0
    precision, recall_ = common / len(pred), common / len(ref)
    return 2 * precision * recall_ / (precision + recall_)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


# Add-one smoothing for n >= 2 (Lin & Och 2004; sacrebleu's "add-k", NLTK's method2) on our own normalised words,
# so a short answer equal to a short reference scores 1. The effective order never drops below 4 with add-k (an
# empty n-gram count becomes 1/1); it only keeps sacrebleu from warning on every call.
_BLEU = BLEU(smooth_method="add-k", smooth_value=1, tokenize="none", effective_order=True)


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 in [0, 1]; an empty text scores 1 only against an empty one."""
    pred, ref = normalize(prediction), normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    return min(1.0, _BLEU.sentence_score(pred, [ref]).score / 100)  # sacrebleu's % can round above 100


def choice_score(rows: list[dict], reference: str) -> dict:
    """`rows`: the `choices` table (text, probability, ...). Right when the most probable candidate is the
    reference (normalised: "No." is "no")."""
    best = max(rows, key=lambda row: row["probability"])
    return {"choice": best["text"], "choice_probability": best["probability"],
            "choice_correct": normalize(best["text"]) == normalize(reference)}


def score(prediction: str, reference: str) -> dict:
    """`correct` is None for open questions."""
    expected = closed_answer(reference)
    return {
        "closed": expected is not None,
        "correct": None if expected is None else verdict(prediction) == expected,
        "recall": recall(prediction, reference),
        "f1": f1(prediction, reference),
        "exact_match": exact_match(prediction, reference),
        "bleu": bleu(prediction, reference),
    }


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(records: list[dict]) -> dict:
    closed = [r for r in records if r["closed"]]
    opened = [r for r in records if not r["closed"]]
    # Scored over candidates too; one whose scoring failed counts as wrong, as a failed answer does above.
    chosen = [r for r in records if r.get("choice_correct") is not None or r.get("choice_error")]
    return {
        "questions": len(records),
        "closed": len(closed),
        "open": len(opened),
        "closed_accuracy": _mean([float(r["correct"]) for r in closed]),
        "chosen": len(chosen),
        "choice_accuracy": _mean([float(bool(r.get("choice_correct"))) for r in chosen]),
        "open_recall": _mean([r["recall"] for r in opened]),
        "f1": _mean([r["f1"] for r in records]),
        "exact_match": _mean([r["exact_match"] for r in records]),
        "bleu": _mean([r["bleu"] for r in records]),
        "errors": sum(1 for r in records if r.get("error")),
        "choice_errors": sum(1 for r in records if r.get("choice_error")),
    }
