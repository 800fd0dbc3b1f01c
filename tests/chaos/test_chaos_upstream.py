"""Upstream faults: timeouts, 5xx, 429, refused connections, malformed JSON, a stream cut short.

Two real channels (two fake upstream servers): a failing first channel fails over to the second
and rests; when every channel fails the developer gets a clear 502/504 and pays nothing; a cut
stream is billed for what was produced, and the client is told the stream broke.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from conftest import UPSTREAM_KEY, make_settings, new_key, wait_for
from proc_kit import free_port

from app import create_app
from app.bot import users
from app.core import pricing
from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream

CHAT = {"model": "gpt-3.5", "messages": [{"role": "user", "content": "你好 failover"}]}


@pytest.fixture(scope="module")
def backup_server() -> Iterator[FakeUpstream]:
    """The second channel's fake upstream."""
    with FakeUpstream(api_key="backup-KEY-9876543210") as fake:
        yield fake


@pytest.fixture
def backup(backup_server: FakeUpstream) -> FakeUpstream:
    """The second channel, reset."""
    backup_server.reset()
    return backup_server


def two_channel_app(r: redis.Redis, tmp_path: Path, first_url: str, second_url: str,
                    timeout_s: int = 2) -> Any:
    """An app whose channel `first` (priority 0) fails over to `second` (priority 1)."""
    config = tmp_path / "channels.toml"
    config.write_text(f"""
[relay]
timeout_seconds = {timeout_s}
answer_timeout_seconds = {timeout_s}
connect_timeout_seconds = 1
cooldown_seconds = 30

[[channels]]
name = "first"
base_url = "{first_url}"
api_key = "{UPSTREAM_KEY}"
priority = 0

[[channels]]
name = "second"
base_url = "{second_url}"
api_key = "backup-KEY-9876543210"
priority = 1
""")
    settings = make_settings(first_url, r.connection_pool.connection_kwargs and _url(r),
                             XIAOYI_CONFIG=str(config))
    application = create_app(settings, redis_client=r)
    application.config["TESTING"] = True
    return application


def _url(r: redis.Redis) -> str:
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw['db']}"


def post(client: Any, key: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    """POST with the key as a bearer token."""
    return client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


def assert_clean(r: redis.Redis) -> None:
    """No hold left open and sum(ledger) == balance for every account."""
    assert ledger.open_holds(r) == 0
    assert ledger.verify(r) == []


def chat_paths(fake: FakeUpstream) -> list[str]:
    """Return the chat requests a fake received."""
    return [q["path"] for q in fake.requests if q["path"].endswith("/chat/completions")]


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 502}, {"status": 503},
                                   {"status": 429}, {"delay": 3}])
def test_failover_to_second_channel(r: redis.Redis, tmp_path: Path, upstream: FakeUpstream,
                                    backup: FakeUpstream, fault: dict[str, Any]) -> None:
    """5xx and 429 fail over; so does a stream whose first byte does not come in time (a plain
    answer past its timeout does not: the channel may still be writing it, see below)."""
    app = two_channel_app(r, tmp_path, upstream.url, backup.url, timeout_s=1)
    client = app.test_client()
    key, acct = new_key(r)
    before = wallet.balance(r, acct)
    upstream.configure(**fault)
    stream = "delay" in fault
    resp = post(client, key, {**CHAT, "stream": stream})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in
                   _events(resp.get_data())[:-1] if e["choices"]) if stream else \
        resp.get_json()["choices"][0]["message"]["content"]
    assert "你好 failover" in text
    assert len(chat_paths(upstream)) == 1 and len(chat_paths(backup)) == 1
    assert r.exists("xy:chan:{first}:cool")  # the failing channel rests
    charged = before - wallet.balance(r, acct)
    assert charged > 0
    assert len([e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]) == 1
    # While it rests, the next request goes straight to the second channel.
    assert post(client, key, CHAT).status_code == 200
    assert len(chat_paths(upstream)) == 1 and len(chat_paths(backup)) == 2
    assert_clean(r)


