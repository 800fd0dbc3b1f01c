"""Own the fake upstream's answer bodies: chat/completion pieces, stream events, embeddings."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from fakes.upstream.behaviour import FakeError, _dumps

ANSWER_PREFIX = "你好，我是小一的测试模型。You said: "
MODELS = (
    "gpt-3.5-turbo", "gpt-4", "gpt-4o-mini", "gpt-4o", "text-embedding-ada-002",
    "text-embedding-3-small", "dall-e-2", "dall-e-3", "gpt-3.5-turbo-instruct",
)  # fmt: skip
MODEL_CREATED = 1_700_000_000
EMBEDDING_DIMS = 16  # without `dimensions`; with it, up to MAX_EMBEDDING_DIMS (OpenAI's 3-large)
MAX_EMBEDDING_DIMS = 3072
STREAM_PIECES = 8

_TOKEN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[A-Za-z0-9]+")
_IDS = itertools.count(1)
_ID_SALT = os.urandom(4).hex()
_HEAD, _CONTENT, _TAIL = 0, 1, 2  # kinds of stream events; cut counts _CONTENT ones
_MODEL_LIST = _dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": MODEL_CREATED, "owned_by": "fake"}
            for m in MODELS
        ],
    }
)


def count_tokens(text: str) -> int:
    """Count CJK ideographs plus runs of ASCII letters and digits."""
    return len(_TOKEN_RE.findall(text))


def _truncate(text: str, limit: int) -> tuple[str, bool]:
    """Cut text after its limit-th token; say whether anything was cut."""
    ends = [m.end() for m in itertools.islice(_TOKEN_RE.finditer(text), limit + 1)]
    if len(ends) <= limit:
        return text, False
    return (text[: ends[limit - 1]] if limit else ""), True


def _split(text: str, pieces: int = STREAM_PIECES) -> list[str]:
    """Split text into about `pieces` consecutive pieces."""
    size = max(1, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)]


def make_answer(text: str, behaviour: dict[str, Any], limit: int | None,
                exact: bool = False) -> tuple[list[str], str]:
    """Return the stream pieces of the answer to text and its finish_reason (`exact`: the
    answer is the text itself, e.g. a structured output's JSON)."""
    words = behaviour.get("long")
    if words is not None:
        shown = words if limit is None else min(words, limit)
        pieces = [f" word{i}" if i else "word0" for i in range(shown)]
        return pieces, "length" if shown < words else "stop"
    answer, cut = (text if exact else ANSWER_PREFIX + text), False
    if limit is not None:
        answer, cut = _truncate(answer, limit)
    return _split(answer), "length" if cut else "stop"


def embedding_bytes(text: str, dims: int = EMBEDDING_DIMS) -> bytes:
    """Return the unit-length little-endian float32 vector derived from a hash of text: 16
    values a 32-byte digest (the first one unkeyed, the next ones keyed by their number)."""
    data, values = text.encode("utf-8", "surrogatepass"), []
    for block in range(-(-dims // 16)):
        key = block.to_bytes(4, "little") if block else b""
        digest = hashlib.blake2b(data, digest_size=32, key=key).digest()
        values += [x / 32767.5 - 1.0 for x in struct.unpack("<16H", digest)]
    values = values[:dims]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return struct.pack(f"<{dims}f", *(v / norm for v in values))


def _new_id(prefix: str) -> str:
    """Return a fresh id such as chatcmpl-1a2b3c4d5 (process salt + counter)."""
    return f"{prefix}-{_ID_SALT}{next(_IDS):x}"


def _content_text(content: Any) -> str:
    """Return the text of a message content: a string or a list of {type: text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _texts(value: Any, field: str) -> list[str]:
    """Normalise a prompt/input (str, list of str, token array(s)) to a non-empty list of str."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return value
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return [" ".join(map(str, v)) for v in value]
    raise FakeError(400, f"'{field}' must be a string, a list of strings or token arrays")


def _int_param(body: dict[str, Any], name: str, low: int, high: int, default: int | None) -> Any:
    """Read an optional integer field of body within [low, high]."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():  # JSON Schema's integer: 3.0 is one
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FakeError(400, f"'{name}' must be an integer between {low} and {high}")
    return value


def _model(body: dict[str, Any], default: str | None = None) -> str:
    """Return the request's model name (required unless a default is given)."""
    model = body.get("model", default)
    if not isinstance(model, str) or not model:
        raise FakeError(400, "you must provide a model parameter")
    return model


def _usage(prompt: int, completion: int | None = None) -> dict[str, int]:
    """Build a usage object; embeddings have no completion tokens."""
    if completion is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_logprobs(pieces: list[str], top: int) -> dict[str, Any]:
    """Return a chat choice's logprobs for pieces taken as one token each (`top` alternatives
    each, the token itself first); a token's logprob is derived from its text."""
    return {"content": [_token_logprob(p, top) for p in pieces], "refusal": None}


def _token_logprob(token: str, top: int) -> dict[str, Any]:
    logprob = -(zlib.crc32(token.encode()) % 1000) / 1000
    alternatives = [(token, logprob)] + [(f"{token}~{k}", logprob - k) for k in range(1, top)]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                             for t, v in alternatives[:top]]}


THOUGHT_PREFIX = "Thinking about: "


def reasoning_fields(field: str, text: str) -> dict[str, str]:
    """Return a message's (or delta's) reasoning as the reasoning marker's field names it."""
    names = ("reasoning_content", "reasoning") if field == "both" else (field,)
    return dict.fromkeys(names, text)


def _stream_events(
    base: dict[str, Any], answers: list[list[str]], finishes: list[str],
    usage: dict[str, int] | None, chat: bool, running: bool = False, top: int | None = None,
    thought: tuple[str, list[str]] | None = None,
) -> Iterator[tuple[int, bytes]]:  # fmt: skip
    """Yield (kind, JSON) stream chunks: role heads, content pieces, finishes, usage.

    `running` (vLLM's and SGLang's stream_options.continuous_usage_stats): every chunk carries
    the usage so far, the completion counted over the text sent until then. `top` (a chat
    request's top_logprobs, when it asked for logprobs): each piece carries its logprobs.
    `thought` (the reasoning marker): each chat choice's reasoning pieces first, in that field.
    """
    extra: dict[str, Any] = {} if usage is None else {"usage": None}
    said: list[str] = []

    def event(index: int, piece: str | None, finish: str | None) -> bytes:
        """Serialise one choice chunk; piece None means the finishing chunk."""
        if chat:
            delta = {} if piece is None else {"content": piece}
            probs = None if top is None or piece is None else chat_logprobs([piece], top)
            choice = {"index": index, "delta": delta, "logprobs": probs, "finish_reason": finish}
        else:
            choice = {
                "text": piece or "",
                "index": index,
                "logprobs": None,
                "finish_reason": finish,
            }
        if running and usage is not None:
            said.append(piece or "")
            extra["usage"] = _usage(usage["prompt_tokens"], count_tokens("".join(said)))
        return _dumps({**base, "choices": [choice], **extra})

    if chat:
        for index in range(len(answers)):
            head = {"role": "assistant", "content": ""}
            choice = {"index": index, "delta": head, "logprobs": None, "finish_reason": None}
            yield _HEAD, _dumps({**base, "choices": [choice], **extra})
    for index, pieces in enumerate(answers):
        if thought is not None and chat:
            for piece in thought[1]:
                choice = {"index": index, "delta": reasoning_fields(thought[0], piece),
                          "logprobs": None, "finish_reason": None}
                yield _CONTENT, _dumps({**base, "choices": [choice], **extra})
        for piece in pieces:
            yield _CONTENT, event(index, piece, None)
    for index, finish in enumerate(finishes):
        yield _TAIL, event(index, None, finish)
    if usage is not None:
        yield _TAIL, _dumps({**base, "choices": [], "usage": usage})
