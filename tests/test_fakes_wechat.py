"""Drive the WeChat fakes with real wechatpy clients; pin wechatpy behaviour xiaoyi relies on."""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import fakeredis
import pytest
import requests
from PIL import Image
from wechatpy import WeChatClient, parse_message
from wechatpy.exceptions import InvalidSignatureException, WeChatClientException, WeChatPayException
from wechatpy.pay import WeChatPay
from wechatpy.pay.utils import calculate_signature, calculate_signature_hmac
from wechatpy.session.redisstorage import RedisStorage

from fakes import FakeWeChatAPI, FakeWeChatPay, make_notify, parse_multipart, sign

OPENID = "oUser000000000000000000001"
NOTIFY_URL = "https://xiaoyi.example/wechat/pay/notify"


class LocalWeChatClient(WeChatClient):
    """WeChatClient whose API calls and token fetches go to `API_BASE_URL`."""

    def fetch_access_token(self) -> dict[str, Any]:
        """Fetch the token from API_BASE_URL (wechatpy hard-codes api.weixin.qq.com)."""
        return self._fetch_access_token(
            url=self.API_BASE_URL + "token",
            params={"grant_type": "client_credential", "appid": self.appid, "secret": self.secret},
        )


def make_client(
    fake: FakeWeChatAPI, redis: fakeredis.FakeRedis, **kwargs: Any
) -> LocalWeChatClient:
    """Build a client for the fake, sharing its token through Redis."""
    client = LocalWeChatClient(
        fake.appid, kwargs.pop("secret", fake.secret),
        session=RedisStorage(redis, prefix="xiaoyi:wechat"), **kwargs,
    )
    client.API_BASE_URL = fake.url
    return client


