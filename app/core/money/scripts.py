"""Lua script registration: EVALSHA with automatic reload, registered once per client."""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from redis.commands.core import Script

_scripts: dict[tuple[int, str], Script] = {}


def script(client: redis.Redis, source: str) -> Script:
    """Return a registered script (EVALSHA with automatic reload), once per client."""
    key = (id(client), source)
    found = _scripts.get(key)
    if found is None:
        found = _scripts[key] = client.register_script(source)
    return found
