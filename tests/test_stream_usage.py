"""Streamed usage: checked once against the whole answer, and shown as it was billed.

An upstream may report usage in every chunk (vLLM's continuous_usage_stats, some gateways
unasked), on a chunk that carries text, or far below what it streamed. Whatever it does, the
under-report check costs one count of the answer (not one per report), and the usage the client
is shown last is the ledger's settle entry.
"""

from __future__ import annotations

import json
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
import redis
from conftest import make_settings, new_key
from openapi_schemas import validate
from stub_kit import odd_fixture  # noqa: F401 (the `odd` fixture)

from app import create_app
from app.core import tokens
from app.core.config import load_settings
from app.core.money import ledger

HEAD = {"id": "chatcmpl-u", "object": "chat.completion.chunk", "created": 1,
        "model": "gpt-3.5-turbo"}
USAGE_ONLY = {**HEAD, "choices": [], "system_fingerprint": "fp_u"}


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _piece(text: str, usage: Any = None, finish: str | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {**HEAD, "choices": [{"index": 0, "delta": {"content": text},
                                                  "finish_reason": finish}]}
    return chunk if usage is None else {**chunk, "usage": usage}


def _usage(ct: int, pt: int = 9) -> dict[str, Any]:
    return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}


def _chat(odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, body: bytes,
          **options: Any) -> tuple[list[dict[str, Any]], tuple[int, int], str]:
    """Stream one chat through the relay while the upstream streams `body`; return the chunks
    the client got, the settle entry's (prompt, completion) and the stream's raw text."""
    odd.answer = (200, body)  # type: ignore[attr-defined]
    app = create_app(make_settings(f"http://127.0.0.1:{odd.server_port}/v1", redis_url),
                     redis_client=r)
    key, acct = new_key(r)
    request: dict[str, Any] = {"model": "gpt-4o-mini", "stream": True,
                               "messages": [{"role": "user", "content": "你好"}]}
    if options:
        request["stream_options"] = options
    resp = app.test_client().post("/v1/chat/completions", json=request,
                                  headers={"Authorization": f"Bearer {key}"})
    text = resp.get_data(as_text=True)
    assert resp.status_code == 200 and text.endswith("data: [DONE]\n\n"), text[-300:]
    chunks = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    return chunks, _settled(r, acct), text


