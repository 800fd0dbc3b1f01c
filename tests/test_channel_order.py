"""Channel order: priority first, weight within a priority, model filters, resting channels last."""

from __future__ import annotations

from collections import Counter

import redis

from app.core.config import Channel, load_settings
from app.edges.upstream import Upstream


def upstream_with(r: redis.Redis, redis_url: str, channels: list[dict]) -> Upstream:
    """Build an Upstream over the given [[channels]] table."""
    settings = load_settings({"XIAOYI_REDIS_URL": redis_url}, toml={"channels": channels})
    return Upstream(settings, r)


def test_weight_shares_first_place_within_a_priority(r: redis.Redis, redis_url: str) -> None:
    up = upstream_with(r, redis_url, [
        {"name": "heavy", "base_url": "http://a.example/v1", "weight": 3},
        {"name": "light", "base_url": "http://b.example/v1", "weight": 1},
        {"name": "backup", "base_url": "http://c.example/v1", "priority": 1, "weight": 100},
    ])
    firsts = Counter(up.order("gpt-3.5-turbo")[0].name for _ in range(2000))
    assert firsts["backup"] == 0  # a lower priority is only a fallback
    share = firsts["heavy"] / 2000
    assert 0.68 < share < 0.82, firsts  # 3:1 → 75 %; the bounds are > 5 standard deviations
    assert all([c.name for c in up.order("gpt-3.5-turbo")][2] == "backup" for _ in range(50))


def test_models_filter_and_resting_channels_go_last(r: redis.Redis, redis_url: str) -> None:
    table = [
        {"name": "images", "base_url": "http://a.example/v1", "models": ["dall-e-2"]},
        {"name": "main", "base_url": "http://b.example/v1"},
        {"name": "spare", "base_url": "http://c.example/v1", "priority": 1},
    ]
    up = upstream_with(r, redis_url, table)
    assert [c.name for c in up.order("gpt-4")] == ["main", "spare"]
    assert up.order("dall-e-2")[-1].name == "spare"
    r.set("xy:chan:{main}:cool", "http_500", ex=30)  # another process saw main fail
    up = upstream_with(r, redis_url, table)  # a process that has not cached the state yet
    assert [c.name for c in up.order("gpt-4")] == ["spare", "main"]
    assert isinstance(up.order("gpt-4")[0], Channel)