def test_refused_connection_fails_over(r: redis.Redis, tmp_path: Path,
                                       backup: FakeUpstream) -> None:
    app = two_channel_app(r, tmp_path, f"http://127.0.0.1:{free_port()}/v1", backup.url)
    key, _ = new_key(r)
    resp = post(app.test_client(), key, {**CHAT, "stream": True})
    assert resp.status_code == 200 and "[DONE]" in _events(resp.get_data())
    assert len(chat_paths(backup)) == 1
    assert_clean(r)


def test_stream_fails_over_before_first_byte(r: redis.Redis, tmp_path: Path,
                                             upstream: FakeUpstream, backup: FakeUpstream) -> None:
    app = two_channel_app(r, tmp_path, upstream.url, backup.url)
    key, _ = new_key(r)
    upstream.configure(status=500)
    resp = post(app.test_client(), key, {**CHAT, "stream": True})
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    events = _events(resp.get_data())
    assert events[-1] == "[DONE]"
    assert "你好 failover" in "".join(e["choices"][0]["delta"].get("content") or ""
                                      for e in events[:-1] if e["choices"])
    assert_clean(r)


@pytest.mark.parametrize(("fault", "status", "code"), [
    ({"status": 500}, 502, "upstream_error"),
    ({"status": 429}, 502, "upstream_error"),
    ({"delay": 3}, 504, "upstream_timeout"),
])
def test_every_channel_failing_is_a_clear_error(r: redis.Redis, tmp_path: Path,
                                                upstream: FakeUpstream, backup: FakeUpstream,
                                                fault: dict[str, Any], status: int,
                                                code: str) -> None:
    """An error the upstream answered costs nothing; a request it had and did not answer in
    time costs its prompt (SPEC §7.7), and a plain one is not run again on the second channel."""
    app = two_channel_app(r, tmp_path, upstream.url, backup.url, timeout_s=1)
    key, acct = new_key(r)
    before = wallet.balance(r, acct)
    upstream.configure(**fault)
    backup.configure(**fault)
    for body in (CHAT, {**CHAT, "stream": True}):
        resp = post(app.test_client(), key, body)
        assert resp.status_code == status
        err = resp.get_json()
        assert err["error"]["code"] == code and err["code"] and err["msg"]
        assert UPSTREAM_KEY not in resp.get_data(as_text=True)
    settles = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    if status == 504:
        assert len(chat_paths(backup)) == 1  # the stream only: the plain call was not rerun
        assert len(settles) == 2 and all(int(e["ct"]) == 0 < int(e["pt"]) for e in settles)
        assert before - wallet.balance(r, acct) == sum(int(e["cost"]) for e in settles)
    else:
        assert not settles and wallet.balance(r, acct) == before  # nothing charged
    assert_clean(r)


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x [[fake:malformed]]"}]}),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x [[fake:malformed]]"}),
    ("/v1/embeddings", {"model": "text-embedding-ada-002", "input": "x [[fake:malformed]]"}),
    ("/v1/images/generations", {"model": "dall-e-2", "prompt": "x [[fake:malformed]]"}),
])
def test_malformed_json_is_a_clear_error(r: redis.Redis, tmp_path: Path, upstream: FakeUpstream,
                                         backup: FakeUpstream, path: str,
                                         body: dict[str, Any]) -> None:
    app = two_channel_app(r, tmp_path, upstream.url, backup.url)
    key, acct = new_key(r)
    before = wallet.balance(r, acct)
    resp = post(app.test_client(), key, body, path)
    assert resp.status_code == 502
    assert resp.get_json()["error"]["code"] == "upstream_error"
    assert wallet.balance(r, acct) == before
    assert_clean(r)


