"""Token bounds: the seed rule kept, nothing free, images, schemas, untrusted usage."""

from __future__ import annotations

import base64
import io
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from app.core import tokens as tk

MODELS = ["gpt-4o", "gpt-3.5-turbo", "some-unknown-model"]


def naive_seed(text: str) -> int:
    """The original rule, char by char: an oracle independent of the module's regexes."""
    ranges = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2EBEF), (0x30000, 0x323AF))
    hanzi = sum(any(lo <= ord(c) <= hi for lo, hi in ranges) for c in text)
    words, inside = 0, False
    for c in text:
        alnum = c.isascii() and c.isalnum()
        words += alnum and not inside
        inside = alnum
    return hanzi + math.ceil(1.3 * words - 1e-9)


def data_url(size: tuple[int, int], fmt: str = "PNG", **save: object) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, fmt, **save)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url: str, detail: str | None = None) -> dict:
    spec = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": spec}


# --- the seed's numbers are kept -------------------------------------------------------------

def test_seed_examples() -> None:
    assert tk.seed_count("你好世界") == 4
    assert tk.seed_count("hello world 123") == 4
    assert tk.seed_count("") == 0
    assert tk.seed_count("我用Python写了3个AI程序") == 7 + 4  # 7 汉字, 3 words → ceil(3.9)
    assert tk.seed_count("\U00020000\U00030000\u3400") == 3  # extensions count as 汉字


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("text", ["你好世界", "hello world 123", "今天天气很好，我们去公园散步吧",
                                  "a b c d e f g", "我爱AI", "1 2 3 4 5 6"])
def test_seed_kept_when_larger(text: str, model: str) -> None:
    seed = tk.seed_count(text)
    assert tk.text_tokens(text, model) == max(seed, tk.bpe_count(text, model))
    if seed >= tk.bpe_count(text, model):
        assert tk.text_tokens(text, model) == seed


def test_plain_chinese_keeps_seed() -> None:
    text = "今天天气很好我们去公园散步吧"
    assert tk.text_tokens(text, "gpt-4o") == len(text)


ANY_CHAR = st.characters(exclude_categories=[])  # surrogates included
SEEDISH = st.sampled_from("ab Z9 中文\u3400\U00020000\U000323af\uf900\u4dc0\u3000é\ud800_-")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.one_of(ANY_CHAR, SEEDISH), max_size=80))
def test_seed_matches_oracle(text: str) -> None:
    assert tk.seed_count(text) == naive_seed(text)


# --- nothing is free -------------------------------------------------------------------------

NOT_FREE = {
    "cyrillic": ("Привет, как дела? Всё хорошо. " * 20, 5),
    "kana": ("こんにちは、カタカナもひらがなも。" * 20, 3),
    "hangul": ("안녕하세요 반갑습니다 " * 20, 4),
    "emoji": ("😀🎉👍🔥🚀" * 40, 2),
    "punctuation": ("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" * 20, 4),
    "zero width": ("\u200b\u200c\u200d\u2060" * 50, 4),
    "combining": ("a\u0301\u0302\u0303e\u0308" * 40, 4),
    "compat ideographs": ("".join(map(chr, range(0xF900, 0xFB00))), 2),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", list(NOT_FREE))
def test_nothing_is_free(name: str, model: str) -> None:
    text, chars_per_token = NOT_FREE[name]
    assert tk.text_tokens(text, model) >= len(text) // chars_per_token


@pytest.mark.parametrize("model", MODELS)
def test_250k_compatibility_ideographs(model: str) -> None:
    block = "".join(map(chr, range(0xF900, 0xFB00)))
    text = (block * (250_000 // len(block) + 1))[:250_000]
    assert tk.seed_count(text) == 0
    assert tk.text_tokens(text, model) >= 100_000


def test_lone_surrogates_count() -> None:
    text = "a\ud800b\udfff" * 10
    full = tk.text_tokens(text, "gpt-4o")
    assert full >= 20
    assert tk.text_tokens(text, "gpt-4o", limit=5) >= full


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.one_of(ANY_CHAR, SEEDISH), max_size=200), st.sampled_from(MODELS))
def test_text_tokens_bounds_both(text: str, model: str) -> None:
    n = tk.text_tokens(text, model)
    assert n >= tk.seed_count(text)
    assert n >= tk.bpe_count(text, model)
    for name in tk.encodings_for(model):
        assert n >= tk._bpe(name, text, None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # bpe_openai's own resource loading
def test_bpe_matches_public_api() -> None:
    import bpe_openai

    samples = ["Hello, world!", "你好，世界", "Привет 😀 \u200b", "def f(x):\n    return x"]
    for name in (tk.O200K, tk.CL100K):
        enc = bpe_openai.get_encoding(name)
        for text in samples:
            assert tk._bpe(name, text, None) == len(enc.encode_ordinary(text))


@pytest.mark.parametrize(("model", "expected"), [
    ("gpt-4o", ("o200k_base",)), ("gpt-4o-mini-2024-07-18", ("o200k_base",)),
    ("gpt-4.1-nano", ("o200k_base",)), ("o3-mini", ("o200k_base",)), ("gpt-5", ("o200k_base",)),
    ("ft:gpt-4o-mini:org::x", ("o200k_base",)), ("openai/gpt-4o", ("o200k_base",)),
    ("gpt-3.5", ("cl100k_base",)), ("gpt-4", ("cl100k_base",)), ("gpt-4-turbo", ("cl100k_base",)),
    ("text-embedding-3-small", ("cl100k_base",)), ("gpt-3.5-turbo-instruct", ("cl100k_base",)),
    ("deepseek-chat", ("o200k_base", "cl100k_base")), (None, ("o200k_base", "cl100k_base")),
])
def test_encodings_for(model: str | None, expected: tuple[str, ...]) -> None:
    assert tk.encodings_for(model) == expected


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.one_of(ANY_CHAR, SEEDISH), max_size=120), st.integers(0, 80),
       st.sampled_from(MODELS))
