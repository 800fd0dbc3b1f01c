"""Token bounds: what a request can cost, and what to bill from untrusted upstream usage.

Pure: no I/O beyond bpe-openai's bundled tables, no Flask or Redis. Every text counts
max(seed rule, real BPE count) (SPEC §3): no character is free, and the seed's numbers stay
wherever the seed is larger (Chinese under o200k; cl100k often spends >1 token per 汉字, so
gpt-3.5/gpt-4 Chinese counts rise above the seed). Models map to encodings by name (`encodings_for`): o200k_base
for gpt-4o/4.1/4.5/5, gpt-oss, o-series; cl100k_base for gpt-3.5, gpt-4(-turbo), embeddings,
instruct, davinci-002/babbage-002; anything else (unknown, retired p50k names) takes the max of
both: twice a cheap count, and never below either OpenAI tokenizer.

`limit` (the prompt-length limit; pass it on the request path) stops a count early: a result
above `limit` only means "refuse" (text_tokens then returns a byte-count upper bound; the
request-level bounds return their partial sum), so never reserve with it.

Measured on the dev box (CPython 3.11, bpe-openai 0.1.4, one noisy core; best of runs):
  loading the Rust extension directly 1 ms (its package __init__ would cost 0.5 s and 60 MB);
  o200k 55 ms / 67 MB and cl100k 25 ms / 29 MB on first use (`warm()` before forking);
  a 200-char mixed message 18 µs (seed 5 µs), unknown model 26 µs; messages_bound of
  system + 200-char user 25-30 µs (unknown model 36 µs); 210k tokens of English (0.9 M chars)
  21 ms; 192k CJK chars 17 ms; 1024² PNG data URL 36 µs; 3.5 MB JPEG data URL 0.4 ms;
  300k token ids 6 ms; 32 MB of base64 text 4 s without `limit`, 90 ms with limit=128k.
"""

from __future__ import annotations

import binascii
import importlib.machinery
import importlib.util
import io
import json
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import Any

import orjson
from PIL import Image

from app.core.errors import InvalidRequest

O200K, CL100K = "o200k_base", "cl100k_base"
_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "gpt-oss", "o1", "o3",
                   "o4", "codex", "computer-use", "gpt-realtime", "gpt-audio", "omni-moderation")
_CL100K_PREFIXES = ("gpt-3.5", "gpt-35", "gpt-4", "text-embedding-", "davinci-002", "babbage-002")
_TOKENIZERS: dict[str, Any] = {}

# 汉字: CJK Unified Ideographs, extension A, extensions B–I; 单词: a run of ASCII letters/digits.
_HANZI_RUN = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002ebef\U00030000-\U000323af]+")
_ALNUM = bytes(97 if chr(i).isascii() and chr(i).isalnum() else 32 for i in range(256))

# Chat framing (OpenAI's cookbook: 3 per message, 1 per name, 3 priming), made generous.
_PER_MESSAGE, _PER_NAME, _PER_PART, _PRIMING = 5, 2, 1, 5
_TOOLS_BASE, _PER_TOOL, _FORMAT_BASE = 32, 16, 16

_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what OpenAI accepts; others: worst case
_PREFIX_CHARS = 1 << 16  # base64 decoded first: image headers live near the start
_MAX_PATCHES = 1536
# 32-px patch models: patches × multiplier (per mille); gpt-4o-mini bills 33× tile tokens.
_PATCH_MODELS = (("gpt-4.1-mini", 1620), ("gpt-4.1-nano", 2460), ("gpt-5-mini", 1620),
                 ("gpt-5-nano", 2460), ("o4-mini", 1720))