def png_bytes(size: int = 4) -> bytes:
    """Return a small valid PNG."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def fake(wx: FakeWeChatAPI) -> FakeWeChatAPI:
    """The shared fake WeChat API (conftest's `wx`), reset for this test."""
    return wx


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def client(fake: FakeWeChatAPI, redis: fakeredis.FakeRedis) -> LocalWeChatClient:
    return make_client(fake, redis, timeout=5)


# ---- token -------------------------------------------------------------------------------


def test_token_is_fetched_once_and_shared_through_redis(
    fake: FakeWeChatAPI, redis: fakeredis.FakeRedis, client: LocalWeChatClient
) -> None:
    assert fake.url.endswith("/cgi-bin/")
    assert client.access_token == "TOKEN-1"
    assert client.access_token == "TOKEN-1"
    key = f"xiaoyi:wechat:{fake.appid}_access_token"
    assert redis.get(key) == b'"TOKEN-1"'  # JSON-encoded by RedisStorage
    assert 7190 <= redis.ttl(key) <= 7200
    # A second process (expires_at unknown) trusts the stored token without fetching.
    other = make_client(fake, redis)
    assert other.access_token == "TOKEN-1"
    assert fake.token_fetches == 1
    (call,) = fake.calls_to("token")
    assert call["query"] == {
        "grant_type": "client_credential", "appid": fake.appid, "secret": fake.secret,
    }


def test_wrong_secret_gets_40125(fake: FakeWeChatAPI, redis: fakeredis.FakeRedis) -> None:
    client = make_client(fake, redis, secret="not-the-secret")
    with pytest.raises(WeChatClientException) as info:
        client.fetch_access_token()
    assert info.value.errcode == 40125
    assert fake.token_fetches == 0


# ---- messages ----------------------------------------------------------------------------


def test_send_text_is_recorded_with_current_token(
    fake: FakeWeChatAPI, client: LocalWeChatClient
) -> None:
    assert client.message.send_text(OPENID, "你好，小一") == {"errcode": 0, "errmsg": "ok"}
    (call,) = fake.calls_to("message/custom/send")
    assert call["query"]["access_token"] == fake.token == "TOKEN-1"
    assert call["body"] == {"touser": OPENID, "msgtype": "text", "text": {"content": "你好，小一"}}
    assert fake.sent(OPENID) == [call["body"]]
    assert fake.sent("someone-else") == []


def test_text_over_2048_bytes_is_refused(fake: FakeWeChatAPI, client: LocalWeChatClient) -> None:
    client.message.send_text(OPENID, "字" * 682)  # 2046 bytes
    with pytest.raises(WeChatClientException) as info:
        client.message.send_text(OPENID, "字" * 683)  # 2049 bytes
    assert info.value.errcode == 45002
    assert len(fake.sent()) == 1


def test_typing_goes_through_generic_post(fake: FakeWeChatAPI, client: LocalWeChatClient) -> None:
    # wechatpy 1.8.18 has no typing helper; client.post() adds the token and JSON-encodes.
    result = client.post("message/custom/typing", data={"touser": OPENID, "command": "Typing"})
    assert result["errcode"] == 0
    assert fake.calls_to("message/custom/typing")[0]["body"]["command"] == "Typing"
    with pytest.raises(WeChatClientException) as info:
        client.post("message/custom/typing", data={"touser": OPENID, "command": "Dance"})
    assert info.value.errcode == 47001


def test_set_error_counts_down_and_clears(fake: FakeWeChatAPI, client: LocalWeChatClient) -> None:
    fake.set_error("message/custom/send", 45015, times=2)
    for _ in range(2):
        with pytest.raises(WeChatClientException) as info:
            client.message.send_text(OPENID, "hi")
        assert info.value.errcode == 45015
    client.message.send_text(OPENID, "hi")
    fake.set_error("/cgi-bin/message/custom/send", 48001)
    for _ in range(3):
        with pytest.raises(WeChatClientException):
            client.message.send_text(OPENID, "hi")
    fake.clear_errors()
    client.message.send_text(OPENID, "hi")
    codes = [c["errcode"] for c in fake.calls_to("custom/send")]
    assert codes == [45015, 45015, 0, 48001, 48001, 48001, 0]
    assert len(fake.sent()) == 2


def test_unknown_endpoint_and_wrong_method(fake: FakeWeChatAPI, client: LocalWeChatClient) -> None:
    with pytest.raises(WeChatClientException) as info:
        client.get("no/such/api")
    assert info.value.errcode == 40066
    with pytest.raises(WeChatClientException) as info:
        client.get("message/custom/send")
    assert info.value.errcode == 43002
    raw = requests.post(fake.url + "message/custom/send", json={"touser": OPENID}, timeout=5)
    assert raw.status_code == 200 and raw.json()["errcode"] == 41001


def test_concurrent_senders_share_one_token(
    fake: FakeWeChatAPI, redis: fakeredis.FakeRedis
) -> None:
    make_client(fake, redis).fetch_access_token()

    def send_five(worker: int) -> None:
        client = make_client(fake, redis, timeout=5)
        for n in range(5):
            client.message.send_text(f"{OPENID}-{worker}", f"msg {n}")

    threads = [threading.Thread(target=send_five, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(fake.sent()) == 40 and fake.token_fetches == 1
    contents = [m["text"]["content"] for m in fake.sent(f"{OPENID}-3")]
    assert contents == [f"msg {n}" for n in range(5)]


def test_timeout_surfaces_as_raw_requests_error(
    fake: FakeWeChatAPI, redis: fakeredis.FakeRedis
) -> None:
    client = make_client(fake, redis, timeout=0.2)
    client.fetch_access_token()
    fake.set_delay("message/custom/send", 1.0)
    # wechatpy wraps only HTTP status errors: a timeout is requests' own exception.
    with pytest.raises(requests.exceptions.ReadTimeout):
        client.message.send_text(OPENID, "slow")
    fake.set_delay("message/custom/send", None)
    assert client.message.send_text(OPENID, "fast")["errcode"] == 0


# ---- token expiry and wechatpy's auto retry ------------------------------------------------


def test_expired_token_is_refreshed_and_retried(
    fake: FakeWeChatAPI, client: LocalWeChatClient
) -> None:
    client.message.send_text(OPENID, "one")
    fake.expire_token()
    client.message.send_text(OPENID, "two")
    assert [(c["endpoint"], c["errcode"]) for c in fake.calls] == [
        ("token", 0),
        ("message/custom/send", 0),
        ("message/custom/send", 40001),
        ("token", 0),
        ("message/custom/send", 0),
    ]
    assert fake.calls[-1]["query"]["access_token"] == "TOKEN-2"
    assert [m["text"]["content"] for m in fake.sent()] == ["one", "two"]


def test_auto_retry_has_no_limit(fake: FakeWeChatAPI, client: LocalWeChatClient) -> None:
    # Each 40001 costs a token fetch and another try, with no cap (persisting 40001 recurses
    # until RecursionError, after ~500 fetches).
    client.fetch_access_token()
    fake.set_error("message/custom/send", 40001, times=4)
    client.message.send_text(OPENID, "eventually")
    assert fake.token_fetches == 5
    assert len(fake.calls_to("message/custom/send")) == 5


def test_auto_retry_off_raises_40001(fake: FakeWeChatAPI, redis: fakeredis.FakeRedis) -> None:
    client = make_client(fake, redis, auto_retry=False)
    client.message.send_text(OPENID, "one")
    fake.expire_token(errcode=42001)
    with pytest.raises(WeChatClientException) as info:
        client.message.send_text(OPENID, "two")
    assert info.value.errcode == 42001
    assert fake.token_fetches == 1


def test_new_token_invalidates_previous_one(
    fake: FakeWeChatAPI, redis: fakeredis.FakeRedis, client: LocalWeChatClient
) -> None:
    client.fetch_access_token()
    stale = fake.token
    make_client(fake, fakeredis.FakeRedis(), auto_retry=False).fetch_access_token()
    raw = requests.post(
        fake.url + "message/custom/send", params={"access_token": stale},
        json={"touser": OPENID, "msgtype": "text", "text": {"content": "x"}}, timeout=5,
    )
    assert raw.json()["errcode"] == 40001


# ---- media -------------------------------------------------------------------------------


def test_media_upload_png_then_send_image(fake: FakeWeChatAPI, client: LocalWeChatClient) -> None:
    png = png_bytes()
    result = client.media.upload("image", ("draw.png", png, "image/png"))
    assert result["type"] == "image" and result["media_id"] == "MEDIA-1"
    assert isinstance(result["created_at"], int)
    (call,) = fake.calls_to("media/upload")
    assert call["query"]["type"] == "image"
    info = call["body"]["media"]
    assert info["filename"] == "draw.png" and info["content_type"] == "image/png"
    assert info["size"] == len(png) and info["is_png"] and not info["is_jpeg"]
    assert fake.uploads[0]["data"] == png
    client.message.send_image(OPENID, result["media_id"])
    assert fake.sent(OPENID)[-1] == {
        "touser": OPENID, "msgtype": "image", "image": {"media_id": "MEDIA-1"},
    }
    with pytest.raises(WeChatClientException) as err:
        client.message.send_image(OPENID, "MEDIA-404")
    assert err.value.errcode == 40007


def test_media_upload_jpeg_and_refusals(fake: FakeWeChatAPI, client: LocalWeChatClient) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, "JPEG")
    client.media.upload("image", ("photo.jpg", buf.getvalue(), "image/jpeg"))
    assert fake.calls_to("media/upload")[-1]["body"]["media"]["is_jpeg"]
    cases = [
        (("big.png", png_bytes()[:8] + os.urandom(2 * 1024 * 1024), "image/png"), 40009),
        (("fake.png", b"GIF? no, text", "image/png"), 40005),
        (png_bytes(), 40005),  # bare bytes: requests names the file "media", no extension
        (("empty.png", b"", "image/png"), 41005),
    ]
    for media, errcode in cases:
        with pytest.raises(WeChatClientException) as info:
            client.media.upload("image", media)
        assert info.value.errcode == errcode
    with pytest.raises(WeChatClientException) as info:
        client.media.upload("sticker", ("a.png", png_bytes(), "image/png"))
    assert info.value.errcode == 40004
    assert len(fake.uploads) == 1


def test_upload_retry_after_40001_resends_bytes_but_not_a_file_object(
    fake: FakeWeChatAPI, client: LocalWeChatClient
) -> None:
    png = png_bytes()
    client.fetch_access_token()
    fake.expire_token()
    assert client.media.upload("image", ("a.png", png, "image/png"))["media_id"] == "MEDIA-1"
    handle = io.BytesIO(png)
    handle.name = "b.png"
    fake.expire_token()
    # The retry re-reads the already-consumed file object and uploads zero bytes.
    with pytest.raises(WeChatClientException) as info:
        client.media.upload("image", handle)
    assert info.value.errcode == 41005
    sizes = [(c["errcode"], c["body"]["media"]["size"]) for c in fake.calls_to("media/upload")]
    assert sizes == [(40001, len(png)), (0, len(png)), (40001, len(png)), (41005, 0)]


def test_media_download_of_user_media(fake: FakeWeChatAPI, client: LocalWeChatClient) -> None:
    media_id = fake.add_media(b"\xff\xd8\xff\xe0jpeg-bytes")
    res = client.media.download(media_id)
    assert res.content == b"\xff\xd8\xff\xe0jpeg-bytes"
    assert res.headers["Content-Type"] == "image/jpeg"
    assert fake.uploads == []
    with pytest.raises(WeChatClientException) as info:
        client.media.download("MEDIA-404")
    assert info.value.errcode == 40007


def test_parse_multipart_keeps_binary_exactly() -> None:
    payload = b"\r\n--x\r\n\r\n" + bytes(range(256)) * 64 + b"\r\n"
    body, content_type = requests.models.RequestEncodingMixin._encode_files(
        {"media": ("图.png", payload, "image/png")}, {"note": "hi"}
    )
    fields = parse_multipart(content_type, body)
    assert fields is not None
    assert fields["media"]["data"] == payload and fields["media"]["filename"] == "图.png"
    assert fields["note"]["data"] == b"hi" and fields["note"]["filename"] is None
    assert parse_multipart(content_type, body[:-10]) is None
    assert parse_multipart("application/json", body) is None


# ---- menu --------------------------------------------------------------------------------

MENU = {
    "button": [
        {"type": "click", "name": "API 密钥", "key": "CHAT_API"},
        {"name": "我的", "sub_button": [{"type": "click", "name": "余额", "key": "BALANCE"}]},
    ]
}


def test_menu_create_and_get(fake: FakeWeChatAPI, client: LocalWeChatClient) -> None:
    assert client.menu.get() is None  # wechatpy turns 46003 into None
    assert fake.calls[-1]["errcode"] == 46003
    assert client.menu.create(MENU)["errcode"] == 0
    assert fake.calls_to("menu/create")[0]["body"] == MENU
    got = client.menu.get()
    assert got["menu"]["button"][0] == {**MENU["button"][0], "sub_button": []}
    assert got["menu"]["button"][1]["sub_button"] == MENU["button"][1]["sub_button"]
    assert fake.menu == MENU
    bad = {"button": [{"type": "click", "name": "x" * 17, "key": "K"}]}
    with pytest.raises(WeChatClientException) as info:
        client.menu.create(bad)
    assert info.value.errcode == 40018
    with pytest.raises(WeChatClientException) as info:
        client.menu.create({"button": MENU["button"] * 2})
    assert info.value.errcode == 40016
    client.menu.delete()
    assert client.menu.get() is None


def test_reset_forgets_everything(fake: FakeWeChatAPI, client: LocalWeChatClient) -> None:
    client.menu.create(MENU)
    fake.set_error("menu/get", -1)
    fake.reset()
    assert fake.calls == [] and fake.menu is None and fake.token is None
    assert make_client(fake, fakeredis.FakeRedis()).menu.get() is None
    assert fake.token == "TOKEN-1"


# ---- WeChat Pay --------------------------------------------------------------------------


def make_pay(fake_pay: FakeWeChatPay, api_key: str | None = None) -> WeChatPay:
    """Build a WeChatPay pointed at the fake."""
    pay = WeChatPay(fake_pay.appid, api_key or fake_pay.api_key, fake_pay.mch_id, timeout=5)
    pay.API_BASE_URL = fake_pay.url
    return pay


def create_native(pay: WeChatPay, out_trade_no: str = "XY202401010001", **kwargs: Any) -> dict:
    """Place a NATIVE unified order for 10 yuan."""
    params: dict[str, Any] = {
        "trade_type": "NATIVE", "body": "小一充值 10 元", "total_fee": 1000,
        "notify_url": NOTIFY_URL, "client_ip": "127.0.0.1", "product_id": "topup-1000",
        "out_trade_no": out_trade_no,
    }
    params.update(kwargs)
    return pay.order.create(**params)


def test_unified_order_native(fake_pay: FakeWeChatPay) -> None:
    pay = make_pay(fake_pay)
    result = create_native(pay)
    assert result["return_code"] == result["result_code"] == "SUCCESS"
    assert result["code_url"] == "weixin://wxpay/bizpayurl?pr=1"
    assert result["prepay_id"].startswith("wx")
    unsigned = {k: v for k, v in result.items() if k != "sign"}
    assert result["sign"] == calculate_signature(unsigned, fake_pay.api_key)
    order = fake_pay.order("XY202401010001")
    assert order is not None
    assert order["total_fee"] == 1000 and order["body"] == "小一充值 10 元"
    assert order["notify_url"] == NOTIFY_URL and order["trade_state"] == "NOTPAY"
    # Repeating the same order returns the same code; changing the amount is refused.
    assert create_native(pay)["code_url"] == result["code_url"]
    with pytest.raises(WeChatPayException) as info:
        create_native(pay, total_fee=1)
    assert info.value.errcode == "INVALID_REQUEST"
    assert len(fake_pay.orders) == 1


def test_unified_order_hmac_sha256(fake_pay: FakeWeChatPay) -> None:
    result = create_native(make_pay(fake_pay), sign_type="HMAC-SHA256")
    unsigned = {k: v for k, v in result.items() if k != "sign"}
    assert result["sign"] == calculate_signature_hmac(unsigned, fake_pay.api_key)


def test_unified_order_refusals(fake_pay: FakeWeChatPay) -> None:
    with pytest.raises(WeChatPayException) as info:
        create_native(make_pay(fake_pay, api_key="wrong" * 6 + "xx"))
    assert info.value.return_code == "FAIL" and info.value.return_msg == "签名错误"
    pay = make_pay(fake_pay)
    with pytest.raises(WeChatPayException) as info:
        create_native(pay, product_id=None)
    assert info.value.result_code == "FAIL" and info.value.errcode == "PARAM_ERROR"
    fake_pay.set_error("pay/unifiedorder", "SYSTEMERROR", "系统超时", times=1)
    with pytest.raises(WeChatPayException) as info:
        create_native(pay)
    assert info.value.errcode == "SYSTEMERROR"
    assert create_native(pay)["result_code"] == "SUCCESS"
    assert [c["return_code"] for c in fake_pay.calls] == ["FAIL", "SUCCESS", "SUCCESS", "SUCCESS"]
    assert [c["result_code"] for c in fake_pay.calls] == [None, "FAIL", "FAIL", "SUCCESS"]


def test_notification_parses_and_bad_sign_raises(fake_pay: FakeWeChatPay) -> None:
    pay = make_pay(fake_pay)
    create_native(pay, attach="acct-42")
    order = fake_pay.order("XY202401010001")
    assert order is not None
    xml = make_notify(order, fake_pay.api_key)
    data = pay.parse_payment_result(xml)
    assert data["out_trade_no"] == "XY202401010001" and data["total_fee"] == 1000
    assert data["appid"] == fake_pay.appid and data["mch_id"] == fake_pay.mch_id
    assert data["attach"] == "acct-42" and data["result_code"] == "SUCCESS"
    assert len(data["transaction_id"]) == 28 and data["transaction_id"].isdigit()
    # A resent notification carries the same transaction_id (dedupe on it).
    again = pay.parse_payment_result(make_notify(order, fake_pay.api_key))
    assert again["transaction_id"] == data["transaction_id"]
    assert again["nonce_str"] != data["nonce_str"]
    # A validly signed notification may still disagree with the order's amount.
    short = make_notify(order, fake_pay.api_key, total_fee=1)
    assert pay.parse_payment_result(short)["total_fee"] == 1
    with pytest.raises(InvalidSignatureException):
        pay.parse_payment_result(make_notify(order, fake_pay.api_key, bad_sign=True))
    with pytest.raises(InvalidSignatureException):
        make_pay(fake_pay, api_key="other" * 6 + "xx").parse_payment_result(xml)


def test_order_query_follows_payment(fake_pay: FakeWeChatPay) -> None:
    pay = make_pay(fake_pay)
    create_native(pay)
    assert pay.order.query(out_trade_no="XY202401010001")["trade_state"] == "NOTPAY"
    xml = fake_pay.notify_for("XY202401010001")
    paid = pay.order.query(out_trade_no="XY202401010001")
    assert paid["trade_state"] == "SUCCESS"
    assert paid["transaction_id"] == pay.parse_payment_result(xml)["transaction_id"]
    with pytest.raises(WeChatPayException) as info:
        create_native(pay)
    assert info.value.errcode == "ORDERPAID"
    with pytest.raises(WeChatPayException) as info:
        pay.order.query(out_trade_no="nope")
    assert info.value.errcode == "ORDERNOTEXIST"


def test_sign_matches_wechatpy() -> None:
    params = {"appid": "wx1", "body": "小一", "total_fee": 1, "empty": "", "none": None}
    assert sign(params, "k" * 32) == calculate_signature(params, "k" * 32)
    assert sign(params, "k" * 32, "HMAC-SHA256") == calculate_signature_hmac(params, "k" * 32)


# ---- wechatpy's XML parsing refuses entities (xmltodict disable_entities=True) -------------

ENTITY_PAYLOADS = {
    "internal": (
        '<!DOCTYPE x [<!ENTITY a "AAA">]><xml><MsgType>text</MsgType><Content>&a;</Content></xml>'
    ),
    "billion_laughs": (
        '<!DOCTYPE x [<!ENTITY l "lol"><!ENTITY l2 "&l;&l;&l;&l;&l;&l;&l;&l;&l;&l;">'
        '<!ENTITY l3 "&l2;&l2;&l2;&l2;&l2;&l2;&l2;&l2;&l2;&l2;">]>'
        "<xml><MsgType>text</MsgType><Content>&l3;</Content></xml>"
    ),
    "xxe_file": (
        '<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        "<xml><MsgType>text</MsgType><Content>&e;</Content></xml>"
    ),
    "parameter_entity": (
        '<!DOCTYPE x [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]>'
        "<xml><MsgType>text</MsgType><Content>hi</Content></xml>"
    ),
}


@pytest.mark.parametrize("name", sorted(ENTITY_PAYLOADS))
def test_parse_message_refuses_entity_declarations(name: str) -> None:
    with pytest.raises(ValueError, match="entities are disabled"):
        parse_message(ENTITY_PAYLOADS[name])


def test_payment_result_entity_error_is_not_invalid_signature(fake_pay: FakeWeChatPay) -> None:
    # parse_payment_result only maps ExpatError to InvalidSignatureException.
    with pytest.raises(ValueError, match="entities are disabled"):
        make_pay(fake_pay).parse_payment_result(ENTITY_PAYLOADS["billion_laughs"])
