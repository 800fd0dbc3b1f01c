"""Pure parts of the bot: splitting answers, job paths, texts, import direction, context budget."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.bot import context, texts
from app.bot.delivery import split_text
from app.core.config import load_settings
from app.web.wechat import dispatch

ROOT = Path(__file__).resolve().parent.parent


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab 。\n中文😀é"), max_size=3000),
       st.integers(min_value=8, max_value=600))
def test_split_keeps_order_and_limit(content: str, limit: int) -> None:
    pieces = split_text(content, limit)
    assert "".join(pieces) == content
    assert all(len(p.encode("utf-8")) <= limit for p in pieces)
    assert all(pieces) or pieces == [""]


# Whole grapheme clusters (what a reader sees as one character) and their UTF-8 sizes: the
# largest, the family, is 25 bytes.
CLUSTERS = ["a", "中", "e\u0301", "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466",
            "\U0001F1E8\U0001F1F3", "\U0001F1FA\U0001F1F8", "1\ufe0f\u20e3", "\U0001F44D\U0001F3FD",
            "\u2764\ufe0f", "\U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F",
            "\r\n", "\n", "。", " ", "\u0915\u093f"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(CLUSTERS), max_size=400), st.integers(min_value=32, max_value=300))
def test_split_never_cuts_inside_a_grapheme_cluster(clusters: list[str], limit: int) -> None:
    """Review: a piece ended inside a ZWJ emoji sequence, a flag, a keycap or a base and its
    combining mark (only code points were kept whole): WeChat showed broken halves. Every cut
    now falls between clusters, when a whole cluster fits the room."""
    content = "".join(clusters)
    bounds, at = {0}, 0
    for cluster in clusters:
        at += len(cluster)
        bounds.add(at)
    pieces = split_text(content, limit)
    assert "".join(pieces) == content
    assert all(len(p.encode("utf-8")) <= limit for p in pieces)
    cuts = [sum(map(len, pieces[:i])) for i in range(1, len(pieces))]
    assert set(cuts) <= bounds, [content[c - 2:c + 2] for c in cuts if c not in bounds]


def test_split_cuts_a_cluster_longer_than_the_room_by_code_point() -> None:
    """One cluster longer than the room (a base with 100 combining marks) cannot be kept whole:
    it is cut between code points, within the limit, and nothing is lost."""
    content = "ab" + "e" + "\u0301" * 100 + "cd"
    pieces = split_text(content, 40)
    assert "".join(pieces) == content and pieces[0] == "ab"
    assert all(len(p.encode("utf-8")) <= 40 for p in pieces)


def test_split_prefers_sentence_ends() -> None:
    content = "第一句话。" * 100 + "尾巴"
    pieces = split_text(content, 100)
    assert all(p.endswith("。") for p in pieces[:-1])


def test_job_paths_resolve_and_app_never_imports_workers() -> None:
    for path in (dispatch.CHAT_JOB, dispatch.IMAGE_JOB, dispatch.PICTURE_JOB):
        module, _, name = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))
    for source in (ROOT / "app").rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "import workers" not in text and "from workers" not in text, source
    for source in (ROOT / "workers").rglob("*.py"):  # ARCHITECTURE: workers never import web
        text = source.read_text(encoding="utf-8")
        assert "app.web" not in text and "from app import web" not in text, source


def test_every_text_is_defined() -> None:
    defined = load_settings({}).texts
    assert set(texts.NAMES) <= set(defined)


def test_context_keeps_whole_recent_turns_within_budget(r: Any) -> None:
    cfg = load_settings({}, toml={"bot": {"context_max_tokens": 17}})
    pipe = r.pipeline()
    for i in range(5):
        context.append_turn(pipe, cfg, "oCtx", f"问题{i}", f"回答{i}")  # 4 tokens a message
    pipe.execute()
    kept = context.history(r, cfg, "oCtx")
    assert [m["content"] for m in kept] == ["问题3", "回答3", "问题4", "回答4"]
    assert context.messages_for(r, cfg, "oCtx", "新")[-1] == {"role": "user", "content": "新"}
    assert 0 < r.ttl("xy:wx:ctx:{oCtx}") <= cfg.bot.context_idle_seconds
