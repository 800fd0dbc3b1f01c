"""The pure money arithmetic: the original service's token rule, the estimates, costs (integers)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core import pricing
from app.core.config import ModelPrice

GPT35 = ModelPrice(kind="chat", prompt_per_1k=100, completion_per_1k=200, max_output=4096)


@pytest.mark.parametrize("text,tokens", [
    ("你好世界", 4),
    ("hello world", 3),  # ceil(1.3 × 2) = ceil(2.6)
    ("你好 GPT4 world", 5),  # 2 + ceil(2.6)
    ("", 0),
    ("hello", 2),  # ceil(1.3)
    (" ".join(["w"] * 10), 13),  # exactly 13: 1.3 × 10 in floats would ceil to 14
    (" ".join(["w"] * 30), 39),
    ("gpt-3.5", 4),  # gpt, 3, 5 → ceil(3.9)
    ("abc123", 2),  # one run of letters and digits
    ("don't", 3),  # don, t
    ("，。！？……", 0),  # punctuation is not counted
    ("こんにちは", 0),  # kana are not 汉字
    ("안녕하세요", 0),  # nor hangul
    ("ＧＰＴ４", 0),  # full-width letters are not ASCII
    ("\u3400\U00020000\U0002a700", 3),  # extension A and B/C ideographs count
    ("我用Python写code", 3 + 3),  # 我用写 + ceil(1.3 × 2)
    ("中文English混合text测试123", 6 + 4),  # 中文混合测试 + ceil(1.3 × 3)
])
def test_seed_rule(text: str, tokens: int) -> None:
    assert pricing.seed_tokens(text) == tokens
    assert pricing.estimate_tokens(text, "gpt-4o") >= tokens  # the estimate never goes below


@pytest.mark.parametrize("text", ["你好世界，今天天气很好", "hello world, this is a test",
                                  "我用Python写code"])
def test_plain_text_keeps_the_seed_numbers(text: str) -> None:
    """Under o200k plain Chinese and English text is billed by the seed's rule."""
    assert pricing.estimate_tokens(text, "gpt-4o") == pricing.seed_tokens(text)


@pytest.mark.parametrize("text", ["\uf900" * 50, "こんにちは" * 10, "안녕하세요" * 10,
                                  "привет мир " * 10, "😀" * 20, "，。！？" * 20])
def test_no_character_is_free(text: str) -> None:
    """What the seed counts as 0 (kana, hangul, Cyrillic, emoji, punctuation) costs tokens."""
    assert pricing.seed_tokens(text) < len(text) // 5
    for model in ("gpt-4", "gpt-4o", "gpt-3.5-turbo", None):
        assert pricing.estimate_tokens(text, model) >= len(text) // 5


def test_estimate_messages_counts_every_part() -> None:
    messages = [
        {"role": "system", "content": "你好"},
        {"role": "user", "content": [{"type": "text", "text": "hello world"},
                                     {"type": "image_url", "image_url": {"url": "http://x"}}]},
        {"role": "assistant", "content": None},
    ]
    plain = pricing.estimate_messages(messages, "gpt-4o")
    assert plain >= 2 + 3 + 85  # the texts, plus at least a low-detail image
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    assert pricing.estimate_messages(messages, "gpt-4o", tools=tools) > plain + 10
    assert pricing.estimate_any(["你好", "hello world"], "gpt-4o") >= 5
    assert pricing.estimate_any([[1, 2, 3], [4]], "gpt-4o") == 4  # token arrays: one per id


def _hanzi(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2EBEF
            or 0x30000 <= cp <= 0x323AF)


