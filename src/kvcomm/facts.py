"""Key facts of a context as a short text under a token budget (Q-KVComm's "hybrid information extraction").

A text side channel, not a KV operation: the receiver's prompt gets a line such as
``Key facts: $4.2 million; 17%; 12 March 2024; Acme Corp`` (and, when the budget allows, the whole sentences that hold
the best facts). Entry point: :func:`extract_facts`.

Pipeline
--------
1. **Patterns** (``use_patterns``), in this order, each match claiming its character span so that a later pattern
   cannot match inside it: URLs, e-mail addresses, prices/currency amounts, percentages, dates, version strings,
   numbers with units, years.
2. **Entities** (``use_entities``): runs of capitalised words (``Bank of England``), a leading function word
   (``The``) stripped, single words at a sentence start, month and weekday names dropped, spans inside a pattern
   match dropped. Confidence 0.8 for several words, 0.6 for one, +0.05 per extra mention (at most 0.95).
3. **Keyphrases** (``use_keyphrases``): YAKE (offline, statistical; language en, n-grams up to ``max_ngram``,
   de-duplication 0.9), confidence ``1 / (1 + yake_score)``, halved for a single word unless its first mention is
   capitalised inside a sentence; phrases without letters or whose first mention overlaps a pattern match
   (``million`` in ``$4.2 million``) are dropped.
4. **Content type** (:func:`detect_content_type`, or ``FactsConfig.content_type``): ``numeric`` (financial),
   ``technical``, ``narrative`` (entity-rich), ``short`` (a short fact) or ``general``. Each type has its own weight
   per fact kind (:data:`TYPE_WEIGHTS`), so the type changes what is kept: a numeric context keeps prices and
   percentages first, a technical one versions, URLs and units, a narrative one names and keyphrases.
5. **Ranking**: ``score = confidence × weight[type][kind]``; ties by first position in the context, then text.
   A candidate is dropped when it equals, contains or is contained in (whole words, case-insensitive) a better one,
   or when its first mention overlaps a better one's (``Corp reported revenue`` after ``Acme Corp``).
6. **Budget** (tokens of ``count_tokens``; default a whitespace count), always measured on the whole output text:

   * facts are added in rank order, at most ``max_facts``; a fact that would overflow the budget is skipped and the
     next one is tried;
   * then, with the tokens left, the sentence holding each kept fact (best fact first, at most ``max_sentences``,
     each sentence once) is appended when it fits; kept sentences are printed in document order after
     ``sentences_prefix``. Facts come first because they are the dense part; sentences add the relations between
     them when there is room.

   No fact fits, an empty context or a budget of 0 gives an empty text. The result is deterministic.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

logger = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]
ContentType = Literal["numeric", "technical", "narrative", "short", "general"]
FactKind = Literal["price", "percentage", "quantity", "date", "year", "url", "email", "version", "entity",
                   "keyphrase"]
CONTENT_TYPES: tuple[ContentType, ...] = ("numeric", "technical", "narrative", "short", "general")

# Weight per fact kind for each content type; the ranking score is confidence × weight.
TYPE_WEIGHTS: dict[ContentType, dict[FactKind, float]] = {
    "numeric": {"price": 1.0, "percentage": 1.0, "quantity": 0.9, "date": 0.8, "year": 0.6, "entity": 0.6,
                "keyphrase": 0.4, "url": 0.3, "email": 0.3, "version": 0.3},
    "technical": {"version": 1.0, "url": 1.0, "email": 0.9, "quantity": 0.9, "keyphrase": 0.7, "entity": 0.6,
                  "percentage": 0.6, "price": 0.5, "date": 0.5, "year": 0.3},
    "narrative": {"entity": 1.0, "keyphrase": 0.8, "date": 0.8, "year": 0.7, "quantity": 0.5, "price": 0.5,
                  "percentage": 0.5, "url": 0.3, "email": 0.3, "version": 0.2},
    "short": {"price": 1.0, "percentage": 1.0, "quantity": 1.0, "date": 1.0, "year": 1.0, "url": 1.0, "email": 1.0,
              "version": 1.0, "entity": 0.9, "keyphrase": 0.6},
    "general": {"price": 0.8, "percentage": 0.8, "quantity": 0.8, "date": 0.8, "year": 0.8, "url": 0.8,
                "email": 0.8, "version": 0.8, "entity": 0.8, "keyphrase": 0.8},
}

# ---------------------------------------------------------------------------------------------------------- patterns
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUM = r"(?<![\w.,])" + _DIGITS
_SCALE = r"(?:thousand|million|billion|trillion|bn|mn|k|m|b)\b"
_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?"
          r"|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\b\.?")
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_UNITS = (
    r"km/h|kph|mph|°C|°F|kWh|mAh|GHz|MHz|kHz|Hz|TiB|GiB|MiB|KiB|TB|GB|MB|KB|kg|mg|lbs?|oz|tonnes?|tons?|km|cm|mm|"
    r"miles?|kilomet(?:er|re)s?|met(?:er|re)s?|kilograms?|grams?|pounds?|ounces?|ml|lit(?:er|re)s?|gallons?|"
    r"bytes?|bits?|kW|MW|watts?|volts?|ms|seconds?|secs?|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|years?|"
    r"px|dpi|fps|rpm|cores?|threads?|tokens?|parameters|params|thousand|million|billion|trillion|g|m|l|h|W|V"
)
PATTERNS: tuple[tuple[FactKind, re.Pattern[str], float], ...] = (
    ("url", re.compile(r"\b(?:https?://|www\.)[^\s<>\"'()\[\]{}]+"), 0.95),
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b"), 0.95),
    ("price", re.compile(
        rf"(?<!\w)(?:US|A|C|NZ|HK)?[$€£¥₹]\s?{_DIGITS}(?:\s?{_SCALE})?"
        rf"|\b(?:USD|EUR|GBP|JPY|CHF|CNY|INR)\s?{_NUM}(?:\s?{_SCALE})?"
        rf"|{_NUM}(?:\s?(?:thousand|million|billion|trillion))?\s?(?:USD|EUR|GBP|JPY|dollars|euros|cents|yen)\b",
        re.IGNORECASE), 0.95),
    ("percentage", re.compile(rf"[+\-−]?{_NUM}\s?(?:%|percent\b|per cent\b|percentage points?\b)", re.IGNORECASE),
     0.9),
    ("date", re.compile(
        rf"\b{_DAY}\s+(?:of\s+)?{_MONTH},?\s+\d{{4}}\b|\b{_MONTH}\s+{_DAY},?\s+\d{{4}}\b|\b{_MONTH}\s+\d{{4}}\b"
        rf"|\b\d{{4}}-\d{{2}}-\d{{2}}\b|\b\d{{1,2}}/\d{{1,2}}/\d{{2,4}}\b|\b\d{{1,2}}\.\d{{1,2}}\.\d{{4}}\b"
        rf"|\bQ[1-4]\s+\d{{4}}\b|\b{_DAY}\s+(?:of\s+)?{_MONTH}|\b{_MONTH}\s+{_DAY}\b"), 0.85),
    ("version", re.compile(
        r"(?<![\w.])(?:v\d+(?:\.\d+){1,3}|\d+\.\d+\.\d+(?:\.\d+)?)(?:-(?:alpha|beta|rc|dev|post)\.?\d*)?\b"
        r"|\b(?:version|release|ver\.)\s+\d+(?:\.\d+)*\b", re.IGNORECASE), 0.85),
    ("quantity", re.compile(rf"{_NUM}(?:\s?(?:thousand|million|billion|trillion))?\s?-?\s?(?:{_UNITS})(?![\w/])"),
     0.9),
    ("year", re.compile(r"(?<![\w.,$])(?:1[6-9]\d\d|20\d\d)(?![\w%]|[.,]\d)"), 0.7),
)
_ENTITY = re.compile(
    r"[A-Z](?:[A-Za-z0-9'’&-]*[A-Za-z0-9])?"
    r"(?:(?:[ \t]+(?:of|de|da|del|der|van|von|du|la|le))?[ \t]+[A-Z](?:[A-Za-z0-9'’&-]*[A-Za-z0-9])?)*"
)
_LEADING_WORDS = frozenset(
    "the a an this that these those in on at for from by with and but or if when while after before during his her "
    "their its our my we he she they it as to of".split()
)
_CALENDAR_WORDS = frozenset(
    "january february march april may june july august september october november december jan feb mar apr jun jul "
    "aug sep sept oct nov dec monday tuesday wednesday thursday friday saturday sunday".split()
)

# ------------------------------------------------------------------------------------------------ content detection
_NUMERIC_CUES = frozenset(
    "revenue profit loss sales price prices cost costs earnings income margin budget market shares stock dividend "
    "quarter quarterly fiscal growth usd eur gbp dollars euros investment investors funding valuation debt tax "
    "billion million percent rate inflation gdp".split()
)
_TECHNICAL_CUES = frozenset(
    "api endpoint endpoints request requests response header headers authentication token server client http https "
    "version release install configuration config parameter parameters cpu gpu ram memory storage latency "
    "throughput protocol database query function library module package error bug firmware software hardware "
    "specification requirement requirements ghz mhz cores bandwidth compile runtime kernel driver".split()
)
_NARRATIVE_CUES = frozenset(
    "said told asked replied born died married lived father mother son daughter wife husband brother sister king "
    "queen prince princess village town journey story love friend family home war he she him her his they".split()
)
_WORD = re.compile(r"[A-Za-z]+")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e inc ltd co corp no fig approx u.s dept est".split()
)
_SENTENCE_BREAK = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9$€£])|\n\s*\n")


@dataclass(frozen=True)
class Fact:
    """One extracted fact: the text as it appears in the context, its kind, and where it first appears."""

    text: str
    kind: FactKind
    confidence: float  # the extractor's confidence in (0, 1]
    score: float  # confidence × the content type's weight for ``kind``: the ranking key
    start: int  # character offset of the first mention in the context (-1 when unknown)
    end: int


@dataclass(frozen=True)
class KeyFacts:
    """The side-channel text and what it holds."""

    text: str  # "Key facts: a; b; c" (+ "\nKey sentences: ..."), or "" when nothing fits
    facts: tuple[Fact, ...]  # the facts in ``text``, best first
    sentences: tuple[str, ...]  # the whole sentences in ``text``, in document order
    content_type: ContentType
    tokens: int  # count_tokens(text)
    candidates: tuple[Fact, ...]  # every ranked candidate before the budget, best first


@dataclass
class FactsConfig:
    """Settings of :func:`extract_facts`. ``budget_tokens`` is counted with the caller's ``count_tokens``."""

    budget_tokens: int = 50
    max_keyphrases: int = 20
    max_ngram: int = 3
    max_facts: int = 12
    max_sentences: int = 2
    use_patterns: bool = True
    use_entities: bool = True
    use_keyphrases: bool = True
    keep_sentences: bool = True
    content_type: ContentType | None = None  # None: detect from the context
    short_words: int = 40  # contexts with fewer words are "short"
    prefix: str = "Key facts: "
    separator: str = "; "
    sentences_prefix: str = "Key sentences: "

    def __post_init__(self) -> None:
        for name in ("budget_tokens", "max_keyphrases", "max_facts", "max_sentences", "short_words"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.max_ngram, int) or self.max_ngram < 1:
            raise ValueError(f"max_ngram must be an integer >= 1, got {self.max_ngram!r}")
        if self.content_type is not None and self.content_type not in CONTENT_TYPES:
            raise ValueError(
                f"content_type must be one of {', '.join(CONTENT_TYPES)} or None, got {self.content_type!r}"
            )


