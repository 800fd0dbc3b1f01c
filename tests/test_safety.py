"""Content safety: folding, matching, masking, the reloading word file, settings, moderation."""

from __future__ import annotations

import logging
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from app.core.config import ConfigError, SafetySettings, load_settings
from app.core.safety import (
    FOLD,
    Filter,
    Matcher,
    fold,
    get_filter,
    moderation_verdict,
    read_words,
    screen,
)

WORDS = ["敏感词", "坏东西", "badword", "sex", "ass"]
MATCHER = Matcher(WORDS)
SEPARATORS = [" ", "*", ".", "-", "_", "\u200b", "\u200d", "\ufeff", "\u3000", "\u00a0", "！",
              "，", "\t", "\n", "\u0301"]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_words(path: Path, *words: str, bump: int = 0) -> None:
    """Write a word file and move its mtime `bump` seconds forward (a later edit)."""
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    if bump:
        st_ = path.stat()
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + bump * 1_000_000_000))


def test_exact_hit_is_masked_and_the_rest_kept() -> None:
    v = MATCHER.check("你好，这是敏感词吗？")
    assert v.hit and v.words == ["敏感词"] and v.masked == "你好，这是***吗？"
    clean = MATCHER.check("今天天气很好")
    assert not clean.hit and clean.words == [] and clean.masked == "今天天气很好"


@pytest.mark.parametrize("sep", SEPARATORS)
def test_inserted_separators_still_hit_and_are_masked(sep: str) -> None:
    text = f"前{sep}敏{sep}感{sep}词{sep}后"
    v = MATCHER.check(text)
    assert v.hit and v.words == ["敏感词"]
    inner = f"敏{sep}感{sep}词"
    assert v.masked == f"前{sep}{'*' * len(inner)}{sep}后"


def test_full_width_and_case_fold() -> None:
    v = MATCHER.check("说ＢＡＤ Ｗｏｒｄ了")
    assert v.hit and v.words == ["badword"] and v.masked == "说********了"
    assert MATCHER.check("BadWord").hit and MATCHER.check("b-a-d-w-o-r-d").hit
    assert MATCHER.check("Séx").masked == "***"  # accents fold away too


def test_listed_words_are_folded_like_the_text() -> None:
    m = Matcher(["敏-感 词", "ＦＯＯ"])
    assert m.check("敏感词").words == ["敏-感 词"] and m.check("foo").words == ["ＦＯＯ"]


def test_latin_words_hit_on_word_boundaries_only() -> None:
    for text in ("class", "sexy", "2sex", "bass", "Sussex"):
        assert not MATCHER.check(text).hit, text
    assert MATCHER.check("has sex").words == ["sex"]  # not "ass" across the space
    for text, masked in (("sex", "***"), ("S E X!", "*****!"), ("看sex了", "看***了"),
                         ("a ass.", "a ***.")):
        assert MATCHER.check(text).masked == masked, text


def test_overlapping_words_are_all_reported_and_masked() -> None:
    m = Matcher(["敏感", "感词", "敏感词", "甲乙丙", "乙丙丁", "abc", "bcd"])
    v = m.check("一个敏感词")
    assert set(v.words) == {"敏感", "感词", "敏感词"} and v.words[-1] == "感词"
    assert v.masked == "一个***"
    assert m.check("甲乙丙丁戊").masked == "****戊"
    assert m.check("甲乙丙丁").words == ["甲乙丙", "乙丙丁"]
    assert not m.check("abcd").hit  # Latin words need word boundaries: neither is a word here
    assert m.check("abc, bcd").words == ["abc", "bcd"]


def test_words_are_listed_in_order_of_first_appearance() -> None:
    v = MATCHER.check("坏东西和敏感词，还有坏东西")
    assert v.words == ["坏东西", "敏感词"] and v.masked == "***和***，还有***"


def test_masking_never_leaves_a_word_made_by_joining() -> None:
    m = Matcher(["敏感词", "ab"])
    v = m.check("a敏感词b")  # masking the middle would join "a" and "b"
    assert v.masked == "*****" and not m.check(v.masked).hit


