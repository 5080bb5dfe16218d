"""Key-fact extraction: patterns, content types, the token budget, determinism."""

from __future__ import annotations

import pytest

from kvcomm.facts import (
    CONTENT_TYPES,
    FactsConfig,
    KeyFacts,
    detect_content_type,
    extract_facts,
    rank_facts,
    sentence_spans,
    whitespace_tokens,
)

FINANCIAL = (
    "Acme Corp reported quarterly revenue of $4.2 million, up 17% from a year earlier, while operating costs fell 3%. "
    "Net profit reached $850,000 and the margin improved to 20.2 percent. The company expects sales growth of 10% in "
    "the next fiscal year and will pay a dividend of $0.12 per share on 12 March 2024. Shares rose 5% after the "
    "earnings call; analysts raised the price target to $38."
)
TECHNICAL = (
    "The API exposes a REST endpoint at https://api.example.com/v1/items. Every request needs an Authorization header "
    "with a bearer token. The server runs version 2.4.1 on 8 cores with 32 GB RAM, and the rate limit is 100 requests "
    "per minute. Responses take about 120 ms. Install the client library with pip; release v3.0.0 adds retries and a "
    "configuration parameter for timeouts. Report bugs to dev@example.com."
)
STORY = (
    "Long ago, in the village of Ollerby, lived a shepherd named Tomas Brenn. His daughter Ilsa dreamed of the sea. "
    "One winter the old king Aldric of Varn sent riders to every town, asking for a guide across the mountains. Tomas "
    "said he knew the path, and Ilsa begged to go with him. They left at dawn with the riders of Captain Mera Voss. On "
    "the third night a storm buried the pass, and Ilsa found a cave where the company waited until the wind died. When "
    "they reached Varn, King Aldric gave Tomas a silver horn and promised Ilsa a ship of her own."
)
MIXED = (
    "Acme shipped firmware v2.3.1 for the Falcon X, priced at $1,299, see https://x.org/a for the notes. The unit "
    "weighs 3.5 kg and sales grew 17% after the launch on 12 March 2024. Questions go to help@acme.com."
)

PATTERNS_ONLY = FactsConfig(budget_tokens=200, use_keyphrases=False, use_entities=False, keep_sentences=False,
                            max_facts=100)


def kinds_of(result: KeyFacts) -> list[str]:
    return [fact.kind for fact in result.facts]


@pytest.mark.parametrize("text, expected, kind", [
    ("The deal was worth $4.2 million in total.", "$4.2 million", "price"),
    ("Fees are USD 1,200 a year.", "USD 1,200", "price"),
    ("A ticket costs €30.", "€30", "price"),
    ("Sales rose 17% this year.", "17%", "percentage"),
    ("Costs fell 3.5 percent.", "3.5 percent", "percentage"),
    ("We met on 12 March 2024 in town.", "12 March 2024", "date"),
    ("It opened on March 12, 2024.", "March 12, 2024", "date"),
    ("The log starts 2024-03-12.", "2024-03-12", "date"),
    ("Docs live at https://x.org/a.", "https://x.org/a", "url"),
    ("Write to sales@acme.com today.", "sales@acme.com", "email"),
    ("Upgrade to v2.3.1 now.", "v2.3.1", "version"),
    ("This is version 5.1 of the tool.", "version 5.1", "version"),
    ("The laptop weighs 3.5 kg.", "3.5 kg", "quantity"),
    ("The CPU runs at 2.4 GHz.", "2.4 GHz", "quantity"),
    ("She was born in 1952.", "1952", "year"),
])
def test_patterns_catch_each_kind(text, expected, kind):
    facts = extract_facts(text, PATTERNS_ONLY).facts
    assert [(f.text, f.kind) for f in facts] == [(expected, kind)]
    assert text[facts[0].start:facts[0].end] == expected


def test_longer_patterns_claim_their_span():
    facts = {f.text: f.kind for f in extract_facts(MIXED, PATTERNS_ONLY).facts}
    assert facts == {"v2.3.1": "version", "$1,299": "price", "https://x.org/a": "url", "3.5 kg": "quantity",
                     "17%": "percentage", "12 March 2024": "date", "help@acme.com": "email"}  # no "2024" year


def test_entities_and_keyphrases():
    result = extract_facts(STORY, FactsConfig(budget_tokens=200, max_facts=100, keep_sentences=False))
    texts = [f.text for f in result.facts]
    assert {"Tomas Brenn", "Captain Mera Voss"} <= set(texts)
    assert "keyphrase" in kinds_of(result)
    assert not any(t in texts for t in ("The", "His", "March", "Long"))


def test_yake_runs_offline_and_is_switchable():
    with_keyphrases = rank_facts(TECHNICAL, FactsConfig(), "technical")
    without = rank_facts(TECHNICAL, FactsConfig(use_keyphrases=False), "technical")
    assert any(f.kind == "keyphrase" for f in with_keyphrases)
    assert not any(f.kind == "keyphrase" for f in without)
    no_patterns = rank_facts(TECHNICAL, FactsConfig(use_patterns=False), "technical")
    assert {f.kind for f in no_patterns} <= {"entity", "keyphrase"}


@pytest.mark.parametrize("text, expected", [(FINANCIAL, "numeric"), (TECHNICAL, "technical"), (STORY, "narrative"),
                                            ("Bob lives in Ollerby.", "short")])