def whitespace_tokens(text: str) -> int:
    """The default token count: whitespace-separated words."""
    return len(text.split())


def token_counter(tokenizer: Any) -> TokenCounter:
    """A ``count_tokens`` for a Hugging Face tokenizer (no special tokens)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``, whitespace trimmed.

    A sentence ends at ``.``, ``!`` or ``?`` (closing quotes/brackets included) followed by whitespace and an
    upper-case letter, a digit or a currency sign, unless the word before the period is a common abbreviation or a
    single initial; a blank line always ends one.
    """
    spans, start = [], 0
    for match in _SENTENCE_BREAK.finditer(text):
        if match.group().startswith("."):
            before = re.search(r"(\S+)$", text[start:match.start()])
            word = before.group(1).lower().lstrip("(\"'") if before else ""
            if word in _ABBREVIATIONS or re.fullmatch(r"[a-z]", word):
                continue
        end = match.start() + len(match.group().rstrip())
        spans.append((start, end))
        start = match.end()
    spans.append((start, len(text)))
    trimmed = []
    for begin, end in spans:
        segment = text[begin:end]
        left = len(segment) - len(segment.lstrip())
        right = len(segment.rstrip())
        if right > left:
            trimmed.append((begin + left, begin + right))
    return trimmed


@dataclass(frozen=True)
class _Analysis:
    """What the pattern and entity passes find, computed once per context."""

    sentences: list[tuple[int, int]]
    patterns: list[Fact]
    pattern_spans: list[tuple[int, int]]
    entities: list[Fact]


