"""Pictures users send, over real HTTP: fetched by MediaId (never PicUrl), shrunk, asked about
with the user's context, billed by OpenAI's image-token rule; failures cost nothing."""

from __future__ import annotations

import base64
import io
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image
from stub_kit import send_body
from wechat_kit import WeChat, bot, image_xml, wait_for, wechat_settings

from app import create_app
from app.bot import pictures, users
from app.bot.jobs import Hopeless
from app.bot.pictures import shrink
from app.core import pricing, tokens
from app.core.config import ConfigError, load_settings, units_to_yuan
from app.core.money import ledger, wallet
from fakes import FakeWeChatAPI
from fakes.upstream import ANSWER_PREFIX, count_tokens

OPENID = "oPictureUser0000000000000001"
SETTINGS = load_settings({})
TEXTS, BOT = SETTINGS.texts, SETTINGS.bot
PRICE = SETTINGS.prices["gpt-4o"]


class PicUrlHost(ThreadingHTTPServer):
    """A local server a message's PicUrl points at: it serves a picture and counts every hit."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                host.hits.append(self.path)
                body = jpeg(64, 64)
                send_body(self, body, "image/jpeg")

            def log_message(self, *args: Any) -> None:
                """Stay quiet."""

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


def jpeg(width: int, height: int, noisy: bool = False) -> bytes:
    img = Image.new("RGB", (width, height), (30, 120, 200))
    if noisy:  # random pixels do not compress: a big file
        img = Image.frombytes("RGB", (width, height), random.Random(7).randbytes(width * height * 3))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95)
    return out.getvalue()


def sent_picture(body: dict[str, Any]) -> tuple[str, bytes]:
    """Return (MIME type, bytes) of the data URL in the last user message of a chat request."""
    part = next(p for p in body["messages"][-1]["content"] if p["type"] == "image_url")
    head, _, data = part["image_url"]["url"].partition(",")
    assert head.startswith("data:") and head.endswith(";base64")
    return head[5:-7], base64.b64decode(data)


@pytest.fixture
def pic_host() -> Iterator[PicUrlHost]:
    host = PicUrlHost()
    yield host
    host.shutdown()


@pytest.fixture
def start(upstream: Any, redis_url: str, r: Any,
          wx: FakeWeChatAPI) -> Iterator[Callable[..., tuple[Any, WeChat]]]:
    with ExitStack() as stack:
        def run(env_extra: dict[str, str] | None = None, **bot_overrides: Any) -> tuple[Any, WeChat]:
            settings = wechat_settings(upstream.url, redis_url, wx, env_extra=env_extra,
                                       **{"reply_wait_seconds": 3.0, **bot_overrides})
            app, url = stack.enter_context(bot(settings, r))
            return app, WeChat(url, wx.appid)
        yield run


def chats(upstream: Any) -> list[dict[str, Any]]:
    return [q["body"] for q in upstream.requests if q["path"].startswith("/v1/chat/")]


def entries(r: Any) -> list[dict[str, Any]]:
    return list(ledger.ledger_entries(r, users.account_of(r, OPENID)))


def charged_nothing(r: Any) -> None:
    """Assert every hold was given back whole (the trial credit untouched, no settle)."""
    kinds = [e["kind"] for e in entries(r)]
    assert kinds[0] == "topup" and set(kinds[1:]) <= {"reserve", "refund"}
    assert kinds.count("reserve") == kinds.count("refund")
    assert wallet.balance(r, users.account_of(r, OPENID)) == 10_000 and ledger.verify(r) == []


def send_picture(wechat: WeChat, media_id: str, pic_url: str,
                 msg_id: str | None = None) -> str | None:
    got = wechat.reply(wechat.post(image_xml(OPENID, media_id, pic_url, msg_id)))
    return None if got is None else got.get("Content")


def test_a_picture_is_answered_and_billed_with_its_image_tokens(
        start: Callable[..., Any], upstream: Any, wx: FakeWeChatAPI, r: Any,
        pic_host: PicUrlHost) -> None:
    _, wechat = start()
    picture = jpeg(1000, 800)
    media = wx.add_media(picture)
    answers = [send_picture(wechat, media, pic_host.url("p.jpg"), "660000001") for _ in range(2)]
    assert answers == [ANSWER_PREFIX + BOT.vision_prompt] * 2  # a retry joins the one job
    assert pic_host.hits == []  # PicUrl is never fetched
    assert [c["query"]["media_id"] for c in wx.calls_to("media/get")] == [media]
    (asked,) = chats(upstream)
    assert asked["model"] == "gpt-4o"
    assert sent_picture(asked) == ("image/jpeg", picture)  # small enough: sent as it came
    assert asked["messages"][-1]["content"][-1] == {"type": "text", "text": BOT.vision_prompt}
    reserve, settle = [e for e in entries(r) if e["kind"] in ("reserve", "settle")]
    image = 85 + 170 * 4  # 1000 × 800 → 960 × 768: 2 × 2 tiles of 512 px
    texts = [m["content"] for m in asked["messages"][:-1]] + [BOT.vision_prompt]
    assert int(settle["pt"]) == sum(map(count_tokens, texts)) + 1 + image  # the fake's usage
    assert int(settle["cost"]) == pricing.token_cost(PRICE, int(settle["pt"]), int(settle["ct"]))
    bound = tokens.messages_bound(asked["messages"], "gpt-4o")
    assert bound >= int(settle["pt"]) > image
    # held before media/get, for a picture of any size: its worst case (2 × 4 tiles)
    worst = [*asked["messages"][:-1], {"role": "user", "content": pictures.stand_in(SETTINGS)}]
    held = tokens.messages_bound(worst, "gpt-4o")
    assert held - bound == 170 * (8 - 4)
    assert -int(reserve["amount"]) == pricing.reserve_cost(PRICE, held, BOT.chat_max_tokens)
    assert ledger.verify(r) == []
    assert wechat.say(OPENID, "余额").endswith(f"今日免费对话剩余：{BOT.daily_free_messages} 条")
    wechat.say(OPENID, "图里是什么颜色")
    history = chats(upstream)[-1]["messages"]
    assert {"role": "user", "content": "[图片]"} in history
    assert {"role": "assistant", "content": answers[0]} in history
    assert history[-1] == {"role": "user", "content": "图里是什么颜色"}


def test_an_empty_wallet_is_told_before_the_picture_is_fetched(
        start: Callable[..., Any], upstream: Any, wx: FakeWeChatAPI, r: Any,
        pic_host: PicUrlHost) -> None:
    """Red team: a picture from a user whose wallet was empty (free chats do not pay for
    pictures) cost a media/get download and a decode before the wallet said no. The wallet is
    held first: the empty one gets the recharge note with no media/get, and once funded the
    next picture is fetched once and answered."""
    _, wechat = start(trial_credit="0")
    got = send_picture(wechat, wx.add_media(jpeg(640, 480)), pic_host.url("e.jpg"), "660000101")
    # the note for a picture: it uses no free chat (not "今日免费次数也已用完": they are all left)
    assert got == TEXTS["insufficient_picture"].format(balance=units_to_yuan(0))
    assert wx.calls_to("media/get") == [] and chats(upstream) == [] and pic_host.hits == []
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 0 and entries(r) == []
    wallet.topup(r, acct, 10_000)
    media = wx.add_media(jpeg(640, 480))
    got = send_picture(wechat, media, pic_host.url("f.jpg"), "660000102")
    assert got == ANSWER_PREFIX + BOT.vision_prompt
    assert [c["query"]["media_id"] for c in wx.calls_to("media/get")] == [media]
    assert ledger.verify(r) == []


def test_an_oversized_picture_is_downscaled_before_it_is_sent(
        start: Callable[..., Any], upstream: Any, wx: FakeWeChatAPI, r: Any,
        pic_host: PicUrlHost) -> None:
    _, wechat = start()
    big = io.BytesIO()
    Image.new("RGBA", (4000, 3000), (10, 200, 30, 128)).save(big, "PNG")
    media = wx.add_media(big.getvalue(), content_type="image/png", filename="big.png")
    send_picture(wechat, media, pic_host.url("big.png"))  # passive, or pushed when slower
    mime, data = sent_picture(wait_for(lambda: chats(upstream))[0])
    with Image.open(io.BytesIO(data)) as shown:
        assert (mime, shown.format, shown.size) == ("image/jpeg", "JPEG", (2048, 1536))
    settle = wait_for(lambda: next((e for e in entries(r) if e["kind"] == "settle"), None))
    assert int(settle["pt"]) > 85 + 170 * 4  # 2048 × 1536 → 1024 × 768: 2 × 2 tiles
    assert pic_host.hits == []


def test_a_picture_over_the_byte_limit_is_reencoded_within_it(
        start: Callable[..., Any], upstream: Any, wx: FakeWeChatAPI,
        pic_host: PicUrlHost) -> None:
    _, wechat = start(picture_max_bytes=65536)
    noisy = jpeg(900, 700, noisy=True)
    assert len(noisy) > 65536
    send_picture(wechat, wx.add_media(noisy), pic_host.url("noisy.jpg"))
    mime, data = sent_picture(wait_for(lambda: chats(upstream))[0])
    assert mime == "image/jpeg" and len(data) <= 65536


@pytest.mark.parametrize("errcode", [40007, -1])
def test_a_failing_media_get_apologises_and_charges_nothing(
        errcode: int, start: Callable[..., Any], upstream: Any, wx: FakeWeChatAPI, r: Any,
        pic_host: PicUrlHost) -> None:
    _, wechat = start(reply_wait_seconds=0.5)
    wx.set_error("media/get", errcode)
    got = send_picture(wechat, "MEDIA-404", pic_host.url("x.jpg"))
    if got is None:  # -1 (system busy) is retried by rq first, then apologised for by push
        got = wait_for(lambda: wx.sent(OPENID), timeout=15)[0]["text"]["content"]
    assert got == TEXTS["picture_failed"]
    assert len(wx.calls_to("media/get")) == (3 if errcode == -1 else 1)
    assert chats(upstream) == [] and pic_host.hits == []
    charged_nothing(r)  # held before media/get, given back whole


def test_an_unreadable_picture_or_a_failing_upstream_charges_nothing(
        start: Callable[..., Any], upstream: Any, wx: FakeWeChatAPI, r: Any,
        pic_host: PicUrlHost) -> None:
    _, wechat = start()
    junk = wx.add_media(b"\xff\xd8\xff not really a jpeg")
    assert send_picture(wechat, junk, pic_host.url("junk.jpg")) == TEXTS["picture_failed"]
    assert chats(upstream) == []
    requests.post(upstream.url.removesuffix("/v1") + "/_fake/config", json={"status": 400},
                  timeout=10).raise_for_status()
    assert send_picture(wechat, wx.add_media(jpeg(50, 50)),
                        pic_host.url("ok.jpg")) == TEXTS["picture_failed"]
    assert len(chats(upstream)) == 1
    assert [e["kind"] for e in entries(r)] == ["topup"] + ["reserve", "refund"] * 2
    charged_nothing(r)
    assert pic_host.hits == []


def test_a_slow_picture_answer_is_pushed_like_a_chat(start: Callable[..., Any], upstream: Any,
                                                     wx: FakeWeChatAPI,
                                                     pic_host: PicUrlHost) -> None:
    _, wechat = start(reply_wait_seconds=0.3)
    requests.post(upstream.url.removesuffix("/v1") + "/_fake/config", json={"delay": 1},
                  timeout=10).raise_for_status()
    assert send_picture(wechat, wx.add_media(jpeg(80, 60)), pic_host.url("slow.jpg")) is None
    pushed = wait_for(lambda: wx.sent(OPENID))
    assert pushed[0]["text"]["content"] == ANSWER_PREFIX + BOT.vision_prompt


def test_without_the_wechat_api_a_picture_gets_a_note(start: Callable[..., Any], upstream: Any,
                                                      wx: FakeWeChatAPI,
                                                      pic_host: PicUrlHost) -> None:
    _, wechat = start(env_extra={"XIAOYI_WECHAT_APP_SECRET": ""})
    got = send_picture(wechat, wx.add_media(jpeg(8, 8)), pic_host.url("n.jpg"))
    assert got == TEXTS["picture_unavailable"]
    assert wx.calls == [] and chats(upstream) == [] and pic_host.hits == []


def test_a_picture_answer_is_screened_too(start: Callable[..., Any], upstream: Any,
                                          wx: FakeWeChatAPI, r: Any, pic_host: PicUrlHost,
                                          tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("测试模型\n", encoding="utf-8")
    _, wechat = start(safety={"enabled": True, "words_file": str(words),
                              "bot_output": "refuse"})
    got = send_picture(wechat, wx.add_media(jpeg(40, 40)), pic_host.url("s.jpg"))
    assert got == TEXTS["safety_answer_refused"]
    assert [e["kind"] for e in entries(r)] == ["topup", "reserve", "refund"]


@pytest.mark.parametrize("model", ["dall-e-2", "text-embedding-3-small", "no-such-model"])
def test_the_vision_model_must_be_a_priced_chat_model(model: str, upstream: Any, redis_url: str,
                                                      r: Any, wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx, vision_model=model)
    with pytest.raises(ConfigError, match="bot.vision_model"):
        create_app(settings, redis_client=r)


def test_shrink_turns_pictures_upright_flattens_and_takes_first_frames() -> None:
    upright = Image.new("RGB", (300, 100), (255, 0, 0))
    exif = upright.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° to show
    raw = io.BytesIO()
    upright.save(raw, "JPEG", exif=exif)
    data, mime = shrink(raw.getvalue(), 200, 1 << 20)  # too wide: re-encoded, turned upright
    with Image.open(io.BytesIO(data)) as img:
        assert (mime, img.size) == ("image/jpeg", (67, 200))
    frames = [Image.new("RGB", (20, 20), c) for c in ((0, 0, 0), (255, 255, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    assert shrink(gif.getvalue(), 2048, 1 << 20)[1] == "image/jpeg"  # animated: OpenAI refuses
    clear = io.BytesIO()
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(clear, "TIFF")
    data, mime = shrink(clear.getvalue(), 2048, 1 << 20)
    with Image.open(io.BytesIO(data)) as img:
        assert mime == "image/jpeg" and img.getpixel((5, 5)) == pytest.approx((255, 255, 255),
                                                                              abs=3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_picture_of_too_many_pixels_is_refused_before_it_is_decoded(
        start: Callable[..., Any], upstream: Any, wx: FakeWeChatAPI, r: Any,
        pic_host: PicUrlHost) -> None:
    """A 20 KB PNG of 14 000 × 12 000 pixels took the worker to 1.0 GB (1-bit) or 1.7 GB
    (palette) of memory while it was decoded and flattened, before any money was checked: a
    few such pictures at once run a small host out of memory. Past 25 million pixels (after
    a JPEG's reduced decoding) a picture is refused from its header: picture_failed, nothing
    decoded, asked or charged."""
    pixels = io.BytesIO()
    Image.new("1", (14_000, 12_000)).save(pixels, "PNG")
    assert len(pixels.getvalue()) < 64 * 1024
    with pytest.raises(Hopeless, match="too many pixels"):
        shrink(pixels.getvalue(), 2048, 2 * 1024 * 1024)
    _, wechat = start()
    media = wx.add_media(pixels.getvalue(), content_type="image/png", filename="wide.png")
    assert send_picture(wechat, media, pic_host.url("wide.png")) == TEXTS["picture_failed"]
    assert chats(upstream) == []
    charged_nothing(r)
    big = io.BytesIO()
    Image.new("RGB", (9000, 6000), (30, 120, 200)).save(big, "JPEG")  # 54 MP, drafted to 13.5
    data, mime = shrink(big.getvalue(), 2048, 2 * 1024 * 1024)
    with Image.open(io.BytesIO(data)) as shown:
        assert (mime, shown.size) == ("image/jpeg", (2048, 1365))
