"""GET /v1/usage over real HTTP: exactly the ledger's settled requests of the asking key."""

from __future__ import annotations

import time
from datetime import date, datetime
from typing import Any

import redis
import requests
from conftest import LiveServer, new_key
from wechat_kit import wait_for

from app.core.config import units_to_yuan
from app.core.money import keys, ledger, wallet

CHAT = {"messages": [{"role": "user", "content": "你好"}]}


def _post(live: LiveServer, key: str, path: str, body: dict[str, Any],
          stream: bool = False) -> requests.Response:
    resp = requests.post(live.url + "/v1" + path, json=body, stream=stream, timeout=20,
                         headers={"Authorization": f"Bearer {key}"})
    if stream:
        resp.content  # noqa: B018 - read the stream to its end, as a client would
    return resp


def _traffic(live: LiveServer, key: str, tag: str) -> tuple[set[str], int]:
    """Make a mix of requests with one key; return (ids of the served ones, failures)."""
    served = [
        _post(live, key, "/chat/completions", {"messages": [{"role": "user", "content": tag}]}),
        _post(live, key, "/chat/completions", {**CHAT, "stream": True,
                                               "stream_options": {"include_usage": True}},
              stream=True),
        _post(live, key, "/completions", {"prompt": f"once upon {tag}"}),
        _post(live, key, "/embeddings", {"input": ["一", "two", tag]}),
        _post(live, key, "/images/generations", {"prompt": f"a cat {tag}", "size": "256x256"}),
    ]
    failed = [
        _post(live, key, "/chat/completions",
              {"messages": [{"role": "user", "content": "[[fake:status=500]]"}]}),
        _post(live, key, "/embeddings", {"input": "[[fake:status=503]]"}),
    ]
    assert [r.status_code for r in served] == [200] * 5
    assert all(r.status_code >= 500 for r in failed)
    return {r.headers["X-Request-Id"] for r in served}, len(failed)