# input_audio: ≥ 8 kbps (1 KB/s) at ≤ 60 tokens/s → one token per 16 base64 chars, at worst.
_AUDIO_B64_PER_TOKEN, _AUDIO_BASE = 16, 64
# file parts (PDFs: text + a picture per page) have no offline count: their upper bound is the
# prompt cap (Prompt.bound); FILE_TOKENS per file is only the estimate billed without a usage.
FILE_TOKENS = 65_536
_ABSURD = 2**53
# Responses items without a role that are text only (their JSON text bounds them); any other
# such item (computer_call_output, mcp_call…) is expanded by the upstream: uncountable.
_TEXT_ITEMS = ("reasoning", "custom_tool_call", "custom_tool_call_output")


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt's tokens: those counted offline, and how many parts no offline count can bound.

    An uncountable part (a file, content the upstream fetches itself) can be anything up to the
    model's context, so its request is bounded by the prompt cap (`relay.max_prompt_tokens`):
    the hold covers it, and the upstream's usage is billed up to it.
    """

    counted: int  # every countable token, as billed
    uncountable: int = 0
    length: int | None = None  # what they take in the context (> limit: too long); else counted
    plain: int = 0  # of `counted`, the messages' own texts: what any honest report exceeds

    @property
    def in_context(self) -> int:
        """Return what the prompt takes in the model's context (the prompt-length cap's count)."""
        return self.counted if self.length is None else self.length

    def plus(self, more: int) -> Prompt:
        """Return this prompt with `more` counted tokens (a field an upstream may read)."""
        return replace(self, counted=self.counted + more,
                       length=None if self.length is None else self.length + more)

    def bound(self, cap: int) -> int:
        """Return the most the upstream can bill: the count, or the cap if a part is uncounted."""
        return max(self.counted, cap) if self.uncountable else self.counted

    def estimate(self, cap: int) -> int:
        """Return what to bill when the upstream reports no usage (FILE_TOKENS per part)."""
        return min(self.counted + FILE_TOKENS * self.uncountable, self.bound(cap))


class _OverLimit(Exception):
    """Raised inside a count once the running total passes the limit."""


MAX_ITEMS = 16384  # messages, content parts and prompt/input entries counted in one request


class TooManyItems(InvalidRequest):
    """A request holding more than MAX_ITEMS messages, parts or prompts: refused before the
    rest is counted (each costs a few µs; a 256 KiB body of empty parts was 200 ms of CPU)."""

    def __init__(self) -> None:
        super().__init__(f"A request may hold at most {MAX_ITEMS} messages, content parts or "
                         "prompts.", msg="请求里的消息或内容片段太多")


def _model_key(model: object) -> str:
    key = model.lower() if isinstance(model, str) else ""
    key = key[3:] if key.startswith("ft:") else key
    return key.rsplit("/", 1)[-1]


def encodings_for(model: str | None) -> tuple[str, ...]:
    """Return the encodings whose counts bound the model's (both when the model is unknown)."""
    key = _model_key(model)
    if key.startswith(_O200K_PREFIXES):
        return (O200K,)
    if key.startswith(_CL100K_PREFIXES):
        return (CL100K,)
    return (O200K, CL100K)


def _bindings() -> Any:
    """Return bpe-openai's Rust extension, skipping its package __init__ (0.5 s, 60 MB)."""
    name = "bpe_openai._bindings"
    if name in sys.modules:
        return sys.modules[name]
    try:
        package = importlib.util.find_spec("bpe_openai")
        if package is None or package.submodule_search_locations is None:
            raise ImportError("bpe_openai is not a package")
        (folder,) = package.submodule_search_locations
        path = next(p for s in importlib.machinery.EXTENSION_SUFFIXES
                    if os.path.isfile(p := os.path.join(folder, "_bindings" + s)))
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"no loader for {path}")
        module = importlib.util.module_from_spec(spec)
    except Exception:  # another layout: the ordinary (slower) import
        return importlib.import_module(name)
    sys.modules[name] = module  # a later `import bpe_openai` reuses it (PyO3 inits only once)
    spec.loader.exec_module(module)
    return module


def _tokenizer(name: str) -> Any:
    tok = _TOKENIZERS.get(name)
    if tok is None:
        tok = _TOKENIZERS.setdefault(name, _bindings().tokenizer_for_encoding(name))
    return tok


def warm() -> None:
    """Load both encodings now (at worker start, so no request pays for it)."""
    for name in (O200K, CL100K):
        _tokenizer(name)


def _clean(text: str) -> str:
    """Replace lone surrogates (valid in JSON, not in UTF-8) with U+FFFD, as a decoder would."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _bpe(name: str, text: str, cap: int | None) -> int | None:
    tok = _tokenizer(name)
    try:
        found: int | None = tok.count(text) if cap is None else tok.count_till_limit(text, cap)
    except UnicodeEncodeError:
        text = _clean(text)
        found = tok.count(text) if cap is None else tok.count_till_limit(text, cap)
    return found


def seed_count(text: str) -> int:
    """Count 汉字 + ceil(1.3 × 单词), the original service's rule, in integers."""
    marks = text.encode("utf-8", "surrogatepass").translate(_ALNUM)  # b"a" alnum, b" " else
    words = marks.count(b" a") + marks.startswith(b"a")
    hanzi = 0 if text.isascii() else len(text) - len(_HANZI_RUN.sub("", text))
    return hanzi + (13 * words + 9) // 10