def _analyse(context: str) -> _Analysis:
    sentences = sentence_spans(context)
    patterns, spans = _pattern_facts(context)
    return _Analysis(sentences, patterns, spans, _entity_facts(context, sentences, spans))


def detect_content_type(context: str, short_words: int = 40) -> ContentType:
    """``short`` below ``short_words`` words; otherwise the type with most cues (at least 3), else ``general``.

    Cues: numeric = keyword hits + 2 per price/percentage + 1 per quantity; technical = keyword hits + 2 per
    version/URL/e-mail; narrative = keyword hits + 1.5 per multi-word and 1 per single-word entity. Ties go to the
    earlier of numeric, technical, narrative.
    """
    return _detect(context, _analyse(context), short_words)


def _detect(context: str, analysis: _Analysis, short_words: int) -> ContentType:
    words = [word.lower() for word in _WORD.findall(context)]
    if len(words) < short_words:
        return "short"
    kinds = [fact.kind for fact in analysis.patterns]
    numeric = sum(word in _NUMERIC_CUES for word in words) + 2 * sum(k in ("price", "percentage") for k in kinds)
    numeric += sum(k == "quantity" for k in kinds)
    technical = sum(word in _TECHNICAL_CUES for word in words)
    technical += 2 * sum(k in ("version", "url", "email") for k in kinds)
    narrative: float = sum(word in _NARRATIVE_CUES for word in words)
    narrative += sum(1.5 if " " in fact.text else 1.0 for fact in analysis.entities)
    scores: dict[ContentType, float] = {"numeric": numeric, "technical": technical, "narrative": narrative}
    best = max(scores, key=lambda name: scores[name])  # max keeps the first of equal scores
    logger.debug("content type scores %s", scores)
    return best if scores[best] >= 3 else "general"