def _settled(r: redis.Redis, acct: str) -> tuple[int, int]:
    (entry,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert ledger.verify(r) == []
    return int(entry["pt"]), int(entry["ct"])


class CountingTokenizer:
    """bpe-openai's tokenizer, counting the characters it is handed (the work of a count)."""

    def __init__(self, real: Any, spent: list[int], budget: int) -> None:
        self.real, self.spent, self.budget = real, spent, budget

    def _add(self, text: str) -> None:
        self.spent[0] += len(text)
        if self.spent[0] > self.budget:  # fail at once rather than run a quadratic stream out
            raise RuntimeError(f"tokenized {self.spent[0]} characters: over {self.budget}")

    def count(self, text: str) -> Any:
        self._add(text)
        return self.real.count(text)

    def count_till_limit(self, text: str, limit: int) -> Any:
        self._add(text)
        return self.real.count_till_limit(text, limit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def spent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every character handed to the tokenizers (failing past 2 M: the budget below)."""
    tokens.warm()
    total = [0]
    for name, real in list(tokens._TOKENIZERS.items()):
        monkeypatch.setitem(tokens._TOKENIZERS, name, CountingTokenizer(real, total, 2_000_000))
    return total


N = 16_000  # chunks: their tokens within gpt-4o-mini's max_output (16 384)


@pytest.mark.parametrize("report", ["running", "one"])
def test_usage_on_every_chunk_is_checked_once(odd: ThreadingHTTPServer, r: redis.Redis,
                                              redis_url: str, spent: list[int],
                                              report: str) -> None:
    """Review: an upstream reporting usage on each of a stream's chunks (running totals, or 1
    token each time) had each report checked against everything streamed so far
    (completion_under_text): the text joined and tokenized again per chunk, quadratic in the
    stream's length (16 000 chunks of "word ": some 6 × 10^8 characters tokenized). The reports
    are now bounded as they come and checked once, against the whole answer, at the end."""
    body = b"".join(_event(_piece("word ", _usage(i + 1 if report == "running" else 1)))
                    for i in range(N)) + _event(_piece("", _usage(N if report == "running"
                                                                  else 1), "stop"))
    chunks, (pt, ct), _ = _chat(odd, r, redis_url, body + b"data: [DONE]\n\n",
                                include_usage=True)
    streamed = 5 * N
    assert spent[0] <= 10 * streamed  # a few counts of the answer, not one per chunk
    assert ct == N if report == "running" else ct >= N  # one-token reports bill the text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == _usage(ct, pt)


WORDS = " ".join(["word"] * 2000)


@pytest.mark.parametrize("where", ["usage-chunk-early", "on-a-text-chunk", "every-chunk"])
def test_the_usage_shown_last_is_the_settle(odd: ThreadingHTTPServer, r: redis.Redis,
                                            redis_url: str, where: str) -> None:
    """Review: the client was shown an upstream's usage as it came, checked against the text
    streamed until then; the bill, checked against the whole answer, could be larger (a report
    of 1 token after 10 words, 2 000 words following). The usage is now shown once, in the last
    chunk (`choices: []`, just before `[DONE]`, OpenAI's place for it), as the ledger settled
    it; a text chunk carrying usage keeps its text flowing, with OpenAI's `usage: null`."""
    early = [_piece("one two three four five six seven eight nine ten ")]
    if where == "usage-chunk-early":
        early.append({**USAGE_ONLY, "usage": _usage(1)})
        body = early + [_piece(WORDS), _piece("", None, "stop")]
    elif where == "on-a-text-chunk":
        body = early + [_piece(WORDS, _usage(1), "stop")]
    else:
        body = [{**c, "usage": _usage(1)} for c in early + [_piece(WORDS), _piece("", None, "stop")]]
    raw = b"".join(map(_event, body)) + b"data: [DONE]\n\n"
    chunks, (pt, ct), _ = _chat(odd, r, redis_url, raw, include_usage=True)
    shown = [c for c in chunks if c.get("usage")]
    assert ct >= 2000 and len(shown) == 1 and shown[0] is chunks[-1], shown
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == _usage(ct, pt)
    assert chunks[-1]["model"] == "gpt-4o-mini"
    if where == "usage-chunk-early":  # the upstream's own chunk, held back: its fields kept
        assert chunks[-1]["system_fingerprint"] == "fp_u"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert WORDS in text and all(c["usage"] is None for c in chunks[:-1] if "usage" in c)


def test_running_usage_asked_for_is_shown_and_the_last_is_the_settle(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str) -> None:
    """A client asking for vLLM's continuous_usage_stats sees the usage so far in the chunks
    reporting it (bounded, not yet checked against the whole answer); the last chunk's is
    the settle, though the upstream's last report (1 token for 2 000 words) was below it."""
    body = [_piece("hi ", _usage(1)), _piece(WORDS, _usage(2)), _piece("", _usage(1), "stop"),
            {**USAGE_ONLY, "usage": _usage(1)}]
    raw = b"".join(map(_event, body)) + b"data: [DONE]\n\n"
    chunks, (pt, ct), _ = _chat(odd, r, redis_url, raw, include_usage=True,
                                continuous_usage_stats=True)
    running = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert running == [1, 2, 2] and ct >= 2000
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == _usage(ct, pt)


def test_without_include_usage_no_chunk_shows_usage(odd: ThreadingHTTPServer, r: redis.Redis,
                                                    redis_url: str) -> None:
    """Not asked for (OpenAI then sends none), an upstream's usage is billed but never shown,
    whether in a usage-only chunk or on a text chunk."""
    body = [_piece("hi ", _usage(1)), _piece(WORDS, _usage(2), "stop"),
            {**USAGE_ONLY, "usage": _usage(3)}]
    raw = b"".join(map(_event, body)) + b"data: [DONE]\n\n"
    chunks, (_, ct), _ = _chat(odd, r, redis_url, raw)
    assert ct >= 2000 and len(chunks) == 2 and all("usage" not in c for c in chunks)


def _responses(odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, body: bytes,
               native: bool) -> tuple[dict[str, Any], tuple[int, int]]:
    """Stream one Responses request (translated, or native); return the last event and the
    settle entry's (prompt, completion)."""
    odd.answer = (200, body)  # type: ignore[attr-defined]
    env = {"XIAOYI_REDIS_URL": redis_url,
           "XIAOYI_UPSTREAM_BASE_URL": f"http://127.0.0.1:{odd.server_port}/v1"}
    app = create_app(load_settings(env, toml={"relay": {"responses_native": int(native)}}),
                     redis_client=r)
    key, acct = new_key(r)
    resp = app.test_client().post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "gpt-4o-mini", "input": "hi", "stream": True})
    events = [json.loads(line[6:]) for line in resp.get_data(as_text=True).split("\n")
              if line.startswith("data: ")]
    return events[-1], _settled(r, acct)