def bpe_count(text: str, model: str | None) -> int:
    """Count the text with the model's tokenizer (the larger count when unknown)."""
    return max(_bpe(name, text, None) or 0 for name in encodings_for(model))


def text_tokens(text: str, model: str | None, *, limit: int | None = None) -> int:
    """Return max(seed_count, bpe_count); past `limit`, a cheaper upper bound above it."""
    best = 0
    for name in encodings_for(model):
        n = _bpe(name, text, limit)
        if n is None and limit is not None:  # past the limit (only a limit gives None)
            # BPE tokens are ≥ 1 UTF-8 byte; the seed is ≤ len(text) + 2
            return max(len(_clean(text).encode()), len(text) + 2, limit + 1)
        best = max(best, n or 0)
    return max(best, seed_count(text))


# The ids each encoding maps to bytes (its specials and the gaps above them decode to no text;
# bpe-openai crashes on an id past its table, so none is ever handed to it).
_REGULAR_IDS = {O200K: 199998, CL100K: 100256}


def decode_ids(ids: list[int], model: str | None) -> list[str] | None:
    """Return what a token array reads as under each of the model's encodings (its special and
    unknown ids skipped), or None when it is no UTF-8 text (ids cut inside a character): what
    the upstream's model reads, for the content filter."""
    texts = []
    for name in encodings_for(model):
        regular = _REGULAR_IDS[name]
        try:
            texts.append(_tokenizer(name).decode([i for i in ids if 0 <= i < regular]))
        except ValueError:
            return None
    return texts


def json_tokens(value: Any, model: str | None, *, limit: int | None = None) -> int:
    """Count a JSON value's text as the upstream gets it (what a field it reads can bill)."""
    return text_tokens(_json_text(value), model, limit=limit)


def completion_tokens(text: str, model: str | None) -> int:
    """Estimate an answer's tokens when the upstream reports none: max(seed, BPE)."""
    return text_tokens(text, model)


UNDER_RATIO, UNDER_SLACK = 4, 64  # a report under 1/4 of the text's count, less 64: implausible


def _plausible_most(reported: int, discount: int = 0) -> int:
    """Return the most tokens a text can count for a report of `reported` to stay plausible:
    four times the report and UNDER_SLACK, plus `discount` (tokens of the text it leaves out)."""
    return UNDER_RATIO * (reported + UNDER_SLACK) + max(discount, 0)


def under_count(reported: int, counted: int) -> bool:
    """Tell whether `reported` tokens are implausibly few for a text counted `counted` offline
    (a plain-text prompt, already counted for its hold): under_text's rule, without a recount."""
    return counted > _plausible_most(reported)