def extract_facts(context: str, config: FactsConfig | None = None,
                  count_tokens: TokenCounter | None = None) -> KeyFacts:
    """Key facts of ``context`` as a text of at most ``config.budget_tokens`` tokens (see the module docstring).

    Parameters
    ----------
    context : the sender's context text.
    config : extraction settings; ``FactsConfig()`` when None.
    count_tokens : ``count_tokens(text) -> int`` of the receiver's tokenizer (see :func:`token_counter`);
        a whitespace word count when None.
    """
    config = config or FactsConfig()
    count = count_tokens or whitespace_tokens
    analysis = _analyse(context)
    content_type = config.content_type or _detect(context, analysis, config.short_words)
    if not context.strip():
        return KeyFacts("", (), (), content_type, 0, ())
    candidates = _rank(context, analysis, config, content_type)
    if config.budget_tokens == 0:
        return KeyFacts("", (), (), content_type, 0, candidates)

    kept: list[Fact] = []
    for fact in candidates:
        if len(kept) >= config.max_facts:
            break
        if count(_render(config, [*kept, fact], [])) <= config.budget_tokens:
            kept.append(fact)
    if not kept:
        return KeyFacts("", (), (), content_type, 0, candidates)

    chosen: list[tuple[int, int]] = []
    if config.keep_sentences and config.max_sentences > 0:
        for fact in kept:
            if len(chosen) >= config.max_sentences:
                break
            span = next((s for s in analysis.sentences if s[0] <= fact.start < s[1]), None)
            if span is None or span in chosen:
                continue
            trial = sorted([*chosen, span])
            if count(_render(config, kept, [context[a:b] for a, b in trial])) <= config.budget_tokens:
                chosen = trial
    sentences = [" ".join(context[a:b].split()) for a, b in chosen]
    text = _render(config, kept, sentences)
    return KeyFacts(text, tuple(kept), tuple(sentences), content_type, count(text), candidates)


def rank_facts(context: str, config: FactsConfig, content_type: ContentType) -> tuple[Fact, ...]:
    """Every candidate fact of ``context``, scored for ``content_type``, de-duplicated, best first."""
    return _rank(context, _analyse(context), config, content_type)


def _rank(context: str, analysis: _Analysis, config: FactsConfig, content_type: ContentType) -> tuple[Fact, ...]:
    weights = TYPE_WEIGHTS[content_type]
    raw: list[Fact] = []
    if config.use_patterns:
        raw += analysis.patterns
    if config.use_entities:
        raw += analysis.entities
    if config.use_keyphrases and config.max_keyphrases > 0:
        raw += _keyphrase_facts(context, analysis, config.max_keyphrases, config.max_ngram)
    scored = [Fact(f.text, f.kind, f.confidence, round(f.confidence * weights[f.kind], 6), f.start, f.end)
              for f in raw if weights[f.kind] > 0]
    scored.sort(key=lambda f: (-f.score, f.start if f.start >= 0 else len(context), f.text))
    ranked: list[Fact] = []
    for fact in scored:
        if not _normalise(fact.text) or any(_redundant(fact, better) for better in ranked):
            continue
        ranked.append(fact)
    return tuple(ranked)


def _redundant(fact: Fact, better: Fact) -> bool:
    """Same words as ``better``, inside it or around it, or a first mention overlapping ``better``'s."""
    mine, theirs = _normalise(fact.text), _normalise(better.text)
    if _contains(mine, theirs) or _contains(theirs, mine):
        return True
    return fact.start >= 0 and better.start >= 0 and fact.start < better.end and better.start < fact.end


