"""Answer scoring: containment, exact match and token F1 with SQuAD/LongBench normalisation."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 between normalised strings (0 when either is empty)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def contains(prediction: str, gold: str) -> float:
    """1 when the normalised gold string appears in the normalised prediction."""
    gold_norm = normalize_answer(gold)
    return float(bool(gold_norm) and f" {gold_norm} " in f" {normalize_answer(prediction)} ")


METRICS = {"token_f1": token_f1, "exact_match": exact_match, "contains": contains}


def score_all(prediction: str, answers: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Every metric, each the maximum over the gold answers (0 when there is none)."""
    return {name: max((fn(prediction, gold) for gold in answers), default=0.0) for name, fn in METRICS.items()}


def paper_coherence(prediction: str) -> float:
    """The Q-KVComm paper's "coherence" (QKVCOMM.md §2.6), a surface heuristic that ignores correctness: length
    3–100 words +0.3 (101–150 +0.2, more +0.1), upper-case first character +0.2, sentence punctuation +0.2,
    +0.3 × unique-word ratio; capped at 1; 0 for predictions shorter than 3 characters. Reported only as a labelled
    extra beside the task metrics."""
    text = prediction.strip()
    if len(text) < 3:
        return 0.0
    words = text.split()
    score = 0.3 if 3 <= len(words) <= 100 else 0.2 if 101 <= len(words) <= 150 else 0.1 if len(words) > 150 else 0.0
    score += 0.2 if text[0].isupper() else 0.0
    score += 0.2 if any(mark in text for mark in ".!?") else 0.0
    score += 0.3 * len({w.lower() for w in words}) / len(words) if words else 0.0
    return min(1.0, score)