def under_text(reported: int, text: str, model: str | None, discount: int = 0) -> bool:
    """Tell whether `reported` completion tokens are implausibly few for the text the upstream
    delivered: fewer than a quarter of the text's count by the most frugal of the model's
    tokenizers, less `discount` (tokens of the text that are not completion: an echoed prompt)
    and UNDER_SLACK. Honest tokenizers differ by far less (the fake upstream's word count is
    2.5 times under BPE's for its `long` answers); the count stops as soon as it proves the
    report plausible (count_till_limit), so it costs at most about the report's size.
    """
    cap = _plausible_most(reported, discount)
    if len(_clean(text).encode()) <= cap:  # a BPE token is at least one UTF-8 byte
        return False
    return all(_bpe(name, text, cap) is None for name in encodings_for(model))


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # >64-bit ints, lone surrogates, deep nesting: the stdlib copes
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _tiles(w: int, h: int) -> int:
    if max(w, h) > 2048:
        side = max(w, h)
        w, h = -(-w * 2048 // side), -(-h * 2048 // side)
    if min(w, h) > 768:
        side = min(w, h)
        w, h = -(-w * 768 // side), -(-h * 768 // side)
    return -(-w // 512) * -(-h // 512)


# After both steps the short side is ≤ 768 and the long side ≤ 2048: at most 2 × 4 tiles.
_WORST_TILES = _tiles(768, 2048)


def _image_size(url: str) -> tuple[int, int] | None:
    head, comma, data = url.partition(",")
    if not (comma and head[:5].lower() == "data:" and head.lower().endswith(";base64")):
        return None
    for chunk in (data[:_PREFIX_CHARS], data) if len(data) > _PREFIX_CHARS else (data,):
        try:
            raw = io.BytesIO(binascii.a2b_base64(chunk))
            with Image.open(raw, formats=_IMAGE_FORMATS) as img:
                return max(img.size[0], 1), max(img.size[1], 1)
        except Exception:  # truncated or malformed: try it whole, then the worst case
            continue
    return None


def image_tokens(part: Any, model: str | None) -> int:
    """Return OpenAI's image-token charge for an image_url part; the worst case if unknown."""
    return image_cost(part, model)[0]


def image_cost(part: Any, model: str | None) -> tuple[int, int]:
    """Return an image_url part's tokens as (billed, in the context), the worst case if unknown.

    They differ where OpenAI bills images at a multiple of what they take in the context
    (gpt-4o-mini: 33× the tile rule; the patch models' multipliers): the hold and the bill take
    the first, the prompt-length cap the second (so gpt-4o-mini takes as many pictures as gpt-4o).
    """
    spec = part.get("image_url") if isinstance(part, dict) else None
    spec = {"url": spec} if isinstance(spec, str) else spec if isinstance(spec, dict) else {}
    key, detail, url = _model_key(model), spec.get("detail"), spec.get("url")
    patch = next((m for prefix, m in _PATCH_MODELS if key.startswith(prefix)), None)
    need_size = detail != "low" or patch is not None
    size = _image_size(url) if need_size and isinstance(url, str) else None
    tiles = 0 if detail == "low" else _WORST_TILES if size is None else _tiles(*size)
    context = 85 + 170 * tiles
    billed = 2833 + 5667 * tiles if key.startswith("gpt-4o-mini") else context
    if patch is not None:  # a patch model ignores `detail` here: the larger rule wins
        w, h = size or (1 << 15, 1 << 15)
        patches = min(-(-w // 32) * -(-h // 32), _MAX_PATCHES)
        billed, context = max(billed, -(-patches * patch // 1000)), max(context, patches)
    return billed, context


def _audio_tokens(part: dict[str, Any]) -> int:
    spec = part.get("input_audio")
    data = spec.get("data") if isinstance(spec, dict) else None
    size = len(data) if isinstance(data, str) else len(_json_text(part))
    return _AUDIO_BASE + size // _AUDIO_B64_PER_TOKEN


class _Budget:
    """One request's running bound (`total`, billed) and length (`context`, what the prompt
    takes in the model's context); raises _OverLimit as soon as the length passes `limit`."""

    __slots__ = ("model", "limit", "total", "context", "uncountable", "items", "plain")

    def __init__(self, model: str | None, limit: int | None) -> None:
        self.model, self.limit, self.total, self.context, self.uncountable = model, limit, 0, 0, 0
        self.items = self.plain = 0

    def item(self) -> None:
        """Count one message, part or prompt (TooManyItems past MAX_ITEMS)."""
        self.items += 1
        if self.items > MAX_ITEMS:
            raise TooManyItems

    def add(self, n: int, context: int | None = None) -> None:
        self.total += n
        self.context += n if context is None else context
        if self.limit is not None and self.context > self.limit:
            raise _OverLimit

    def text(self, text: str, plain: bool = False) -> None:
        """Count a text; `plain`: a message's own text (Prompt.plain), not structure."""
        cap = None if self.limit is None else max(self.limit - self.context, 0)
        n = text_tokens(text, self.model, limit=cap)
        self.plain += n if plain else 0
        self.add(n)

    def json(self, value: Any) -> None:
        self.text(value if isinstance(value, str) else _json_text(value))


def _part(b: _Budget, part: Any) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    b.item()
    b.add(_PER_PART)
    if kind in ("text", "refusal") and isinstance(part.get(kind), str):
        b.text(part[kind], plain=True)
    elif kind == "image_url":
        b.add(*image_cost(part, b.model))
    elif kind == "input_audio":
        b.add(_audio_tokens(part))
    elif kind == "file":  # uncountable: bounded by the prompt cap (Prompt.bound)
        spec = part.get("file")
        b.uncountable += 1
        b.json((spec.get("filename") or "") if isinstance(spec, dict) else spec)
    else:
        b.json(part)  # unknown shapes count their JSON text, never 0


def _message(b: _Budget, msg: Any) -> None:
    b.item()
    b.add(_PER_MESSAGE)
    if not isinstance(msg, dict):
        b.json(msg)
        return
    if "role" not in msg and msg.get("type") not in _TEXT_ITEMS:
        b.uncountable += 1  # a native Responses item (a screenshot, a tool's result): the cap
    for key, value in msg.items():
        if value is None:
            continue
        if key == "content" and isinstance(value, list):
            for part in value:
                _part(b, part)
            continue
        if key == "name":
            b.add(_PER_NAME)
        if key == "audio" and isinstance(value, dict) and value.get("id") is not None:
            b.uncountable += 1  # an earlier audio answer the upstream puts back: the cap
        if key == "content" and isinstance(value, str):
            b.text(value, plain=True)
            continue
        b.json(value)  # role, name, string content, tool_call_id; tool_calls etc. as JSON


def messages_bound(messages: Any, model: str | None, *, tools: Any = None,
                   functions: Any = None, response_format: Any = None,
                   limit: int | None = None) -> int:
    """Return an upper bound of a chat prompt without uncountable parts (> limit: too long).

    A file part adds FILE_TOKENS here (an estimate, not a bound): a request that may carry one
    is bounded with messages_prompt(...).bound(cap).
    """
    found = messages_prompt(messages, model, tools=tools, functions=functions,
                            response_format=response_format, limit=limit)
    return found.counted + FILE_TOKENS * found.uncountable


def messages_prompt(messages: Any, model: str | None, *, tools: Any = None,
                    functions: Any = None, response_format: Any = None,
                    limit: int | None = None) -> Prompt:
    """Count a chat request's prompt: the countable tokens (> limit: too long) and the
    uncountable parts (files), which only the prompt cap bounds."""
    b = _Budget(model, limit)
    try:
        b.add(_PRIMING)
        for msg in messages if isinstance(messages, list) else [messages]:
            _message(b, msg)
        for defs in (tools, functions):
            if defs:
                b.add(_TOOLS_BASE + _PER_TOOL * (len(defs) if isinstance(defs, list) else 1))
                b.json(defs)
        if response_format is not None:
            b.add(_FORMAT_BASE)
            b.json(response_format)
    except _OverLimit:
        pass
    return Prompt(b.total, b.uncountable, b.context, b.plain)


def _prompt(b: _Budget, value: Any) -> None:
    if isinstance(value, str):
        b.text(value)
    elif isinstance(value, list) and set(map(type, value)) <= {int}:
        b.add(len(value))  # a token array: one token per id
    elif isinstance(value, list):
        for item in value:
            b.item()
            _prompt(b, item)
    else:
        b.json(value)


def prompt_bound(value: Any, model: str | None, *, limit: int | None = None) -> int:
    """Bound a completions `prompt` / embeddings `input`: text(s) or token array(s)."""
    b = _Budget(model, limit)
    try:
        _prompt(b, value)
    except _OverLimit:
        pass
    return b.total


def _checked(value: object, bound: int, what: str) -> tuple[int, str | None]:
    if value is None:
        return bound, f"{what}_missing"
    if type(value) is not int:  # bool, float, str, ...
        return bound, f"{what}_not_int"
    if value < 0:
        return bound, f"{what}_negative"
    if value >= _ABSURD:
        return bound, f"{what}_absurd"
    return value, None


def bound_usage(reported_prompt: object, reported_completion: object, prompt_bound: int,
                completion_max: int, *, slack_pct: int = 10,
                slack_tokens: int = 64) -> tuple[int, int, str | None]:
    """Return (prompt, completion, anomaly) to bill from an upstream's untrusted usage.

    Non-ints (bools too), None, negatives and values ≥ 2**53 bill the bound with an anomaly
    `<field>_missing|_not_int|_negative|_absurd`. Completion above `completion_max` bills the
    max ("completion_over_max"). Prompt is always billed as min(reported, prompt_bound), so a
    settle never exceeds the reservation; it is an anomaly ("prompt_over_bound") only when far
    above: reported > bound × (1 + slack_pct/100) + slack_tokens, since the upstream's own
    tokenizer may count a little differently. Two anomalies are joined with ",".
    """
    for bound in (prompt_bound, completion_max):
        if type(bound) is not int or bound < 0:
            raise ValueError(f"bounds must be non-negative ints, got {bound!r}")
    prompt, p_bad = _checked(reported_prompt, prompt_bound, "prompt")
    if p_bad is None and 100 * prompt > (100 + slack_pct) * prompt_bound + 100 * slack_tokens:
        p_bad = "prompt_over_bound"
    completion, c_bad = _checked(reported_completion, completion_max, "completion")
    if c_bad is None and completion > completion_max:
        completion, c_bad = completion_max, "completion_over_max"
    anomaly = ",".join(a for a in (p_bad, c_bad) if a) or None
    return min(prompt, prompt_bound), completion, anomaly