def test_limit_never_lowers_the_bound(text: str, limit: int, model: str) -> None:
    full = tk.text_tokens(text, model)
    capped = tk.text_tokens(text, model, limit=limit)
    assert capped == full if full <= limit else capped > limit and capped >= full
    msgs = [{"role": "user", "content": text}]
    whole = tk.messages_bound(msgs, model)
    got = tk.messages_bound(msgs, model, limit=limit + 10)
    assert got == whole if whole <= limit + 10 else got > limit + 10


def test_limit_stops_early_and_still_bounds() -> None:
    text = "Привет, мир! " * 5_000
    full = tk.text_tokens(text, "gpt-4o")
    assert tk.text_tokens(text, "gpt-4o", limit=full) == full
    over = tk.text_tokens(text, "gpt-4o", limit=100)
    assert over > 100 and over >= full
    messages = [{"role": "user", "content": text}]
    assert tk.messages_bound(messages, "gpt-4o", limit=100) > 100
    assert tk.prompt_bound([text, text], "gpt-4o", limit=100) > 100
    assert tk.messages_bound(messages, "gpt-4o", limit=10**9) == tk.messages_bound(
        messages, "gpt-4o")


# --- images, audio, files --------------------------------------------------------------------

def test_image_low_detail() -> None:
    assert tk.image_tokens(image_part("https://example.com/a.png", "low"), "gpt-4o") == 85


@pytest.mark.parametrize("detail", ["high", "auto", None])
def test_image_1024_png(detail: str | None) -> None:
    assert tk.image_tokens(image_part(data_url((1024, 1024)), detail), "gpt-4o") == 765


def test_image_2048x4096() -> None:
    assert tk.image_tokens(image_part(data_url((2048, 4096)), "high"), "gpt-4o") == 1105


def test_image_small_and_jpeg_with_large_header() -> None:
    assert tk.image_tokens(image_part(data_url((100, 60), "JPEG")), "gpt-4o") == 255
    big_header = data_url((1024, 1024), "JPEG", icc_profile=b"\0" * 300_000)
    assert tk.image_tokens(image_part(big_header), "gpt-4o") == 765


def test_image_worst_cases() -> None:
    assert tk._tiles(768, 2048) == 8
    worst = 85 + 170 * 8
    assert worst == 1445
    assert tk.image_tokens(image_part("https://example.com/cat.jpg"), "gpt-4o") == worst
    broken = "data:image/png;base64,@@not*base64@@"
    assert tk.image_tokens(image_part(broken, "high"), "gpt-4o") == worst
    truncated = data_url((1024, 1024))[:40]
    assert tk.image_tokens(image_part(truncated), "gpt-4o") == worst
    assert tk.image_tokens({"type": "image_url"}, "gpt-4o") == worst
    assert tk.image_tokens({"type": "image_url", "image_url": 7}, "gpt-4o") == worst


def test_no_aspect_ratio_beats_the_worst_case() -> None:
    sides = [1, 2, 100, 511, 512, 513, 767, 768, 769, 1024, 1536, 2047, 2048, 2049, 3000, 4096,
             6000, 8192, 10**5]
    assert max(tk._tiles(w, h) for w in sides for h in sides) == tk._WORST_TILES == 8