def reference_estimate(text: str) -> int:
    """An independent oracle: count by code point ranges and runs, ceil with exact fractions."""
    hanzi = sum(map(_hanzi, text))
    words = sum(1 for word, _ in itertools.groupby(text, lambda c: c.isascii() and c.isalnum())
                if word)
    return hanzi + -(-Fraction(13, 10) * words // 1)


texts = st.text(alphabet=st.sampled_from(list("ab1 Z9-,.你好世界㐀\U00020000こ한Ｇ\n")), max_size=60)


@given(texts)
def test_seed_rule_matches_oracle(text: str) -> None:
    got = pricing.seed_tokens(text)
    assert isinstance(got, int) and got >= 0
    assert got == reference_estimate(text)


@given(texts, texts)
def test_seed_rule_monotonic_and_subadditive(a: str, b: str) -> None:
    joined = pricing.seed_tokens(a + " " + b)
    assert max(pricing.seed_tokens(a), pricing.seed_tokens(b)) <= joined
    assert joined <= pricing.seed_tokens(a) + pricing.seed_tokens(b)


prices = st.builds(ModelPrice, kind=st.just("chat"),
                   prompt_per_1k=st.integers(0, 100_000), completion_per_1k=st.integers(0, 100_000),
                   max_output=st.integers(1, 200_000))
counts = st.integers(0, 2_000_000)


@given(prices, counts, counts)
def test_token_cost_is_the_ceiling_of_the_exact_price(price: ModelPrice, pt: int, ct: int) -> None:
    cost = pricing.token_cost(price, pt, ct)
    exact = Fraction(pt * price.prompt_per_1k + ct * price.completion_per_1k, 1000)
    assert isinstance(cost, int) and cost >= 0
    assert exact <= cost < exact + 1


@given(prices, counts, counts, st.integers(0, 1000), st.integers(0, 1000))
def test_token_cost_monotonic(price: ModelPrice, pt: int, ct: int, dp: int, dc: int) -> None:
    assert pricing.token_cost(price, pt, ct) <= pricing.token_cost(price, pt + dp, ct + dc)


@given(prices, counts, st.integers(1, 1_000_000), st.data())
def test_reserve_covers_any_completion_up_to_max_tokens(price: ModelPrice, pt: int,
                                                        max_tokens: int, data: st.DataObject) -> None:
    ct = data.draw(st.integers(0, max_tokens))
    held = pricing.reserve_cost(price, pt, max_tokens)
    assert isinstance(held, int) and held >= pricing.token_cost(price, pt, ct) >= 0


@given(prices, counts, st.integers(1, 100_000), st.integers(1, 200), st.data())
def test_reserve_covers_every_choice(price: ModelPrice, pt: int, max_tokens: int, choices: int,
                                     data: st.DataObject) -> None:
    ct = data.draw(st.integers(0, max_tokens * choices))
    held = pricing.reserve_cost(price, pt, max_tokens, choices)
    assert held >= pricing.token_cost(price, pt, ct)
    assert held >= pricing.reserve_cost(price, pt, max_tokens)  # more choices never hold less


@given(prices, counts, st.data())
def test_reserve_without_max_tokens_covers_the_models_cap(price: ModelPrice, pt: int,
                                                          data: st.DataObject) -> None:
    ct = data.draw(st.integers(0, price.max_output))
    assert pricing.reserve_cost(price, pt, None) >= pricing.token_cost(price, pt, ct)
    assert pricing.reserve_cost(price, pt, None) == pricing.token_cost(price, pt, price.max_output)


def test_small_costs_round_up() -> None:
    assert pricing.token_cost(GPT35, 1) == 1  # 0.1 unit is charged as 1, never 0
    assert pricing.token_cost(GPT35, 0, 0) == 0
    assert pricing.token_cost(GPT35, 10, 5) == 2  # (1000 + 1000) / 1000
    assert pricing.token_cost(GPT35, 11, 5) == 3


@given(st.integers(1, 10), st.sampled_from(["256x256", "512x512", "1024x1024"]))
def test_image_cost(n: int, size: str) -> None:
    price = ModelPrice(kind="image", images={"256x256": 1200, "512x512": 1300, "1024x1024": 1400})
    assert pricing.image_cost(price, size, n) == price.images[size] * n
    assert pricing.image_cost(price, size, n, "standard") == price.images[size] * n
    assert pricing.image_cost(price, "100x100", n) is None
    assert pricing.image_cost(price, size, n, "hd") is None  # an unpriced quality: refused


def test_hd_costs_what_the_config_says() -> None:
    from app.core.config import load_settings

    dalle3 = load_settings({}).prices["dall-e-3"]
    standard = pricing.image_cost(dalle3, "1024x1024", 1)
    assert pricing.image_cost(dalle3, "1024x1024", 1, "hd") == 2 * standard  # as OpenAI bills
    assert pricing.image_cost(dalle3, "1792x1024", 1, "hd") == 3 * standard
    assert dalle3.max_images == 1
