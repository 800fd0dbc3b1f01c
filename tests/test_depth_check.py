"""The body's depth check: two C-speed bracket counts spare the walk for normal bodies, and
never let a body deeper than MAX_JSON_DEPTH through."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.errors import InvalidRequest
from app.web.relay.common import MAX_JSON_DEPTH, check_depth, too_deep


def nest(depth: int) -> dict[str, Any]:
    """A body nesting `depth` containers (the top-level object is the first)."""
    inner: Any = 1
    for i in range(depth - 1):
        inner = [inner] if i % 2 else {"x": inner}
    return {"a": inner}


def refused(body: dict[str, Any]) -> bool:
    try:
        check_depth(body, json.dumps(body).encode())
    except InvalidRequest:
        return True
    return False


def test_the_limit_holds_with_the_shortcut() -> None:
    assert not refused(nest(MAX_JSON_DEPTH)) and refused(nest(MAX_JSON_DEPTH + 1))
    # brackets inside strings are counted too: the walk runs, and finds nothing deep
    assert not refused({"messages": [{"role": "user", "content": "[{" * 500}]})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet="[]{}ab", max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.text(alphabet="[{k", max_size=3), children, max_size=3),
    max_leaves=200)


@settings(max_examples=200, deadline=None)
@given(json_values, st.integers(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 3))
def test_the_shortcut_refuses_exactly_what_the_walk_refuses(value: Any, depth: int) -> None:
    body = {"v": value, "deep": nest(depth)}
    assert refused(body) == too_deep(body)


@pytest.mark.parametrize("depth", [1, 2, MAX_JSON_DEPTH])
def test_a_normal_body_is_never_refused(depth: int) -> None:
    assert not refused(nest(depth))
