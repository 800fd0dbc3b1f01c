"""The stream guard (app/web/relay/stream_guard.py) against the whole-text filter: however a text
is cut into chunks, the masked stream is the whole text masked, and a refused one sends nothing
of a listed word."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.safety import Matcher
from app.web.relay.stream_guard import StreamGuard, held_from

WORDS = ["违禁词", "bad", "ass", "word2 word3"]
TEXTS = ["说违禁词好吗", "a class assignment ass", "违 禁*词b bad!", "badbad bad", "违禁词违禁词违禁词",
         "word1 word2 word3 word4", "ＢＡＤ 违禁词", "nothing here at all"]


def cuts(text: str) -> list[list[str]]:
    """Every way to cut text into up to three non-empty pieces."""
    found = [[text]]
    for i, j in combinations(range(1, len(text)), 2):
        found.append([text[:i], text[i:j], text[j:]])
    found += [[text[:i], text[i:]] for i in range(1, len(text))]
    return found


def run(guard: StreamGuard, pieces: list[str]) -> tuple[str, str | None]:
    """Stream pieces as chat chunks, the last with finish_reason stop; return text and finish."""
    out, finish = [], None
    for n, piece in enumerate(pieces):
        last = n == len(pieces) - 1
        chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": piece},
                                         "logprobs": {"content": []},
                                         "finish_reason": "stop" if last else None}]}
        sent = guard.take(chunk)
        choice = sent["choices"][0]
        assert choice["logprobs"] is None
        out.append(choice["delta"].get("content") or "")
        finish = choice["finish_reason"]
        if guard.refused:
            break
    return "".join(out), finish


@pytest.fixture
def ctx(app: Any, r: redis.Redis) -> Any:
    """An app context: a hit is counted in the store."""
    with app.test_request_context():
        yield


@pytest.mark.parametrize("text", TEXTS)
def test_masking_a_stream_equals_masking_the_whole_text(ctx: Any, text: str) -> None:
    words = Matcher(WORDS)
    whole = words.check(text).masked
    for pieces in cuts(text):
        guard = StreamGuard("chat", "mask", words)
        got, finish = run(guard, pieces)
        assert (got, finish) == (whole, "stop"), pieces
        assert "".join(guard.delivered) == whole


@pytest.mark.parametrize("text", TEXTS)
def test_refusing_a_stream_sends_no_listed_word(ctx: Any, text: str) -> None:
    words = Matcher(WORDS)
    verdict = words.check(text)
    for pieces in cuts(text):
        guard = StreamGuard("chat", "refuse", words)
        got, finish = run(guard, pieces)
        assert guard.refused == verdict.hit, pieces
        assert finish == ("content_filter" if verdict.hit else "stop")
        assert not words.check(got).hit and text.startswith(got)  # a clean prefix


def test_the_tail_held_back_holds_the_longest_word() -> None:
    assert held_from("abc违禁词", 3) == 3
    assert held_from("ab 违 禁 词 ", 3) == 3  # symbols and spaces count for nothing
    assert held_from("违禁", 3) == 0  # too short: hold it all
    assert held_from("anything", 0) == 8  # no words: hold nothing


ALPHABET = "违禁词badsw ord23,*x"


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.text(ALPHABET, min_size=1, max_size=30), st.lists(st.integers(1, 29), max_size=4))
def test_any_text_cut_anyhow_streams_as_the_whole_text_masks(text: str, points: list[int]) -> None:
    words = Matcher([*WORDS, "禁", "ab"])  # one-letter and nested words too
    marks = sorted({p for p in points if p < len(text)})
    pieces = [text[a:b] for a, b in zip([0, *marks], [*marks, len(text)], strict=True)]
    masked = StreamGuard("chat", "mask", words, count=lambda: None)
    assert run(masked, pieces) == (words.check(text).masked, "stop")
    refused = StreamGuard("chat", "refuse", words, count=lambda: None)
    got, _ = run(refused, pieces)
    assert refused.refused == words.check(text).hit
    assert text.startswith(got) and not words.check(got).hit


@pytest.mark.parametrize("index", [[1], {"i": 2}], ids=["list", "object"])
def test_a_choice_index_of_any_json_type_is_taken(ctx: Any, index: Any) -> None:
    """Review (round 12): a choice's `index` is the upstream's JSON; a list or an object (not
    hashable) was a TypeError mid-stream with `api_output` on (the stream ended without
    [DONE]). It keys its choice like any other value, and the text is still masked."""
    guard = StreamGuard("chat", "mask", Matcher(WORDS), count=lambda: None)
    out = []
    for piece, finish in (("说违", None), ("禁词好吗", "stop")):
        sent = guard.take({"id": "c", "choices": [{"index": index, "delta": {"content": piece},
                                                   "finish_reason": finish}]})
        out.append(sent["choices"][0]["delta"]["content"])
    assert "".join(out) == Matcher(WORDS).check("说违禁词好吗").masked != "说违禁词好吗"