def test_content_type_detection(text, expected):
    assert detect_content_type(text) == expected
    assert extract_facts(text).content_type == expected


def test_detected_types_keep_different_kinds_of_facts():
    config = FactsConfig(budget_tokens=20, keep_sentences=False)
    financial = kinds_of(extract_facts(FINANCIAL, config))
    technical = kinds_of(extract_facts(TECHNICAL, config))
    story = kinds_of(extract_facts(STORY, config))
    assert financial[:4] == ["price"] * 4 and "percentage" in financial
    assert technical[:4] == ["url", "email", "version", "version"]
    assert story[0] == "entity" and not {"price", "percentage", "url", "version"} & set(story)


def test_content_type_changes_what_is_kept_from_the_same_text():
    def kept(content_type: str) -> list[str]:
        config = FactsConfig(budget_tokens=8, keep_sentences=False, content_type=content_type)
        return kinds_of(extract_facts(MIXED, config))

    numeric, technical, narrative = kept("numeric"), kept("technical"), kept("narrative")
    assert numeric[0] == "price" and "percentage" in numeric and "version" not in numeric
    assert technical[0] in ("url", "version") and "version" in technical and "price" not in technical
    assert narrative[0] in ("entity", "keyphrase") and "url" not in narrative
    assert len({tuple(numeric), tuple(technical), tuple(narrative)}) == 3


def char_tokens(text: str) -> int:
    return (len(text) + 3) // 4  # a crude sub-word tokenizer: about 4 characters a token


@pytest.mark.parametrize("count_tokens", [None, char_tokens])
@pytest.mark.parametrize("budget", [1, 3, 5, 8, 13, 21, 34, 55, 89])
@pytest.mark.parametrize("text", [FINANCIAL, TECHNICAL, STORY, MIXED])
def test_budget_is_never_exceeded(text, budget, count_tokens):
    result = extract_facts(text, FactsConfig(budget_tokens=budget), count_tokens=count_tokens)
    count = count_tokens or whitespace_tokens
    assert result.tokens == count(result.text) <= budget
    if result.text:
        assert result.text.startswith("Key facts: ")
        assert all(fact.text in result.text for fact in result.facts)
    else:
        assert result.facts == () and result.sentences == ()


def test_budget_grows_the_text_monotonically():
    sizes = [len(extract_facts(FINANCIAL, FactsConfig(budget_tokens=b)).facts) for b in (3, 6, 12, 24)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_whole_sentences_of_top_facts_when_budget_allows():
    config = FactsConfig(budget_tokens=80, max_facts=3)
    result = extract_facts(FINANCIAL, config)
    assert result.sentences, result.text
    top = result.facts[0]
    spans = sentence_spans(FINANCIAL)
    holding = next(FINANCIAL[a:b] for a, b in spans if a <= top.start < b)
    assert result.sentences[0] == " ".join(holding.split())
    assert "\nKey sentences: " in result.text
    tight = extract_facts(FINANCIAL, FactsConfig(budget_tokens=12, max_facts=3))
    assert tight.sentences == () and tight.facts == result.facts
    off = extract_facts(FINANCIAL, FactsConfig(budget_tokens=80, max_facts=3, keep_sentences=False))
    assert off.sentences == () and "Key sentences" not in off.text


@pytest.mark.parametrize("context", ["", "   \n "])
def test_empty_context(context):
    result = extract_facts(context)
    assert (result.text, result.facts, result.tokens) == ("", (), 0)


def test_empty_budget():
    result = extract_facts(FINANCIAL, FactsConfig(budget_tokens=0))
    assert (result.text, result.facts, result.sentences, result.tokens) == ("", (), (), 0)
    assert result.candidates  # the candidates are still reported


def test_deterministic():
    config = FactsConfig(budget_tokens=40)
    for text in (FINANCIAL, TECHNICAL, STORY, MIXED):
        assert extract_facts(text, config) == extract_facts(text, config)


@pytest.mark.parametrize("kwargs", [{"budget_tokens": -1}, {"max_ngram": 0}, {"content_type": "poetry"},
                                    {"max_facts": -2}])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        FactsConfig(**kwargs)


def test_every_content_type_has_a_weight_for_every_kind():
    from kvcomm.facts import TYPE_WEIGHTS

    kinds = set(TYPE_WEIGHTS["general"])
    assert set(TYPE_WEIGHTS) == set(CONTENT_TYPES)
    assert all(set(weights) == kinds for weights in TYPE_WEIGHTS.values())


def test_sentence_split_keeps_abbreviations_and_decimals():
    text = "Dr. Smith paid $4.2 million. He left! Version 2.3.1 shipped."
    assert [text[a:b] for a, b in sentence_spans(text)] == ["Dr. Smith paid $4.2 million.", "He left!",
                                                            "Version 2.3.1 shipped."]


def test_budget_in_tokens_of_a_tokenizer():
    from kvcomm.facts import token_counter
    from tests.conftest import byte_tokenizer

    count = token_counter(byte_tokenizer())  # one token per byte
    assert count("Key facts: 17%") == len("Key facts: 17%")
    for budget in (10, 40, 120, 400):
        result = extract_facts(MIXED, FactsConfig(budget_tokens=budget), count_tokens=count)
        assert len(result.text.encode()) == result.tokens <= budget
