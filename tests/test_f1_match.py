"""The paper's F1-match and ROUGE-L recall (spec §7.3), on hand-worked cases."""

from __future__ import annotations

import sys

import pytest

from kvcomm.errors import KVCommError
from kvcomm.metrics import (
    METRICS,
    f1_match,
    lemma_set,
    lemminflect_lemma,
    normalize_f1_match,
    rouge_l_recall,
    score_all,
    set_f1,
)


def test_normalisation_follows_the_spec():
    assert normalize_f1_match("The country is Japan.") == "country is japan"
    # Unicode punctuation (P*) is removed, not replaced by a space; accents stay
    assert normalize_f1_match("“São Paulo”—an  answer!") == "são pauloan answer"
    assert normalize_f1_match("It’s A test, isn't it?") == "its test isnt it"
    assert normalize_f1_match("$5 + 3") == "5 3"  # ASCII symbols are string.punctuation too


def test_lemmas_of_single_words():
    expected = {"is": "be", "was": "be", "has": "have", "country": "country", "japan": "japan", "running": "run",
                "ran": "run", "marathons": "marathon", "children": "child", "mice": "mouse", "studies": "study",
                "went": "go", "born": "bear", "bigger": "big", "1987": "1987", "rákóczi": "rákóczi"}
    assert {word: lemminflect_lemma(word) for word in expected} == expected


def test_japan_example_of_the_spec():
    assert lemma_set("The country is Japan.") == {"country", "be", "japan"}
    assert set_f1("The country is Japan.", "Japan") == pytest.approx(0.5)
    assert f1_match("The country is Japan.", "Japan") == 0.0  # F1 = 0.5 is not > 0.5
    assert f1_match("Japan.", "Japan") == 1.0
    assert f1_match("japan", "JAPAN!") == 1.0


def test_threshold_is_strict_and_uses_sets():
    assert set_f1("red bike", "red car") == pytest.approx(0.5) and f1_match("red bike", "red car") == 0.0
    # {new, york} against {new, york, city}: p = 2/3, r = 1, F1 = 0.8
    assert set_f1("New York", "New York City") == pytest.approx(0.8) and f1_match("New York", "New York City") == 1.0
    # sets: repeating a word changes nothing
    assert set_f1("Paris Paris Paris", "Paris") == 1.0


def test_plurals_and_verb_forms_lemmatise_equal():
    assert f1_match("running marathons", "ran a marathon") == 1.0
    assert f1_match("The children", "child") == 1.0
    assert f1_match("mice", "mouse") == 1.0
    assert lemma_set("He was born in 1987") == lemma_set("he is bear in 1987")


def test_several_golds_take_the_best_and_empty_scores_zero():
    assert f1_match("Paris", ["London", "Paris"]) == 1.0
    assert f1_match("Paris", ["London", "Berlin"]) == 0.0
    assert f1_match("", "Paris") == 0.0 and f1_match("   ", ["Paris"]) == 0.0
    assert f1_match("Paris", "") == 0.0 and f1_match("Paris", []) == 0.0
    assert f1_match("the", "the") == 0.0  # only an article: empty after normalisation


def test_wordnet_lemmatizer_never_downloads(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # as if nltk were not installed
    with pytest.raises(KVCommError, match="nltk"):
        f1_match("Japan", "Japan", lemmatizer="wordnet")
    with pytest.raises(KVCommError, match="unknown lemmatizer"):
        f1_match("Japan", "Japan", lemmatizer="porter")


def test_rouge_l_recall_hand_worked():
    assert rouge_l_recall("a b c d", "a b c d") == 1.0
    assert rouge_l_recall("c b a", "a b c") == pytest.approx(1 / 3)
    # the rouge package counts distinct words: reference {the, cat, was, on, mat}, LCS words {the, cat, on, mat}
    assert rouge_l_recall("the cat sat on the mat", "the cat was on the mat") == pytest.approx(0.8)
    # summary level: union of the LCS with each reference sentence ("." splits sentences)
    assert rouge_l_recall("c d a b", "a b. c d.") == pytest.approx(1.0)
    assert rouge_l_recall("a x", ["a b c d", "a b"]) == pytest.approx(0.5)  # max over references
    assert rouge_l_recall("Paris", "paris") == 0.0  # case-sensitive, like the reference
    assert rouge_l_recall("", "a b") == 0.0 and rouge_l_recall("...", "a b") == 0.0  # exceptions score 0


def test_score_all_has_every_metric():
    assert set(METRICS) == {"token_f1", "exact_match", "contains", "f1_match", "rouge_l_recall"}
    scores = score_all("The country is Japan.", ["Japan"])
    assert set(scores) == set(METRICS)
    assert scores["f1_match"] == 0.0 and scores["contains"] == 1.0
    assert scores["token_f1"] == pytest.approx(0.5)  # continuous F1 is unchanged
    assert score_all("Japan", ["x", "Japan"])["f1_match"] == 1.0
    assert score_all("anything", []) == {name: 0.0 for name in METRICS}