def _listing(live: LiveServer, key: str, **params: Any) -> list[dict[str, Any]]:
    """Follow `next` through every page; return the rows in order."""
    rows: list[dict[str, Any]] = []
    after = None
    for _ in range(100):
        query = {**params, **({"after": after} if after else {})}
        resp = requests.get(live.url + "/v1/usage", params=query, timeout=10,
                            headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert page["object"] == "list" and page["code"] == 0 and page["msg"] == ""
        assert len(page["data"]) <= int(params.get("limit", 20))
        rows += page["data"]
        assert page["has_more"] == (page["next"] is not None)
        if not page["has_more"]:
            return rows
        after = page["next"]
    raise AssertionError("the listing never ended")


def _expected(r: redis.Redis, acct: str, key_id: str) -> list[dict[str, Any]]:
    """The ledger's settled requests of one key, newest first, as /v1/usage should show them."""
    entries = [e for e in ledger.ledger_entries(r, acct)
               if e["kind"] == "settle" and e["key"] == key_id]
    return [{"id": e["id"], "request_id": e["req"], "model": e["model"],
             "prompt_tokens": int(e["pt"]), "completion_tokens": int(e["ct"]),
             "cost": units_to_yuan(int(e["cost"])), "created": int(e["ts"]) // 1000}
            for e in reversed(entries)]


def _shown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fields = ("id", "request_id", "model", "prompt_tokens", "completion_tokens", "cost",
              "created")
    return [{f: row[f] for f in fields} for row in rows]


def test_each_key_lists_exactly_its_settled_ledger_entries(live: LiveServer,
                                                           r: redis.Redis) -> None:
    first, acct = new_key(r)
    second, info = keys.create_key(r, acct, "second")
    mine, failures = _traffic(live, first, "one")
    theirs, _ = _traffic(live, second, "two")
    more, _ = _traffic(live, first, "three")
    wait_for(lambda: ledger.open_holds(r) == 0 and not r.zcard(f"xy:{{{acct}}}:holds"))
    first_id = keys.lookup(r, first).id  # type: ignore[union-attr]

    for key, key_id, served in ((first, first_id, mine | more), (second, info.id, theirs)):
        rows = _listing(live, key, limit=3)
        assert _shown(rows) == _expected(r, acct, key_id)
        assert {row["request_id"] for row in rows} == served  # every served request, once
        assert len(rows) == 10 if key == first else len(rows) == 5
        for row in rows:
            assert row["object"] == "usage.request"
            assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
            assert row["time"].endswith("+08:00")
            assert datetime.fromisoformat(row["time"]).timestamp() == row["created"]
    refunds = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "refund"]
    assert len(refunds) == 3 * failures  # the failed requests were released: cost 0, not listed
    listed = {row["request_id"] for key in (first, second) for row in _listing(live, key)}
    assert not listed & {e["req"] for e in refunds}
    assert sum(int(e["cost"]) for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle") \
        == wallet.get_account(r, acct)["used"]  # type: ignore[index]
    assert ledger.verify(r) == []


def _get(live: LiveServer, key: str | None, path: str = "/v1/usage",
         **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(live.url + path, headers=headers, timeout=10, **kwargs)


def _chats(live: LiveServer, key: str, n: int) -> None:
    for i in range(n):
        assert _post(live, key, "/chat/completions",
                     {"messages": [{"role": "user", "content": f"问题 {i}"}]}).status_code == 200


def test_the_window_takes_unix_seconds_and_china_dates(live: LiveServer, r: redis.Redis) -> None:
    key, acct = new_key(r)
    _chats(live, key, 3)
    everything = _listing(live, key)
    assert len(everything) == 3
    middle = everything[1]["created"]
    exact = _listing(live, key, start=middle, end=middle + 1)  # [start, end): that second only
    assert exact == [row for row in everything if row["created"] == middle]
    assert _listing(live, key, end=middle) == [row for row in everything
                                                if row["created"] < middle]
    assert _listing(live, key, start=middle + 1) == [row for row in everything
                                                      if row["created"] > middle]
    first = datetime.fromisoformat(everything[-1]["time"]).date()  # China dates (+08:00)
    after_last = date.fromordinal(datetime.fromisoformat(everything[0]["time"]).toordinal() + 1)
    assert _listing(live, key, start=first.isoformat(), end=after_last.isoformat()) == everything
    assert _listing(live, key, end=first.isoformat()) == []  # a date is 00:00 China time
    assert _listing(live, key, start=after_last.isoformat()) == []
    assert _listing(live, key, start=middle + 10, end=middle) == []  # an empty window
    page = _get(live, key, params={"start": "2024-05-01", "end": "2024-05-02"}).json()
    assert (page["start"], page["end"]) == (1714492800, 1714579200)  # 2024-04-30T16:00:00Z
    default = _get(live, key).json()
    assert default["end"] - default["start"] == 30 * 86400
    assert abs(default["end"] - time.time()) < 600


def test_pages_follow_next_to_the_end(live: LiveServer, r: redis.Redis) -> None:
    key, acct = new_key(r)
    _chats(live, key, 7)
    first = _get(live, key, params={"limit": 3}).json()
    assert len(first["data"]) == 3 and first["has_more"] and first["next"] == first["last_id"]
    second = _get(live, key, params={"limit": 3, "after": first["next"]}).json()
    third = _get(live, key, params={"limit": 3, "after": second["next"]}).json()
    assert len(second["data"]) == 3 and len(third["data"]) == 1
    assert third["has_more"] is False and third["next"] is None
    ids = [row["id"] for page in (first, second, third) for row in page["data"]]
    assert ids == [e["id"] for e in _expected(r, acct, keys.lookup(r, key).id)]  # type: ignore[union-attr]
    assert len(_get(live, key, params={"limit": 100}).json()["data"]) == 7
    assert len(_get(live, key).json()["data"]) == 7  # default 20
    assert _get(live, key, params={"after": "0-0"}).json()["data"] == []


def test_every_prefix_and_the_body_key(live: LiveServer, r: redis.Redis) -> None:
    key, _ = new_key(r)
    _chats(live, key, 2)
    for prefix in ("/v1", "/index.php/api/v1", "/index.php/v1"):
        resp = requests.get(live.url + prefix + "/usage", json={"api_secret_key": key},
                            timeout=10)
        assert resp.status_code == 200 and len(resp.json()["data"]) == 2, prefix
    by_query = requests.get(live.url + "/v1/usage", params={"api_secret_key": key}, timeout=10)
    assert by_query.status_code == 401  # never from the query string: URLs reach logs
    assert requests.post(live.url + "/v1/usage", json={"api_secret_key": key},
                         timeout=10).status_code == 405


def test_without_a_valid_key_it_is_401(live: LiveServer, r: redis.Redis) -> None:
    key, acct = new_key(r)
    for resp in (_get(live, None), _get(live, "sk-nope-0123456789012345678901234567890123"),
                 requests.get(live.url + "/v1/usage", json={"api_secret_key": "sk-wrong"},
                              timeout=10)):
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key" and resp.json()["code"] != 0
    keys.revoke(r, keys.lookup(r, key).id)  # type: ignore[union-attr]
    assert _get(live, key).status_code == 401  # revocation is immediate


def test_bad_parameters_are_400_naming_the_parameter(live: LiveServer, r: redis.Redis) -> None:
    key, _ = new_key(r)
    for name, value in (("limit", "0"), ("limit", "101"), ("limit", "abc"), ("limit", "1.5"),
                        ("start", "yesterday"), ("start", "2024-13-01"), ("end", "-5"),
                        ("end", "253402300800"), ("after", "xyz"), ("after", "1-2-3"),
                        ("after", "99999999999999999999-0"), ("start", ""),
                        ("start_date", "2024-05-01"), ("api_secret_key", key), ("", "x")):
        resp = _get(live, key, params={name: value})
        assert resp.status_code == 400, (name, value)
        assert resp.json()["error"]["param"] == name
        assert resp.json()["error"]["type"] == "invalid_request_error"
    twice = _get(live, key, params=[("limit", "5"), ("limit", "6")])
    assert twice.status_code == 400 and twice.json()["error"]["param"] == "limit"


def test_a_scan_bound_cuts_pages_short_but_next_reaches_every_request(r: redis.Redis) -> None:
    acct = wallet.create_account(r, initial=10**6)
    mine = keys.create_key(r, acct, "mine")[1].id
    other = keys.create_key(r, acct, "other")[1].id
    for i in range(12):
        key_id = mine if i % 3 == 0 else other
        assert wallet.reserve(r, acct, f"req-{i}", 100, key_id=key_id, model="gpt-4").ok
        if i == 5:
            wallet.release(r, acct, f"req-{i}")
        else:
            wallet.settle(r, acct, f"req-{i}", 40, prompt_tokens=i, completion_tokens=1)
    rows: list[dict[str, Any]] = []
    after, pages = None, 0
    while True:
        page = ledger.settled_requests(r, acct, key_id=other, after=after, limit=2, scan=3)
        rows += page.rows
        pages += 1
        if page.next is None:
            break
        after = page.next
    assert [row["req"] for row in rows] == [f"req-{i}" for i in (11, 10, 8, 7, 4, 2, 1)]
    assert pages > 4  # some pages were cut by the bound, and continued
    whole = ledger.settled_requests(r, acct, key_id=mine, limit=100)
    assert [row["req"] for row in whole.rows] == ["req-9", "req-6", "req-3", "req-0"]
    assert whole.next is None