@given(st.integers(1, 10**6), st.integers(1, 10**6))
def test_tiles_never_exceed_the_worst_case(w: int, h: int) -> None:
    assert 1 <= tk._tiles(w, h) <= tk._WORST_TILES


def test_image_cost_separates_the_bill_from_the_context() -> None:
    remote = image_part("https://example.com/cat.jpg")
    assert tk.image_cost(remote, "gpt-4o-mini") == (2833 + 5667 * 8, 85 + 170 * 8)
    assert tk.image_cost(remote, "gpt-4o") == (85 + 170 * 8, 85 + 170 * 8)
    billed, context = tk.image_cost(image_part(data_url((1024, 1024))), "gpt-4.1-nano")
    assert (billed, context) == (math.ceil(1024 * 2.46), 1024)
    three = [{"role": "user", "content": [remote, remote, remote]}]
    found = tk.messages_prompt(three, "gpt-4o-mini", limit=128_000)
    assert found.counted > 128_000 and found.in_context < 5_000  # billed vs. in the context
    assert tk.messages_prompt(three, "gpt-4o").in_context == found.in_context


def test_image_model_multipliers() -> None:
    remote = image_part("https://example.com/cat.jpg")
    assert tk.image_tokens(remote, "gpt-4o-mini") == 2833 + 5667 * 8
    assert tk.image_tokens(image_part("https://x/y.png", "low"), "gpt-4o-mini") == 2833
    assert tk.image_tokens(remote, "gpt-4.1-mini") >= math.ceil(1536 * 1.62)
    assert tk.image_tokens(image_part(data_url((1024, 1024))), "gpt-4.1-nano") == math.ceil(
        1024 * 2.46)


def test_audio_and_file_parts_count() -> None:
    audio = base64.b64encode(b"\0" * 48_000).decode()
    parts = [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
             {"type": "file", "file": {"file_data": "data:application/pdf;base64,AAAA",
                                       "filename": "a.pdf"}},
             {"type": "file", "file": {"file_id": "file-abc"}}]
    for part in parts:
        assert tk.messages_bound([{"role": "user", "content": [part]}], "gpt-4o") > 1000
    assert tk.messages_bound([{"role": "user", "content": [parts[0]]}], "gpt-4o") >= 64_000 // 16


# --- chat messages, tools and schemas --------------------------------------------------------

def test_messages_count_everything() -> None:
    empty = tk.messages_bound([], "gpt-4o")
    text = "Привет 😀 " * 50
    one = tk.messages_bound([{"role": "user", "content": text}], "gpt-4o")
    assert one >= empty + tk.text_tokens(text, "gpt-4o") + 3
    as_part = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    assert tk.messages_bound(as_part, "gpt-4o") >= one
    named = [{"role": "user", "name": "alice_the_user", "content": text}]
    assert tk.messages_bound(named, "gpt-4o") > one
    with_image = [{"role": "user", "content": [{"type": "text", "text": text},
                                               image_part("https://x/y.png")]}]
    assert tk.messages_bound(with_image, "gpt-4o") >= one + 1445


def test_tool_calls_and_tool_results_count() -> None:
    args = '{"city": "北京", "days": 7, "units": "metric"}' * 20
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": args}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "晴，25度。" * 30}
    base = tk.messages_bound([], "gpt-4o")
    assert tk.messages_bound([call], "gpt-4o") >= base + tk.seed_count(args)
    assert tk.messages_bound([result], "gpt-4o") >= base + tk.seed_count(result["content"])
    legacy = {"role": "assistant", "function_call": {"name": "weather", "arguments": args}}
    assert tk.messages_bound([legacy], "gpt-4o") >= base + tk.seed_count(args)


@pytest.mark.parametrize("shape", [
    {"type": "mystery", "payload": "сюрприз " * 100},
    {"type": "mystery", "payload": "\ud800 сюрприз " * 100},  # orjson refuses: stdlib path
    ["nested", {"deep": "ещё текст " * 100}],
    12345678901234567890123,
])
def test_unknown_shapes_count_their_json(shape: object) -> None:
    base = tk.messages_bound([{"role": "user", "content": []}], "gpt-4o")
    for content in ([shape], shape):
        assert tk.messages_bound([{"role": "user", "content": content}], "gpt-4o") > base + 5


SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "description": "城市名称，例如 北京 or Shanghai"},
    "days": {"type": "integer", "description": "how many days of forecast to return"}},
    "required": ["city"]}


