"""The flows that arrived with the bot's pictures, content safety, the Responses API and the admin
login limit, run for real on the Cluster.

Each writes several keys at once: a picture's answer is kept with the user's context in one
transaction (the openid's slot), screening counts its hits, a Responses turn is read with its
ancestors in one MGET (the account's slot), the admin login window is one script. A key set
spanning slots would fail here with CROSSSLOT.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

from admin_kit import BEARER, TOKEN, login
from conftest import make_settings, new_key
from engines import Cluster, Single
from PIL import Image
from wechat_kit import WeChat, bot, image_xml, wechat_settings

from app import create_app
from app.bot import jobs, screening, users
from app.core.money import layout, ledger, wallet
from fakes import FakeWeChatAPI
from fakes.upstream import ANSWER_PREFIX, FakeUpstream

OPENID = "oClusterPicture000000000001"
WORD = "测试模型"  # in every answer of the fake upstream: masked in the bot's answers


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(out, "JPEG")
    return out.getvalue()


def test_a_picture_and_a_question_are_answered_screened_and_billed(
        cluster: Cluster, store: Any, queue_redis: Single, upstream: FakeUpstream,
        wx: FakeWeChatAPI, tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text(WORD + "\n", encoding="utf-8")
    settings = dataclasses.replace(wechat_settings(
        upstream.url, cluster.url, wx, reply_wait_seconds=3.0, daily_free_messages=0,
        safety={"enabled": True, "words_file": str(words), "bot_output": "mask"}),
        queue_redis_url=queue_redis.url)
    masked = ANSWER_PREFIX.replace(WORD, "*" * len(WORD))
    with bot(settings, store) as (_, url):
        wechat = WeChat(url, wx.appid)
        picture = wechat.reply(wechat.post(image_xml(OPENID, wx.add_media(_jpeg()),
                                                     "http://127.0.0.1:1/p.jpg", "770000001")))
        assert picture is not None and picture["Content"].startswith(masked)
        assert wechat.say(OPENID, "再说一遍") == masked + "再说一遍"
    acct = users.account_of(store, OPENID)
    kinds = [e["kind"] for e in ledger.ledger_entries(store, acct)]
    assert kinds == ["topup", "reserve", "settle", "reserve", "settle"]
    kept = [store.hgetall(name) for name in store.scan_iter("xy:wx:ans:*")]
    assert len(kept) == 2 and all(WORD not in k["text"] for k in kept)
    assert jobs.answer_key(f"{OPENID}:770000001") in set(store.scan_iter("xy:wx:ans:*"))
    day = wallet.china_day()
    assert screening.hits_by_day(store, [day])[day].get("bot_output:mask", 0) >= 2
    assert ledger.verify(store) == [] and ledger.open_holds(store) == 0


def test_a_responses_turn_is_stored_in_its_accounts_slot_and_continued(
        cluster: Cluster, store: Any, queue_redis: Single, upstream: FakeUpstream) -> None:
    settings = dataclasses.replace(make_settings(upstream.url, cluster.url),
                                   queue_redis_url=queue_redis.url)
    client = create_app(settings, redis_client=store).test_client()
    key, acct = new_key(store, "10")
    auth = {"Authorization": f"Bearer {key}"}
    first = client.post("/v1/responses", headers=auth,
                        json={"model": "gpt-4o-mini", "input": "我叫小明"})
    assert first.status_code == 200, first.get_json()
    rid = first.get_json()["id"]
    (stored,) = store.scan_iter("xy:resp:*")
    assert store.keyslot(stored) == store.keyslot(layout.acct_key(acct))
    second = client.post("/v1/responses", headers=auth,
                         json={"model": "gpt-4o-mini", "input": "我叫什么？",
                               "previous_response_id": rid})
    assert second.status_code == 200, second.get_json()
    sent = upstream.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["我叫小明", "我叫什么？"]
    third = client.post("/v1/responses", headers=auth,  # reads both ancestors in one MGET
                        json={"input": "再见", "previous_response_id": second.get_json()["id"]})
    assert third.status_code == 200 and len(list(store.scan_iter("xy:resp:*"))) == 3
    assert client.get(f"/v1/responses/{rid}", headers=auth).get_json()["id"] == rid
    settled = [e for e in ledger.ledger_entries(store, acct) if e["kind"] == "settle"]
    assert len(settled) == 3 and ledger.verify(store) == [] and ledger.open_holds(store) == 0


def test_the_admin_login_window_holds_on_the_cluster(cluster: Cluster, store: Any,
                                                     queue_redis: Single,
                                                     upstream: FakeUpstream) -> None:
    settings = dataclasses.replace(make_settings(upstream.url, cluster.url),
                                   queue_redis_url=queue_redis.url)
    app = create_app(settings, redis_client=store)
    browser, twin = app.test_client(), create_app(settings, redis_client=store).test_client()
    assert login(browser).status_code == 302  # a right token: not counted
    assert [login(browser, "wrong-" + TOKEN).status_code for _ in range(10)] == [401] * 10
    assert login(browser).status_code == 429  # locked, the right token is not even checked
    assert login(twin).status_code == 429  # the window is the store's, not the process's
    assert 0 < store.pttl("xy:admin:login:127.0.0.1") <= 60_000
    assert store.get("xy:admin:cookie-key")  # the cookie key is kept in the shared store
    assert twin.get("/admin/", headers=BEARER).status_code == 200  # scripts are unaffected