def test_words_that_fold_to_nothing_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "app.core.safety"):
        m = Matcher(["***", " ", "词"])
    assert m.size == 1 and "no letters or digits" in caplog.text
    assert not Matcher([]).check("任何文字").hit


TEXT = st.text(alphabet=st.sampled_from(list("敏感词坏东西abdorwsxe ＢＡ*.\u200b你好，")),
               max_size=40)


@given(TEXT)
def test_masking_keeps_every_other_character(text: str) -> None:
    v = MATCHER.check(text)
    assert len(v.masked) == len(text)
    assert all(m == o or m == "*" for m, o in zip(v.masked, text, strict=True))
    assert v.hit == (v.masked != text) == bool(v.words)
    assert not MATCHER.check(v.masked).hit


@given(st.sampled_from(WORDS), st.lists(st.sampled_from(SEPARATORS), min_size=1, max_size=8),
       st.randoms(use_true_random=False))
def test_any_separators_inside_a_word_still_hit(word: str, seps: list[str], rnd: Any) -> None:
    text = "".join(ch + (rnd.choice(seps) if i < len(word) - 1 else "")
                   for i, ch in enumerate(word))
    v = MATCHER.check(f"看{text}了")
    assert v.words == [word] and v.masked == f"看{'*' * len(text)}了"


@given(st.text())
def test_whole_text_fold_equals_char_by_char_fold(text: str) -> None:
    assert fold(text) == text.translate(FOLD)


def test_ten_thousand_words_on_a_long_message() -> None:
    rng = random.Random(14)
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    words = {"".join(rng.choices(cjk, k=rng.randint(2, 4))) for _ in range(10_000)}
    m = Matcher(words)
    planted = sorted(words)[:3]
    filler = [chr(c) for c in range(0x8000, 0x8000 + 3000)] + list("，。 abc123")
    body = "".join(rng.choices(filler, k=2000 - 20))
    text = body[:500] + planted[0] + body[500:1000] + planted[1] + body[1000:] + planted[2]
    v = m.check(text)
    assert v.words == planted
    assert v.masked.count("*") == sum(map(len, planted))


def test_word_file_comments_blank_lines_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text("\ufeff# a comment\n\n敏感词 # why it is listed\n  C#  \n#另一个\n坏东西\n",
                    encoding="utf-8")
    assert read_words(path) == ["敏感词", "C#", "坏东西"]


