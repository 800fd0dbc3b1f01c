"""Helpers for admin tests: the test token, the login form, CSRF fields, crawling every page."""

from __future__ import annotations

import re
from typing import Any

TOKEN = "admin-token-for-tests-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(client: Any, path: str = "/admin/login") -> str:
    """Return the CSRF token a page's forms carry."""
    found = CSRF.search(client.get(path).get_data(as_text=True))
    assert found, f"no csrf field on {path}"
    return found[1]


def login(client: Any, token: str = TOKEN, next_path: str = "/admin/") -> Any:
    """Log in through the form; return the response."""
    return client.post("/admin/login", data={"token": token, "csrf": csrf_of(client),
                                             "next": next_path})


def chat(client: Any, key: str, text: str = "你好 admin") -> Any:
    """Send one chat completion through the relay."""
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "gpt-3.5", "messages": [{"role": "user", "content": text}]})


def crawl(client: Any, start: str) -> dict[str, str]:
    """Follow every /admin link from `start` (GET only); return {path: html}."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo and len(seen) < 200:
        path = todo.pop()
        if path in seen:
            continue
        resp = client.get(path)
        assert resp.status_code == 200, path
        seen[path] = resp.get_data(as_text=True)
        for link in re.findall(r'href="(/admin[^"]*)"', seen[path]):
            todo.append(link.replace("&amp;", "&"))
    return seen
