"""Answer scoring.

* ``contains``, ``exact_match`` and ``token_f1``: SQuAD/LongBench normalisation, continuous token F1.
* ``f1_match``: the paper's "F1" (``KVCOMM.md`` §7.3): a binary score, 1 when the F1 between the *sets* of
  normalised, lemmatised words of prediction and gold exceeds 0.5. The reference lemmatises with NLTK WordNet after
  POS-tagging every word on its own; by default this module uses ``lemminflect`` (its data ship in the wheel, nothing
  is downloaded) with a POS choice that imitates tagging a word alone, see :func:`lemminflect_lemma` and
  ``docs/metrics.md``. ``lemmatizer="wordnet"`` uses NLTK when it and its data are installed locally (exact parity).
* ``rouge_l_recall``: ROUGE-L recall of the ``rouge`` package, as the reference computes it for TMATH.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

from kvcomm.errors import KVCommError

logger = logging.getLogger(__name__)

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


# --- the paper's F1-match (spec §7.3) -------------------------------------------------------------------------------

F1_MATCH_THRESHOLD = 0.5
LEMMATIZERS = ("lemminflect", "wordnet")
_ASCII_PUNCTUATION = set(string.punctuation)
# word_tokenize (Penn Treebank rules) splits these words in two even without punctuation
_TREEBANK_SPLITS = {"cannot": ("can", "not"), "gimme": ("gim", "me"), "gonna": ("gon", "na"),
                    "gotta": ("got", "ta"), "lemme": ("lem", "me"), "wanna": ("wan", "na")}
# lemminflect's universal POS tags, in the order tried for a word whose POS is not decided by its form
_POS_ORDER = ("AUX", "NOUN", "VERB", "ADJ", "ADV")


def normalize_f1_match(text: str) -> str:
    """Step 1 of §7.3: lower-case; drop Unicode punctuation (category P*); lower-case and drop ASCII punctuation
    again; drop the words a/an/the; collapse whitespace; replace ``’`` by ``'``."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split()).replace("\u2019", "'")


def _missing_package(module: str, version_hint: str) -> KVCommError:
    return KVCommError(f"f1_match needs the package {module!r}; install it (pip install {version_hint})")


@lru_cache(maxsize=1)
def _lemminflect():
    try:
        import lemminflect
    except ImportError:
        raise _missing_package("lemminflect", "lemminflect==0.2.3") from None
    return lemminflect


@lru_cache(maxsize=65536)
def lemminflect_lemma(word: str) -> str:
    """The lemma of one lower-case word, choosing the POS the way NLTK's tagger tends to tag a word on its own.

    Words lemminflect does not know (names, numbers) stay unchanged, as WordNet leaves them. Otherwise: an auxiliary
    reading wins (``is``/``was`` → ``be``, ``has`` → ``have``); words ending in ``-ing``/``-ed`` with a verb reading
    are verbs (``running`` → ``run``); then noun, verb, adjective, adverb, in that order (``leaves`` → ``leave``,
    ``went`` → ``go``, ``bigger`` → ``big``). The first lemma lemminflect gives for that POS is used.
    """
    lemmas = _lemminflect().getAllLemmas(word)
    if not lemmas:
        return word
    if ("VERB" in lemmas) and (word.endswith("ing") or word.endswith("ed")) and "AUX" not in lemmas:
        return lemmas["VERB"][0] or word
    for pos in _POS_ORDER:
        if pos in lemmas:
            return lemmas[pos][0] or word
    return next(iter(lemmas.values()))[0] or word


_WORDNET_DATA = (("corpora/wordnet", "wordnet"), ("corpora/omw-1.4", "omw-1.4"), ("tokenizers/punkt_tab", "punkt_tab"),
                 ("taggers/averaged_perceptron_tagger_eng", "averaged_perceptron_tagger_eng"))


def _find_nltk_data(nltk, path: str) -> bool:
    try:
        nltk.data.find(path)
    except LookupError:
        try:  # zipped corpora are found under their .zip name
            nltk.data.find(path + ".zip")
        except LookupError:
            return False
    return True