def _render(config: FactsConfig, facts: Sequence[Fact], sentences: Sequence[str]) -> str:
    text = config.prefix + config.separator.join(fact.text for fact in facts)
    if sentences:
        text += "\n" + config.sentences_prefix + " ".join(" ".join(s.split()) for s in sentences)
    return text


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(".,;:!?\"'()[]")


def _contains(inner: str, outer: str) -> bool:
    """``inner`` occurs in ``outer`` as whole words."""
    return re.search(rf"(?<!\w){re.escape(inner)}(?!\w)", outer) is not None


def _overlaps(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(start < b and a < end for a, b in spans)


def _pattern_facts(context: str) -> tuple[list[Fact], list[tuple[int, int]]]:
    """Regex facts in :data:`PATTERNS` order, and the spans they claimed (a later pattern cannot match inside)."""
    claimed: list[tuple[int, int]] = []
    facts: list[Fact] = []
    seen: set[str] = set()
    for kind, pattern, confidence in PATTERNS:
        for match in pattern.finditer(context):
            text = match.group().strip()
            if kind == "url":
                text = text.rstrip(".,;:!?")
            start = match.start() + (len(match.group()) - len(match.group().lstrip()))
            end = start + len(text)
            if not text or _overlaps(start, end, claimed):
                continue
            claimed.append((start, end))
            if _normalise(text) not in seen:
                seen.add(_normalise(text))
                facts.append(Fact(text, kind, confidence, confidence, start, end))
    return facts, claimed


def _entity_facts(context: str, sentences: Sequence[tuple[int, int]],
                  pattern_spans: Sequence[tuple[int, int]]) -> list[Fact]:
    starts = {a + (1 if context[a] in "\"'“‘([" else 0) for a, _ in sentences}
    found: dict[str, Fact] = {}
    mentions: dict[str, int] = {}
    for match in _ENTITY.finditer(context):
        start, words = match.start(), match.group().split()
        while words and words[0].lower() in _LEADING_WORDS:
            start = context.index(words[1], start + len(words[0])) if len(words) > 1 else match.end()
            words = words[1:]
        if not words:
            continue
        text = " ".join(words)
        end = match.end()
        if len(words) == 1 and (start in starts or len(text) < 2 or text.lower() in _CALENDAR_WORDS):
            continue
        if _overlaps(start, end, pattern_spans):
            continue
        key = _normalise(text)
        mentions[key] = mentions.get(key, 0) + 1
        if key not in found:
            found[key] = Fact(text, "entity", 0.0, 0.0, start, end)
    facts = []
    for key, fact in found.items():
        base = 0.8 if " " in fact.text else 0.6
        confidence = round(min(0.95, base + 0.05 * (mentions[key] - 1)), 6)
        facts.append(Fact(fact.text, "entity", confidence, confidence, fact.start, fact.end))
    return facts


@lru_cache(maxsize=8)
def _yake_extractor(max_keyphrases: int, max_ngram: int) -> Any:
    try:
        import yake  # type: ignore[import-untyped]
    except ImportError as error:  # pragma: no cover - yake is a dependency
        raise ImportError("keyphrase extraction needs the 'yake' package (pip install yake), "
                          "or set FactsConfig(use_keyphrases=False)") from error
    return yake.KeywordExtractor(lan="en", n=max_ngram, dedup_lim=0.9, top=max_keyphrases)


def _keyphrase_facts(context: str, analysis: _Analysis, max_keyphrases: int, max_ngram: int) -> list[Fact]:
    starts = {a for a, _ in analysis.sentences}
    facts = []
    for phrase, score in _yake_extractor(max_keyphrases, max_ngram).extract_keywords(context):
        text = " ".join(str(phrase).split()).strip(".,;:!?\"'()[]")
        if not re.search(r"[A-Za-z]", text):
            continue
        words = r"\s+".join(re.escape(word) for word in text.split())
        match = re.search(rf"(?<!\w){words}(?!\w)", context, re.IGNORECASE)
        start, end = (match.start(), match.end()) if match else (-1, -1)
        if match and _overlaps(start, end, analysis.pattern_spans):
            continue
        confidence = 1.0 / (1.0 + float(score))
        if " " not in text and (start < 0 or start in starts or context[start].islower()):
            confidence /= 2  # a lone common or sentence-initial word ("year", "Questions") says little on its own
        confidence = round(confidence, 6)
        facts.append(Fact(text, "keyphrase", confidence, confidence, start, end))
    return facts