def _native_events(usage: dict[str, Any]) -> bytes:
    head = {"id": "resp_up", "object": "response", "status": "in_progress", "output": [],
            "model": "gpt-4o-mini", "usage": None}
    item = {"id": "msg_up", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": WORDS, "annotations": []}]}
    where = {"item_id": "msg_up", "output_index": 0, "content_index": 0}
    return b"".join(b"event: " + e["type"].encode() + b"\n" + _event(e) for e in [
        {"type": "response.created", "response": head},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**item, "status": "in_progress", "content": []}},
        {"type": "response.output_text.delta", **where, "delta": WORDS},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed",
         "response": {**head, "status": "completed", "output": [item], "usage": usage}}])


@pytest.mark.parametrize("native", [False, True], ids=["translated", "native"])
def test_a_responses_streams_usage_is_the_settle(odd: ThreadingHTTPServer, r: redis.Redis,
                                                 redis_url: str, native: bool) -> None:
    """The same on /v1/responses: an upstream reporting 1 output token for 2 000 words (early,
    on every chunk of a chat upstream; in response.completed natively) is billed the text,
    and `response.completed` shows what the ledger settled (input and output)."""
    if native:
        raw = _native_events({"input_tokens": 5, "output_tokens": 1, "total_tokens": 6})
    else:
        body = [{**c, "usage": _usage(1)} for c in (_piece("hi "), _piece(WORDS),
                                                     _piece("", None, "stop"))]
        raw = b"".join(map(_event, [body[0], {**USAGE_ONLY, "usage": _usage(1)}, *body[1:]]))
        raw += b"data: [DONE]\n\n"
    last, (pt, ct) = _responses(odd, r, redis_url, raw, native)
    usage = last["response"]["usage"]
    assert last["type"] == "response.completed" and ct >= 2000
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
        pt, ct, pt + ct)


MODERATION = {"input": {"type": "moderation_results", "model": "omni-moderation-latest",
                        "results": []},
              "output": {"type": "error", "code": "timeout", "message": "too slow"}}


@pytest.mark.parametrize("asked", [False, True], ids=["unasked", "include_usage"])
@pytest.mark.parametrize("usage", [None, {}, "real"])
def test_a_choiceless_chunk_carrying_more_than_usage_is_sent(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, asked: bool,
        usage: Any) -> None:
    """A moderated completion's moderation chunk has no choices (usage null beside it when
    include_usage is on): only a chunk reporting usage alone is held back or dropped. The
    moderation reaches the client (unasked without a usage; asked on its own chunk, or on the
    last one when it rode on the usage report), and the last chunk is still the billed one."""
    extra = _usage(3) if usage == "real" else usage
    body = [_piece("hi ", finish="stop"), {**USAGE_ONLY, "usage": extra, "moderation": MODERATION}]
    raw = b"".join(map(_event, body)) + b"data: [DONE]\n\n"
    chunks, _, _ = _chat(odd, r, redis_url, raw, **({"include_usage": True} if asked else {}))
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert [c["moderation"] for c in chunks if "moderation" in c] == [MODERATION]
    if asked:
        assert chunks[-1]["usage"]["completion_tokens"] >= 1 and not chunks[-1]["choices"]
    else:
        assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("usage", [None, "real"])
def test_a_choiceless_chunk_whose_other_fields_are_null_is_a_usage_report(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, usage: Any) -> None:
    """A field outside the envelope sent as null carries nothing: the chunk is a usage report
    alone, not sent to a client that did not ask for usage (no chunk without choices)."""
    extra = _usage(3) if usage == "real" else usage
    body = [_piece("hi ", finish="stop"), {**USAGE_ONLY, "usage": extra, "moderation": None}]
    raw = b"".join(map(_event, body)) + b"data: [DONE]\n\n"
    chunks, _, _ = _chat(odd, r, redis_url, raw)
    assert chunks and all(c["choices"] for c in chunks)
    assert all("usage" not in c and "moderation" not in c for c in chunks)
