"""Content safety in the bot over real HTTP: refused or masked questions and answers, the money,
/moderations, the per-day hit counters on the admin page and /metrics, reloading the word list."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
from rq.job import Job
from wechat_kit import WeChat, bot, voice_xml, wait_for, wechat_settings

from app import create_app
from app.bot import screening, users
from app.core.config import ConfigError, load_settings
from app.core.money import ledger, wallet
from app.edges.store import get_rq_redis
from app.web.wechat import dedupe
from fakes import FakeWeChatAPI
from fakes.upstream import ANSWER_PREFIX

OPENID = "oSafetyUser00000000000000001"
TEXTS = load_settings({}).texts
ADMIN = "admin-token-for-safety-0123456789"
PREFIX_WORD = "测试模型"  # in every answer of the fake upstream (ANSWER_PREFIX), in no question


def words_file(folder: Path, *words: str) -> Path:
    path = folder / "words.txt"
    path.write_text("# listed words\n" + "".join(f"{w}\n" for w in words), encoding="utf-8")
    return path


@pytest.fixture
def start(upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI,
          tmp_path: Path) -> Iterator[Callable[..., tuple[Any, WeChat, str]]]:
    with ExitStack() as stack:
        def run(words: tuple[str, ...] = ("违禁词",), **safety: Any) -> tuple[Any, WeChat, str]:
            table = {"enabled": True, "words_file": str(words_file(tmp_path, *words)),
                     **safety}
            settings = wechat_settings(upstream.url, redis_url, wx, daily_free_messages=0,
                                       safety=table, env_extra={"XIAOYI_ADMIN_TOKEN": ADMIN},
                                       reply_wait_seconds=3.0)
            app, url = stack.enter_context(bot(settings, r))
            return app, WeChat(url, wx.appid), url
        yield run


def chats(upstream: Any) -> list[dict[str, Any]]:
    return [q["body"] for q in upstream.requests if q["path"].startswith("/v1/chat/")]


def account(r: Any) -> str:
    return users.account_of(r, OPENID)


def kinds(r: Any) -> list[str]:
    return [e["kind"] for e in ledger.ledger_entries(r, account(r))]


def today(r: Any) -> dict[str, int]:
    day = wallet.china_day()
    return screening.hits_by_day(r, [day])[day]


def test_a_listed_word_is_refused_politely_with_nothing_charged(
        start: Callable[..., Any], upstream: Any, r: Any) -> None:
    app, wechat, _ = start()
    refused = TEXTS["safety_refused"]
    assert [wechat.say(OPENID, "这里有违 禁*词吗", msg_id="990000001") for _ in range(3)] == [
        refused] * 3  # WeChat's retries get the same refusal and queue nothing either
    assert wechat.reply(wechat.post(voice_xml(OPENID, "违禁词。")))["Content"] == refused
    assert wechat.say(OPENID, "画 一个违禁词") == refused
    assert upstream.requests == []  # no upstream call of any kind
    with app.app_context():
        assert not Job.exists(dedupe.job_id(f"{OPENID}:990000001", "chat"),
                              connection=get_rq_redis())
    assert kinds(r) == ["topup"] and wallet.balance(r, account(r)) == 10_000
    assert wechat.say(OPENID, "继续") == TEXTS["nothing_parked"]  # nothing left pending
    assert today(r) == {"bot_input:refuse": 3}
    assert ANSWER_PREFIX in wechat.say(OPENID, "这句没问题")


def test_mask_mode_masks_the_question_and_charges(start: Callable[..., Any], upstream: Any,
                                                  r: Any) -> None:
    _, wechat, _ = start(bot_input="mask")
    got = wechat.say(OPENID, "请解释违禁词的意思")
    assert got == ANSWER_PREFIX + "请解释***的意思"
    assert chats(upstream)[-1]["messages"][-1] == {"role": "user", "content": "请解释***的意思"}
    assert kinds(r) == ["topup", "reserve", "settle"]
    assert 0 < 10_000 - wallet.balance(r, account(r))
    assert today(r) == {"bot_input:mask": 1}


def test_retries_of_a_masked_question_count_one_hit(start: Callable[..., Any],
                                                    upstream: Any, r: Any) -> None:
    """Review: every WeChat retry that arrived while the question's job ran screened its text
    again and counted another hit: one masked question showed up to 4 on the admin page and
    /metrics. A retry joins the job it finds, unscreened."""
    _, wechat, _ = start(bot_input="mask")
    question = "[[fake:delay=1.5]]请解释违禁词的意思"
    first = threading.Thread(target=wechat.say, args=(OPENID, question, "990000031"))
    first.start()
    time.sleep(0.8)  # the job is queued or running (its answer takes 1.5 s)
    for _ in range(2):
        assert wechat.say(OPENID, question, msg_id="990000031") == ANSWER_PREFIX + \
            "请解释***的意思"
    first.join()
    assert len(chats(upstream)) == 1
    assert today(r) == {"bot_input:mask": 1}


def test_an_answer_with_a_listed_word_is_masked_and_charged(start: Callable[..., Any],
                                                            upstream: Any, r: Any) -> None:
    _, wechat, _ = start(words=(PREFIX_WORD,))  # defaults: bot_input refuse, bot_output mask
    masked = ANSWER_PREFIX.replace(PREFIX_WORD, "****") + "你好"
    assert wechat.say(OPENID, "你好") == masked
    (settle,) = [e for e in ledger.ledger_entries(r, account(r)) if e["kind"] == "settle"]
    assert int(settle["cost"]) > 0
    assert wallet.balance(r, account(r)) == 10_000 - int(settle["cost"])
    wechat.say(OPENID, "再说一遍")
    assert {"role": "assistant", "content": masked} in chats(upstream)[-1]["messages"]
    assert today(r) == {"bot_output:mask": 2}


def test_a_refused_answer_costs_nothing_and_stays_out_of_the_context(
        start: Callable[..., Any], upstream: Any, r: Any) -> None:
    _, wechat, _ = start(words=(PREFIX_WORD,), bot_output="refuse")
    assert wechat.say(OPENID, "你好") == TEXTS["safety_answer_refused"]
    assert len(chats(upstream)) == 1
    assert kinds(r) == ["topup", "reserve", "refund"]
    assert wallet.balance(r, account(r)) == 10_000 and ledger.verify(r) == []
    wechat.say(OPENID, "第二个问题")
    assert [m["role"] for m in chats(upstream)[-1]["messages"]] == ["system", "user"]
    assert today(r) == {"bot_output:refuse": 2}


def test_a_refused_free_answer_gives_the_free_chat_back(upstream: Any, redis_url: str, r: Any,
                                                        wx: FakeWeChatAPI,
                                                        tmp_path: Path) -> None:
    table = {"enabled": True, "words_file": str(words_file(tmp_path, PREFIX_WORD)),
             "bot_output": "refuse"}
    settings = wechat_settings(upstream.url, redis_url, wx, daily_free_messages=2, safety=table)
    with bot(settings, r) as (_, url):
        wechat = WeChat(url, wx.appid)
        assert wechat.say(OPENID, "你好") == TEXTS["safety_answer_refused"]
        assert wechat.say(OPENID, "余额").endswith("今日免费对话剩余：2 条")
    assert kinds(r) == ["topup"]


def test_a_moderation_flag_refuses_before_any_charge(start: Callable[..., Any], upstream: Any,
                                                     r: Any) -> None:
    _, wechat, _ = start(moderation=True)
    assert wechat.say(OPENID, "[[fake:flag=violence]]你好") == TEXTS["safety_refused"]
    assert [q["path"] for q in upstream.requests] == ["/v1/moderations"]
    assert upstream.requests[0]["body"] == {"model": "omni-moderation-latest",
                                            "input": "[[fake:flag=violence]]你好"}
    assert kinds(r) == ["topup"]
    assert ANSWER_PREFIX + "没问题" == wechat.say(OPENID, "没问题")
    assert [q["path"] for q in upstream.requests][1:] == ["/v1/moderations",
                                                         "/v1/chat/completions"]
    assert wechat.say(OPENID, "[[fake:status=400]]审核接口坏了") == TEXTS["chat_failed"]
    assert len(chats(upstream)) == 1 and kinds(r) == ["topup", "reserve", "settle"]
    assert today(r) == {"bot_moderation:refuse": 1}


def test_the_admin_page_and_metrics_show_the_days_hits(start: Callable[..., Any],
                                                       r: Any) -> None:
    _, wechat, url = start(words=("违禁词", PREFIX_WORD))
    wechat.say(OPENID, "违禁词")
    wechat.say(OPENID, "违禁词！")
    wechat.say(OPENID, "你好")  # its answer is masked
    auth = {"Authorization": f"Bearer {ADMIN}"}
    page = requests.get(f"{url}/admin/safety", headers=auth, timeout=10)
    assert page.status_code == 200
    html = page.text
    day = wallet.china_day()
    row = next(line for line in html.splitlines() if f"{day[:4]}-{day[4:6]}-{day[6:]}" in line)
    assert re.findall(r'class="num">(\d+)<', row) == ["2", "1", "3"]
    assert "用户消息 · 拒绝" in html and "模型回答 · 打码" in html and "UTC+8" in html
    assert html.count("<svg") == 1
    metrics = requests.get(f"{url}/metrics", headers=auth, timeout=10).text
    assert 'xiaoyi_safety_hits_today{action="refuse",where="bot_input"} 2.0' in metrics
    assert 'xiaoyi_safety_hits_today{action="mask",where="bot_output"} 1.0' in metrics
    assert 'xiaoyi_safety_hits_total{action="refuse",where="bot_input"}' in metrics


def test_the_word_list_reloads_without_restart(start: Callable[..., Any], tmp_path: Path) -> None:
    _, wechat, _ = start(reload_seconds=0)
    assert wechat.say(OPENID, "新加的词") == ANSWER_PREFIX + "新加的词"
    fresh = tmp_path / "words.next"
    fresh.write_text("违禁词\n新加的词\n", encoding="utf-8")
    os.replace(fresh, tmp_path / "words.txt")  # the way to replace a word file: atomically
    # A change is loaded once the file stayed the same for one period: within two checks here
    # (the webhook's check of the question, the job's check of the answer, the next question).
    answers = [wechat.say(OPENID, "新加的词") for _ in range(3)]
    assert answers[-1] == TEXTS["safety_refused"]
    assert answers[0] in (ANSWER_PREFIX + "新加的词", ANSWER_PREFIX + "****",
                          TEXTS["safety_refused"])


def test_a_bad_word_file_stops_the_start(upstream: Any, redis_url: str, r: Any,
                                         wx: FakeWeChatAPI, tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_bytes(b"\xff\xfe not utf-8 \xc3")
    table = {"enabled": True, "words_file": str(path)}
    settings = wechat_settings(upstream.url, redis_url, wx, safety=table)
    with pytest.raises(ConfigError, match="safety.words_file"):
        create_app(settings, redis_client=r)


def test_a_moderation_flag_refuses_a_drawing_prompt_before_any_charge(
        start: Callable[..., Any], upstream: Any, r: Any, wx: FakeWeChatAPI) -> None:
    """画 prompts are bot input too: with moderation on, a flagged one draws nothing."""
    _, wechat, _ = start(moderation=True)
    assert wechat.say(OPENID, "画 [[fake:flag=violence]]一只猫") == TEXTS["image_started"]
    sent = wait_for(lambda: wx.sent(OPENID))
    assert [m["text"]["content"] for m in sent] == [TEXTS["safety_refused"]]
    assert [q["path"] for q in upstream.requests] == ["/v1/moderations"]
    assert upstream.requests[0]["body"]["input"] == "[[fake:flag=violence]]一只猫"
    assert kinds(r) == ["topup"] and today(r) == {"bot_moderation:refuse": 1}
    assert wechat.say(OPENID, "画 一只猫") == TEXTS["image_started"]
    wait_for(lambda: len(wx.sent(OPENID)) == 2)
    assert [q["path"] for q in upstream.requests][1:] == ["/v1/moderations",
                                                         "/v1/images/generations"]
    assert kinds(r) == ["topup", "reserve", "settle"]