def test_bad_word_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^safety\.words_file: cannot read .*missing\.txt"):
        Filter(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa\n")
    with pytest.raises(ConfigError, match=r"^safety\.words_file: cannot read"):
        Filter(bad)


def test_word_file_reloads_when_it_changes_at_most_every_n_seconds(tmp_path: Path) -> None:
    path, clock = tmp_path / "words.txt", Clock()
    write_words(path, "甲乙")
    f = Filter(path, reload_seconds=5, clock=clock)
    assert f.check("甲乙").hit and not f.check("丙丁").hit
    write_words(path, "丙丁", bump=1)
    clock.now += 4.9
    assert f.check("甲乙").hit and not f.check("丙丁").hit  # not looked at yet
    clock.now += 0.1
    assert f.check("甲乙").hit  # seen changed: read once it has not changed for one period
    clock.now += 5
    assert f.check("丙丁").hit and not f.check("甲乙").hit
    before = f.current()
    clock.now += 5
    assert f.current() is before  # unchanged file: the same matcher, not rebuilt


def test_a_file_still_being_written_is_not_read_half_done(tmp_path: Path) -> None:
    path, clock = tmp_path / "words.txt", Clock()
    write_words(path, "甲乙")
    f = Filter(path, reload_seconds=5, clock=clock)
    path.write_text("", encoding="utf-8")  # `cat > words.txt` truncates first...
    clock.now += 5
    assert f.check("甲乙").hit
    write_words(path, "甲乙", "丙丁", bump=1)  # ...and writes the rest a moment later
    clock.now += 5
    assert f.check("甲乙").hit and not f.check("丙丁").hit
    clock.now += 5
    assert f.check("甲乙").hit and f.check("丙丁").hit


def test_reload_keeps_the_old_list_when_the_file_breaks(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, clock = tmp_path / "words.txt", Clock()
    write_words(path, "甲乙")
    f = Filter(path, reload_seconds=5, clock=clock)
    path.unlink()
    with caplog.at_level(logging.WARNING, "app.core.safety"):
        for _ in range(3):
            clock.now += 5
            assert f.check("甲乙").hit
    assert caplog.text.count("keeping 1 words") == 1  # warned once, not every check
    path.write_bytes(b"\xff\xfe\n")
    for _ in range(3):
        clock.now += 5
        assert f.check("甲乙").hit
    assert caplog.text.count("keeping 1 words") == 2
    write_words(path, "丙丁", bump=2)
    for _ in range(2):  # seen changed, then read
        clock.now += 5
        f.current()
    assert f.check("丙丁").hit and not f.check("甲乙").hit


def test_checks_during_reloads_see_one_list_or_the_other(tmp_path: Path) -> None:
    path, clock = tmp_path / "words.txt", Clock()
    write_words(path, "甲乙", "丙丁")
    f = Filter(path, reload_seconds=0, clock=clock)
    seen: set[tuple[str, ...]] = set()
    start = threading.Barrier(4)

    def check() -> None:
        start.wait(timeout=30)
        for _ in range(300):
            seen.add(tuple(f.check("甲乙丙丁戊己").words))

    threads = [threading.Thread(target=check) for _ in range(3)]
    for t in threads:
        t.start()
    start.wait(timeout=30)
    for i in range(1, 30):  # replaced atomically, as the README advises
        write_words(tmp_path / "next.txt", *(("戊己",) if i % 2 else ("甲乙", "丙丁")), bump=i)
        os.replace(tmp_path / "next.txt", path)
    for t in threads:
        t.join(timeout=30)
    assert seen and seen <= {("甲乙", "丙丁"), ("戊己",)}


def safety_toml(tmp_path: Path, **table: Any) -> dict[str, Any]:
    """Return load_settings overrides for a [safety] table with a real word file."""
    path = tmp_path / "words.txt"
    if not path.exists():
        write_words(path, "敏感词", "badword")
    return {"toml": {"safety": {"enabled": True, "words_file": str(path), **table}}}


def test_safety_defaults_are_off() -> None:
    s = load_settings({}).safety
    assert s == SafetySettings() and not s.enabled and get_filter(s) is None
    assert (s.bot_input, s.bot_output, s.api_input, s.api_output) == ("refuse", "mask", "off", "off")
    assert "safety_refused" in load_settings({}).texts


@pytest.mark.parametrize(("table", "message"), [
    ({"bot_input": "block"}, "safety.bot_input: 'block' is not off, refuse or mask"),
    ({"api_output": True}, "safety.api_output: must be a string"),
    ({"enabled": "yes"}, "safety.enabled: must be true or false"),
    ({"reload_seconds": -1}, "safety.reload_seconds: must be a number >= 0"),
    ({"reload_seconds": "5"}, "safety.reload_seconds: must be a number >= 0"),
    ({"words_list": "x"}, "safety.words_list: unknown setting"),
    ({"moderation_categories": "sexual"}, "safety.moderation_categories: must be a list"),
    ({"moderation": True, "moderation_model": ""}, "safety.moderation_model: required"),
    ({"words_file": "/nonexistent/words.txt"}, "safety.words_file: /nonexistent/words.txt is not"),
    ({"words_file": ""}, "safety.words_file: required when safety is enabled"),
])
def test_bad_safety_settings_fail_naming_the_setting(
        tmp_path: Path, table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({}, **safety_toml(tmp_path, **table))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_disabled_safety_does_not_need_the_file() -> None:
    s = load_settings({}, toml={"safety": {"words_file": "/nonexistent/w.txt"}}).safety
    assert not s.enabled and get_filter(s) is None


def test_relative_words_file_is_resolved_and_the_filter_shared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_words(tmp_path / "words.txt", "敏感词")
    monkeypatch.chdir(tmp_path)
    s = load_settings({}, toml={"safety": {"enabled": True, "words_file": "words.txt"}}).safety
    assert s.words_file == str(tmp_path.resolve() / "words.txt")
    assert get_filter(s) is get_filter(s) and get_filter(s).check("敏感词").hit


def hits(where: str, action: str) -> float:
    """Read the hit counter for one label pair."""
    value = REGISTRY.get_sample_value("xiaoyi_safety_hits_total",
                                      {"where": where, "action": action})
    return value or 0.0


def test_screen_applies_the_action_for_each_place_and_counts_hits(tmp_path: Path) -> None:
    s = load_settings({}, **safety_toml(tmp_path, api_input="mask")).safety
    before = {k: hits(*k) for k in (("bot_input", "refuse"), ("bot_output", "mask"),
                                     ("api_input", "mask"))}
    refused = screen(s, "bot_input", "这是敏感词")
    assert (refused.action, refused.text, refused.words) == ("refuse", "这是敏感词", ["敏感词"])
    masked = screen(s, "bot_output", "答案里有 BadWord。")
    assert (masked.action, masked.text) == ("mask", "答案里有 *******。")
    assert screen(s, "api_input", "敏感词").text == "***"
    assert screen(s, "api_output", "敏感词").action == "pass"  # off by default
    assert screen(s, "bot_input", "没问题").action == "pass"
    assert {k: hits(*k) - v for k, v in before.items()} == {
        ("bot_input", "refuse"): 1, ("bot_output", "mask"): 1, ("api_input", "mask"): 1}
    with pytest.raises(ValueError, match="unknown safety place"):
        screen(s, "bot", "x")
    assert screen(SafetySettings(), "bot_input", "敏感词").action == "pass"


MODERATION = {
    "id": "modr-0001", "model": "omni-moderation-latest",
    "results": [{
        "flagged": True,
        "categories": {"hate": False, "harassment": False, "illicit": None, "self-harm": False,
                       "sexual": True, "sexual/minors": False, "violence": True},
        "category_scores": {"hate": 0.01, "sexual": 0.93, "violence": 0.71},
        "category_applied_input_types": {"sexual": ["text"], "violence": ["text"]},
    }],
}


def test_moderation_verdict_lists_flagged_categories() -> None:
    v = moderation_verdict(MODERATION)
    assert v.flagged and v.categories == ["sexual", "violence"]
    assert moderation_verdict(MODERATION, ["violence", "hate"]).categories == ["violence"]
    assert not moderation_verdict(MODERATION, ["hate"]).flagged
    clean = {"results": [{"flagged": False, "categories": {"sexual": False}}]}
    assert moderation_verdict(clean) == moderation_verdict(clean, ["sexual"])
    assert not moderation_verdict(clean).flagged


def test_moderation_verdict_reads_every_result_and_bare_flags() -> None:
    body = {"results": [{"flagged": False, "categories": {"hate": False}},
                        {"flagged": True, "categories": {}}]}
    assert moderation_verdict(body).categories == ["flagged"]


@pytest.mark.parametrize("body", [None, [], {}, {"results": []}, {"results": "x"},
                                  {"results": [{"flagged": True}]}, {"results": [1]}])
def test_moderation_verdict_refuses_what_is_not_a_moderation(body: Any) -> None:
    with pytest.raises(ValueError):
        moderation_verdict(body)


if __name__ == "__main__":  # python tests/test_safety.py: time checks on a 10 000-word list
    import time
    import timeit

    rng = random.Random(7)
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    listed = {"".join(rng.choices(cjk, k=rng.randint(2, 4))) for _ in range(10_000)}
    matcher = Matcher(listed)
    other = [chr(c) for c in range(0x8000, 0x8000 + 3000)] + list("，。！？ abc 123")
    clean_text = "".join(rng.choices(other, k=2000))
    hit_text = "".join(rng.choices(other + sorted(listed)[:40], k=1900))[:2000]
    accented = "Café ｆｉｎｅ ß " + hit_text[:1986]  # characters that expand: mapped one by one
    for name, sample in (("no hit", clean_text), ("hits", hit_text), ("hits, accents", accented)):
        runs = 2000
        seconds = min(timeit.repeat(lambda s=sample: matcher.check(s), number=runs, repeat=5,
                                   timer=time.process_time))
        found = len(matcher.check(sample).words)
        print(f"{name}: {seconds / runs * 1e6:.0f} µs a check, {len(sample)} chars, {found} words")
