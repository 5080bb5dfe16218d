from __future__ import annotations

import pytest

from kvcomm.metrics import contains, exact_match, normalize_answer, score_all, token_f1
from kvcomm.prompts import chat_text
from kvcomm.tasks import get_task
from kvcomm.tasks.paper import supporting_sentences
from tests.conftest import shared_data_dir


def test_token_f1_and_exact_match():
    assert normalize_answer("The  Answer, is: Paris!") == "answer is paris"
    assert token_f1("Paris", "paris") == 1.0
    assert token_f1("The city of Paris", "Paris") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert token_f1("", "Paris") == 0.0 and token_f1("London", "Paris") == 0.0
    assert exact_match("the Paris.", "Paris") == 1.0 and exact_match("in Paris", "Paris") == 0.0


def test_contains_matches_whole_words():
    assert contains("Bob lives in Ollerby.", "Ollerby") == 1.0
    assert contains("4821.", "4821") == 1.0
    assert contains("48210", "4821") == 0.0
    assert score_all("Ollerby", ["x", "Ollerby"])["exact_match"] == 1.0
    assert score_all("anything", [])["token_f1"] == 0.0


def test_demo_task_is_deterministic_and_answerable_only_from_context():
    first, second = get_task("demo").load(), get_task("demo").load()
    assert [e.context for e in first.test] == [e.context for e in second.test]
    for example in first.test[:50]:
        assert example.answers[0] in example.context
        assert example.answers[0] not in example.messages["receiver"]
        assert example.answers[0] not in example.messages["baseline"]
        assert example.answers[0] in example.messages["skyline"]
        assert 1 <= example.context.count(".") <= 2
        assert example.answer_prefix.split()[0] in example.question


def test_paper_templates_in_chat(tiny):
    example = get_task("demo").load().test[0]
    assert example.messages["sender"].startswith("Instruction: Directly answer the question based on the context "
                                                 "passage, no explanation is needed. Context: ")
    text = chat_text(tiny.tokenizer, example.messages["receiver"], "Bob lives in")
    assert text.startswith("<s><user>Instruction:") and text.endswith("<assistant>Bob lives in")


def test_paper_tasks_read_shared_data():
    data = shared_data_dir()
    countries = get_task("countries").load(data)
    assert len(countries.test) == 200 and countries.calibration
    first = countries.test[0]
    assert first.context == "Uma is at the Mahaffie House."
    assert first.question.endswith("located in?You are required to extrapolate the country from the context.")
    assert first.max_new_tokens == 5 and first.answers == ("United States",)
    tipsheets = get_task("tipsheets").load(data)
    assert len(tipsheets.test) == 450 and len(tipsheets.calibration) == 50 and tipsheets.test[0].max_new_tokens == 10
    hotpot = get_task("hotpotqa").load(data)
    assert len(hotpot.test) == 500 and len(hotpot.calibration) == 100
    assert hotpot.test[0].answers == ("Prussian",) and hotpot.test[0].max_new_tokens == 48
    assert len(hotpot.test[0].context.split("\n")) == 3


def test_supporting_sentences_follow_the_given_facts():
    row = {"context": {"title": ["A", "B"], "sentences": [["a0 ", " a1"], ["b0"]]},
           "supporting_facts": {"title": ["B", "A", "C"], "sent_id": [0, 1, 0]}}
    assert supporting_sentences(row) == ["b0", "a1"]


def test_paper_coherence_heuristic():
    from kvcomm.metrics import paper_coherence

    assert paper_coherence("") == 0.0 and paper_coherence("ab") == 0.0
    assert paper_coherence("Paris is the capital.") == pytest.approx(0.3 + 0.2 + 0.2 + 0.3)
    assert paper_coherence("paris paris paris") == pytest.approx(0.3 + 0.3 / 3)
    assert paper_coherence("Paris") == pytest.approx(0.2 + 0.3)
