"""画 …: the image job makes a picture upstream, uploads it and sends it (or a link, or parks)."""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
from PIL import Image
from wechat_kit import WeChat, bot, run_jobs, text_xml, wait_for, wechat_settings

from app.bot import handoff, users
from app.core.config import load_settings
from app.core.errors import UpstreamError
from app.core.money import ledger, wallet
from app.edges.store import get_queue
from app.web.wechat import dispatch
from fakes import FakeWeChatAPI
from workers.images import MAX_MEDIA_BYTES, fit

OPENID = "oImageUser000000000000000001"
TEXTS = load_settings({}).texts
PRICE = 1300  # dall-e-2 512x512 = 0.13 元


def images(upstream: Any) -> list[dict[str, Any]]:
    return [q["body"] for q in upstream.requests if q["path"].startswith("/v1/images/")]


def test_picture_is_uploaded_and_sent(upstream: Any, redis_url: str, r: Any,
                                      wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx)
    with bot(settings, r) as (_, url):
        wechat = WeChat(url, wx.appid)
        acks = [wechat.say(OPENID, "画 一只猫", msg_id="888000001") for _ in range(2)]
        assert acks == [TEXTS["image_started"]] * 2
        sent = wait_for(lambda: wx.sent(OPENID))
    upload = wx.uploads[0]
    assert upload["is_png"] and upload["filename"] == "image.png"
    assert sent == [{"touser": OPENID, "msgtype": "image",
                     "image": {"media_id": upload["media_id"]}}]
    assert len(images(upstream)) == 1 and images(upstream)[0]["prompt"] == "一只猫"
    assert images(upstream)[0]["response_format"] == "b64_json"
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 10_000 - PRICE and ledger.verify(r) == []


def test_upload_refused_sends_the_link(upstream: Any, redis_url: str, r: Any,
                                       wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx, image_format="url")
    wx.set_error("media/upload", 40005)
    with bot(settings, r) as (_, url):
        WeChat(url, wx.appid).say(OPENID, "/image a red fox")
        sent = wait_for(lambda: wx.sent(OPENID))
    link = images(upstream)[0]
    assert link["response_format"] == "url"
    content = sent[0]["text"]["content"]
    assert content.startswith("图片已生成") and "/v1/files/img-512x512-" in content


def test_without_push_the_picture_waits_for_continue(upstream: Any, redis_url: str, r: Any,
                                                     wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx)
    wx.set_error("message/custom/send", 48001)
    with bot(settings, r) as (_, url):
        wechat = WeChat(url, wx.appid)
        assert wechat.say(OPENID, "画 山水") == TEXTS["image_started"]
        wait_for(lambda: r.llen(handoff.park_key(OPENID)))
        got = wechat.reply(wechat.post(text_xml(OPENID, "继续")))
        assert wechat.say(OPENID, "画 第二张") == TEXTS["image_started_parked"]
    assert got["MsgType"] == "image" and got["Image"]["MediaId"] == wx.uploads[0]["media_id"]


def test_an_unreadable_upstream_picture_is_an_upstream_failure() -> None:
    """An odd upstream body is retried as an upstream failure, never as a bug (SPEC §7.14)."""
    for junk in (b"not a picture", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b""):
        with pytest.raises(UpstreamError):
            fit(junk)


def test_fit_keeps_small_pictures_and_shrinks_big_ones() -> None:
    small = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(small, "PNG")
    assert fit(small.getvalue()) == (small.getvalue(), "png")
    noise = Image.frombytes("RGB", (1200, 1200), os.urandom(1200 * 1200 * 3))
    big = io.BytesIO()
    noise.save(big, "PNG")
    assert len(big.getvalue()) > MAX_MEDIA_BYTES
    data, ext = fit(big.getvalue())
    assert ext == "jpg" and len(data) <= MAX_MEDIA_BYTES and data.startswith(b"\xff\xd8\xff")


def test_a_refused_picture_run_again_charges_and_sends_nothing(upstream: Any, redis_url: str,
                                                               r: Any,
                                                               wx: FakeWeChatAPI) -> None:
    """画 whose prompt the upstream refuses gets the apology and is closed: a late duplicate
    job for the same message (the prompt now one the upstream takes) holds, asks and sends
    nothing."""
    settings = wechat_settings(upstream.url, redis_url, wx)
    with bot(settings, r, worker=False) as (app, url):
        WeChat(url, wx.appid).say(OPENID, "画 [[fake:status=400]]不行", msg_id="888000009")
        run_jobs(app)
        assert [m["text"]["content"] for m in wx.sent(OPENID)] == [TEXTS["image_failed"]]
        dk = f"{OPENID}:888000009"
        with app.app_context():
            get_queue("image").enqueue(dispatch.IMAGE_JOB, OPENID, dk, "一只猫",
                                       job_id="wx-late-image")
        run_jobs(app)
    assert len(images(upstream)) == 1 and len(wx.sent(OPENID)) == 1 and not wx.uploads
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 10_000 and ledger.open_holds(r) == 0
    kinds = [e["kind"] for e in ledger.ledger_entries(r, acct) if e.get("req") == dk]
    assert kinds == ["reserve", "refund"] and ledger.verify(r) == []


def test_a_prompt_past_the_question_cap_draws_nothing(upstream: Any, redis_url: str, r: Any,
                                                      wx: FakeWeChatAPI) -> None:
    """A 画 prompt is capped like a question ([bot] question_max_tokens), not only by the
    64 KB body: a longer one gets the note, queues no job and holds nothing."""
    settings = wechat_settings(upstream.url, redis_url, wx, question_max_tokens=50)
    with bot(settings, r) as (app, url):
        wechat = WeChat(url, wx.appid)
        long = "一只很大的猫" * 20  # 120 汉字
        got = [wechat.say(OPENID, f"画 {long}", msg_id="888000090") for _ in range(2)]
        assert got == [TEXTS["question_too_long"].format(limit=50)] * 2
        assert wechat.say(OPENID, "/image " + "a red fox " * 100) == got[0]
        assert wechat.say(OPENID, "画 一只猫") == TEXTS["image_started"]  # short: drawn
        wait_for(lambda: wx.sent(OPENID))
        run_jobs(app)
    assert [q["prompt"] for q in images(upstream)] == ["一只猫"]
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 10_000 - PRICE and ledger.verify(r) == []


@pytest.mark.parametrize("names", [{}, {"image_model": "画图", "models": {"画图": "dall-e-2"}}],
                         ids=["dall-e-2", "a name mapped to dall-e-2"])
def test_a_prompt_past_the_image_models_limit_draws_nothing(
        upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI, names: dict[str, Any]) -> None:
    """Within question_max_tokens but past the image model's own limit (dall-e-2: 1 000
    characters, which OpenAI refuses): the note with that limit, no job, nothing held. The
    limit is the upstream model's that [models] maps [bot] image_model to, as the job's price
    is (review: a public name such as "画图" took the 32 000 characters of an unknown model)."""
    settings = wechat_settings(upstream.url, redis_url, wx, **names)
    with bot(settings, r) as (app, url):
        wechat = WeChat(url, wx.appid)
        prompt = ("a red fox " * 101)[:1001]  # 1 001 characters, ≈ 300 tokens
        assert wechat.say(OPENID, "画 " + prompt) == TEXTS["question_too_long"].format(
            limit=1000)
        run_jobs(app)
    assert images(upstream) == []
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 10_000 and ledger.verify(r) == []
