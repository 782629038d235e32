"""The message-search query language, its errors and snippets: pure Python, no ClickHouse.

A query is words and ``"quoted phrases"``, all ANDed, case-insensitive. Text is compared the way
the search table stores it (``search.NORMALIZED_TEXT``): lower-cased, every run of characters
that are not letters or digits turned into one space. So ``Hello, World!`` is the tokens
``hello world``; the query ``WORLD`` finds it and so does ``"hello world"``, but ``"world hello"``
does not. Punctuation inside a query word splits it (``e-mail`` is the phrase ``"e mail"``).

Both doors parse with :func:`parse_query` — the analytics API (analysts) and the ingress (users'
own conversations) — so a query is refused with the same :class:`SearchErrorCode` everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from schemas.errors import ApiError

#: The longest query, in characters.
MAX_QUERY_CHARS: Final = 200
#: The most tokens a query may hold, words and the words of phrases together.
MAX_QUERY_TERMS: Final = 8
#: Hits per page: the default and the most.
DEFAULT_LIMIT: Final = 20
MAX_LIMIT: Final = 100
#: The most (conversation, seq range) pairs one scoped search may name (a user's search covers
#: the user's most recently active conversations up to this many).
MAX_SCOPE: Final = 5000
#: How much text a snippet shows around its first match, in characters either side.
SNIPPET_CONTEXT_CHARS: Final = 60
MARK_START: Final = "«"
MARK_END: Final = "»"

# Letters and digits of any script; the same set as ClickHouse's [\p{L}\p{N}] for all but a few
# exotic characters (Python's str.isalnum), which only decides where a token ends.
_TOKEN = re.compile(r"[^\W_]+")
_PHRASE = re.compile(r'"([^"]*)"')


class SearchErrorCode(StrEnum):
    """The ``code`` of a search error body; never changes meaning once released."""

    QUERY_EMPTY = "query-empty"
    QUERY_TOO_LONG = "query-too-long"
    QUERY_TOO_MANY_TERMS = "query-too-many-terms"
    QUERY_UNBALANCED_QUOTE = "query-unbalanced-quote"
    UNKNOWN_PARAMETER = "unknown-parameter"
    INVALID_PARAMETER = "invalid-parameter"
    INVALID_CURSOR = "invalid-cursor"
    UNAVAILABLE = "unavailable"

    @property
    def http_status(self) -> int:
        return 503 if self is SearchErrorCode.UNAVAILABLE else 400


class SearchError(ApiError):
    """A refused or failed search."""

    code: SearchErrorCode


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A parsed query: single words and phrases (each two or more words), all required."""

    text: str
    words: tuple[str, ...]
    phrases: tuple[tuple[str, ...], ...]

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every distinct token the query needs, words and phrase words (what the index looks
        up), in order of appearance."""
        seen: dict[str, None] = {}
        for token in (*self.words, *(word for phrase in self.phrases for word in phrase)):
            seen.setdefault(token, None)
        return tuple(seen)


def tokenize(text: str) -> list[str]:
    """``text`` as the search table's tokens: lower-cased runs of letters and digits."""
    return _TOKEN.findall(text.lower())


def parse_query(text: str | None, field: str = "q") -> SearchQuery:
    """``text`` as a :class:`SearchQuery`; raises :class:`SearchError` with the reason."""
    text = (text or "").strip()
    if not text:
        raise SearchError(SearchErrorCode.QUERY_EMPTY, "the query is empty; give words", field)
    if len(text) > MAX_QUERY_CHARS:
        raise SearchError(
            SearchErrorCode.QUERY_TOO_LONG,
            f"the query is {len(text)} characters; the limit is {MAX_QUERY_CHARS}",
            field,
        )
    if text.count('"') % 2:
        raise SearchError(
            SearchErrorCode.QUERY_UNBALANCED_QUOTE,
            'a quoted phrase is not closed: quotes must come in pairs ("like this")',
            field,
        )
    words: list[str] = []
    phrases: list[tuple[str, ...]] = []
    for phrase in _PHRASE.findall(text):
        tokens = tokenize(phrase)
        if len(tokens) == 1:
            words.extend(tokens)
        elif tokens:
            phrases.append(tuple(tokens))
    words.extend(tokenize(_PHRASE.sub(" ", text)))
    query = SearchQuery(
        text=text, words=tuple(dict.fromkeys(words)), phrases=tuple(dict.fromkeys(phrases))
    )
    if not query.tokens:
        raise SearchError(
            SearchErrorCode.QUERY_EMPTY,
            "the query has no words (letters or digits) to search for",
            field,
        )
    if len(query.tokens) > MAX_QUERY_TERMS:
        raise SearchError(
            SearchErrorCode.QUERY_TOO_MANY_TERMS,
            f"the query has {len(query.tokens)} distinct words; the limit is {MAX_QUERY_TERMS}",
            field,
        )
    return query


def _pattern(query: SearchQuery) -> re.Pattern[str]:
    """Where any word or phrase of ``query`` matches in original (not normalized) text."""
    separator = r"[\W_]+"
    alternatives = [
        separator.join(re.escape(word) for word in phrase)
        for phrase in sorted(query.phrases, key=len, reverse=True)
    ] + [re.escape(word) for word in query.words]
    return re.compile(r"(?<![^\W_])(?:" + "|".join(alternatives) + r")(?![^\W_])", re.IGNORECASE)


def snippet(text: str, query: SearchQuery, context: int = SNIPPET_CONTEXT_CHARS) -> str:
    """Up to ``context`` characters either side of the first match, with every match in it
    between ``«`` and ``»``, and ``…`` where the text was cut."""
    pattern = _pattern(query)
    first = pattern.search(text)
    start = max(0, first.start() - context) if first else 0
    end = min(len(text), (first.end() if first else 0) + context)
    window = text[start:end]
    marked = pattern.sub(lambda match: f"{MARK_START}{match.group(0)}{MARK_END}", window)
    return ("…" if start > 0 else "") + marked + ("…" if end < len(text) else "")