@lru_cache(maxsize=1)
def _wordnet_tools() -> tuple[Callable[[str], list[str]], Callable[[str], str]]:
    """(tokenise, lemmatise-one-word) of the reference, from a local NLTK install; never downloads."""
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer
    except ImportError:
        raise _missing_package("nltk", "nltk") from None
    missing = [name for path, name in _WORDNET_DATA if not _find_nltk_data(nltk, path)]
    if missing:
        raise KVCommError(f"lemmatizer='wordnet' needs the NLTK data {missing}, which are not installed locally; "
                          f"install them (python -m nltk.downloader {' '.join(missing)}) or use "
                          "lemmatizer='lemminflect'")
    wordnet = WordNetLemmatizer()
    pos_map = {"J": "a", "N": "n", "V": "v", "R": "r"}

    @lru_cache(maxsize=65536)
    def lemma(word: str) -> str:
        tag = nltk.pos_tag([word])[0][1]
        return wordnet.lemmatize(word, pos_map.get(tag[:1], "n"))

    return nltk.word_tokenize, lemma


def _tokenize(text: str) -> list[str]:
    words: list[str] = []
    for word in text.split():
        words.extend(_TREEBANK_SPLITS.get(word, (word,)))
    return words


def _lemmatize(text: str, lemmatizer: str) -> str:
    """Step 2 of §7.3: lemmatise word by word, words joined by single spaces."""
    if lemmatizer == "lemminflect":
        return " ".join(lemminflect_lemma(word) for word in _tokenize(text))
    if lemmatizer == "wordnet":
        tokenize, lemma = _wordnet_tools()
        return " ".join(lemma(word) for word in tokenize(text))
    raise KVCommError(f"unknown lemmatizer {lemmatizer!r}; choose one of {', '.join(LEMMATIZERS)}")


def lemma_set(text: str, lemmatizer: str = "lemminflect") -> set[str]:
    """The set of words F1-match compares: normalise + lemmatise, twice (§7.3 steps 1–3)."""
    once = _lemmatize(normalize_f1_match(text), lemmatizer)
    return set(_lemmatize(normalize_f1_match(once), lemmatizer).split())


def set_f1(prediction: str, gold: str, lemmatizer: str = "lemminflect") -> float:
    """F1 of §7.3 step 4 between the word sets of one prediction and one gold answer (0 when either is empty)."""
    gold_set, pred_set = lemma_set(gold, lemmatizer), lemma_set(prediction, lemmatizer)
    common = len(gold_set & pred_set)
    if common == 0:
        return 0.0
    precision, recall = common / len(gold_set), common / len(pred_set)
    return 2 * precision * recall / (precision + recall)


def f1_match(prediction: str, gold: str | Sequence[str], lemmatizer: str = "lemminflect") -> float:
    """The paper's F1-match: 1.0 when the best :func:`set_f1` over the gold answer(s) is > 0.5, else 0.0.

    An empty prediction, an empty gold list or empty gold strings score 0."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not prediction.strip() or not golds:
        return 0.0
    best = max((set_f1(prediction, answer, lemmatizer) for answer in golds if answer.strip()), default=0.0)
    return float(best > F1_MATCH_THRESHOLD)


# --- ROUGE-L recall (TMATH, SAMSum) -----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _rouge():
    try:
        from rouge import Rouge
    except ImportError:
        raise KVCommError("rouge_l_recall needs the package 'rouge'; install it (pip install rouge==1.0.1)") from None
    return Rouge()


def rouge_l_recall(prediction: str, reference: str | Sequence[str]) -> float:
    """ROUGE-L recall as the reference computes it: ``Rouge().get_scores(prediction, reference)[0]["rouge-l"]["r"]``
    of the ``rouge`` package (summary-level LCS over "."-separated sentences, whitespace tokens, case-sensitive),
    the maximum over several references; any failure (e.g. an empty prediction) scores 0."""
    references = [reference] if isinstance(reference, str) else list(reference)
    scorer = _rouge()
    best = 0.0
    for text in references:
        try:
            best = max(best, float(scorer.get_scores(prediction, text)[0]["rouge-l"]["r"]))
        except Exception as error:  # noqa: BLE001 - the reference scores every failure as 0
            logger.debug("rouge_l_recall scored 0: %s", error)
    return best


METRICS = {"token_f1": token_f1, "exact_match": exact_match, "contains": contains, "f1_match": f1_match,
           "rouge_l_recall": rouge_l_recall}


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