def test_schemas_increase_the_bound() -> None:
    messages = [{"role": "user", "content": "天气怎么样？"}]
    base = tk.messages_bound(messages, "gpt-4o")
    tools = [{"type": "function", "function": {"name": "weather", "description": "天气预报",
                                               "parameters": SCHEMA}}]
    functions = [{"name": "weather", "description": "天气预报", "parameters": SCHEMA}]
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}}
    for kwargs in ({"tools": tools}, {"functions": functions}, {"response_format": fmt}):
        (value,) = kwargs.values()
        json_seed = tk.seed_count(tk._json_text(value))
        assert tk.messages_bound(messages, "gpt-4o", **kwargs) >= base + json_seed
    both = tk.messages_bound(messages, "gpt-4o", tools=tools, response_format=fmt)
    assert both > tk.messages_bound(messages, "gpt-4o", tools=tools)


# --- completions prompt / embeddings input ---------------------------------------------------

def test_prompt_bound_shapes() -> None:
    assert tk.prompt_bound("你好世界", "gpt-4o") == 4
    assert tk.prompt_bound(["你好世界", "hello world 123"], "gpt-4o") == 8
    assert tk.prompt_bound("你好世界", "gpt-3.5-turbo-instruct") == 5  # cl100k: 5 > seed 4
    assert tk.prompt_bound([1, 2, 3, 4, 5], "text-embedding-ada-002") == 5
    assert tk.prompt_bound([[1, 2, 3], [4, 5], []], "text-embedding-ada-002") == 5
    assert tk.prompt_bound([], "text-embedding-ada-002") == 0
    assert tk.prompt_bound([True, False], "gpt-4o") > 0  # bools are not token ids
    assert tk.prompt_bound({"odd": "Привет " * 10}, "gpt-4o") >= 10


def test_completion_tokens() -> None:
    assert tk.completion_tokens("你好世界", "gpt-4o") == 4
    assert tk.completion_tokens("😀" * 100, "gpt-4o") >= 100


# --- untrusted upstream usage ----------------------------------------------------------------

@pytest.mark.parametrize("bad", [10**15, 2**63 - 1, 2**53, -5, 3.7, 3.0, "12", True, None])
def test_bound_usage_refuses_bad_numbers(bad: object) -> None:
    prompt, completion, anomaly = tk.bound_usage(bad, 10, 500, 100)
    assert prompt <= 500 and completion == 10 and anomaly and anomaly.startswith("prompt_")
    prompt, completion, anomaly = tk.bound_usage(20, bad, 500, 100)
    assert prompt == 20 and completion <= 100 and anomaly and anomaly.startswith("completion_")
    assert type(prompt) is int and type(completion) is int


def test_bound_usage_honest_and_slack() -> None:
    assert tk.bound_usage(480, 100, 500, 100) == (480, 100, None)
    assert tk.bound_usage(0, 0, 500, 100) == (0, 0, None)
    assert tk.bound_usage(614, 7, 500, 100) == (500, 7, None)  # within 10 % + 64: not flagged
    assert tk.bound_usage(615, 7, 500, 100) == (500, 7, "prompt_over_bound")
    assert tk.bound_usage(20, 101, 500, 100) == (20, 100, "completion_over_max")
    assert tk.bound_usage(10**6, 10**6, 500, 100) == (
        500, 100, "prompt_over_bound,completion_over_max")
    assert tk.bound_usage(None, "x", 500, 100) == (500, 100, "prompt_missing,completion_not_int")
    with pytest.raises(ValueError):
        tk.bound_usage(1, 1, -1, 100)


def test_uncountable_parts_are_bounded_by_the_cap() -> None:
    """Files and native items the upstream expands count nothing offline: the cap bounds them."""
    text = {"role": "user", "content": "hello"}
    plain = tk.messages_prompt([text], "gpt-4o")
    assert plain.uncountable == 0 and plain.bound(128_000) == plain.counted
    pdf = {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}
    screenshot = {"type": "computer_call_output", "call_id": "c1",
                  "output": {"type": "computer_screenshot", "file_id": "file-2"}}
    reasoning = {"type": "reasoning", "summary": [{"type": "summary_text", "text": "x" * 50}]}
    for messages, open_parts in (([text, pdf], 1), ([text, pdf, pdf], 2), ([screenshot], 1),
                                 ([reasoning], 0)):
        found = tk.messages_prompt(messages, "gpt-4o")
        assert found.uncountable == open_parts, messages
        if open_parts:
            assert found.bound(128_000) == 128_000
            assert found.estimate(128_000) == min(
                found.counted + tk.FILE_TOKENS * open_parts, 128_000)
    assert tk.messages_bound([text, pdf], "gpt-4o") == (
        tk.messages_prompt([text, pdf], "gpt-4o").counted + tk.FILE_TOKENS)