def test_malformed_stream_event_is_skipped(r: redis.Redis, tmp_path: Path,
                                           upstream: FakeUpstream, backup: FakeUpstream) -> None:
    app = two_channel_app(r, tmp_path, upstream.url, backup.url)
    key, _ = new_key(r)
    resp = post(app.test_client(), key, {**CHAT, "stream": True, "messages": [
        {"role": "user", "content": "hi [[fake:malformed]]"}]})
    assert resp.status_code == 200
    for line in resp.get_data().split(b"\n\n"):
        if line.startswith(b"data: {"):
            orjson.loads(line[6:])  # every forwarded event is JSON
    assert_clean(r)


def _events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def test_cut_stream_bills_only_what_was_produced(r: redis.Redis, tmp_path: Path,
                                                 upstream: FakeUpstream,
                                                 backup: FakeUpstream) -> None:
    app = two_channel_app(r, tmp_path, upstream.url, backup.url)
    client = app.test_client()
    key, acct = new_key(r)
    price = app.config["SETTINGS"].prices["gpt-3.5-turbo"]
    messages = [{"role": "user", "content": "[[fake:long=40]] [[fake:cut=5]]"}]
    before = wallet.balance(r, acct)
    events = _events(post(client, key, {**CHAT, "stream": True, "messages": messages}).get_data())
    cut_cost = before - wallet.balance(r, acct)
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    received = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert received == "word0 word1 word2 word3 word4"
    # The client learns the stream broke: an error event in both shapes, not a clean [DONE].
    assert isinstance(events[-1], dict) and events[-1]["error"]["code"] == "upstream_error"
    assert "[DONE]" not in events
    expected = pricing.token_cost(price, pricing.estimate_messages(messages),
                                  pricing.estimate_tokens(received))
    assert cut_cost == expected > 0
    # The whole answer costs more: the cut one paid only for its five words.
    before = wallet.balance(r, acct)
    post(client, key, {**CHAT, "stream": True,
                       "messages": [{"role": "user", "content": "[[fake:long=40]]"}]}).get_data()
    assert before - wallet.balance(r, acct) > cut_cost
    assert_clean(r)


def test_upstream_400_is_the_developers_error_and_free(r: redis.Redis, tmp_path: Path,
                                                      upstream: FakeUpstream,
                                                      backup: FakeUpstream) -> None:
    app = two_channel_app(r, tmp_path, upstream.url, backup.url)
    key, acct = new_key(r)
    before = wallet.balance(r, acct)
    resp = post(app.test_client(), key, {**CHAT, "messages": [
        {"role": "user", "content": "x [[fake:status=400]]"}]})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_request_error"
    assert len(chat_paths(backup)) == 0  # not retried elsewhere
    assert wallet.balance(r, acct) == before
    assert_clean(r)


@pytest.mark.chaos
@pytest.mark.parametrize("marker", ["[[fake:status=500]]", "[[fake:status=429]]",
                                    "[[fake:malformed]]", "[[fake:delay=3]]"])
def test_wechat_user_gets_a_polite_message_never_silence(r: redis.Redis, redis_url: str,
                                                         upstream: FakeUpstream,
                                                         marker: str) -> None:
    from wechat_kit import WeChat, bot, wechat_settings

    from fakes import FakeWeChatAPI

    openid = "oChaosUpstreamFault00000001"
    with FakeWeChatAPI() as wx:
        settings = wechat_settings(upstream.url, redis_url, wx, daily_free_messages=0,
                                   reply_wait_seconds=0.2, retry_seconds=[1, 1])  # pushed later
        settings = type(settings)(**{**settings.__dict__, "relay": {
            **settings.relay, "timeout_seconds": 1}})
        with bot(settings, r) as (_, url):
            wechat = WeChat(url, wx.appid)
            assert wechat.say(openid, f"{marker} 你好") is None  # answered later, by push
            sent = wait_for(lambda: wx.sent(openid), 30, "a message to the user")
    polite = settings.texts["chat_failed"]
    assert [m["text"]["content"] for m in sent] == [polite]
    acct = users.account_of(r, openid)
    assert not [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert wallet.balance(r, acct) == settings.bot.trial_credit_units  # nothing charged
    assert_clean(r)
