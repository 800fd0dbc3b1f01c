"""Own the fake upstream's POST /v1/moderations.

Answers in OpenAI's CreateModerationResponse shape: one result for a string input, one per
string of an array of strings, one for an array of multi-modal parts. Nothing is flagged unless
a text carries the marker `[[fake:flag]]` (category harassment) or `[[fake:flag=<category>]]`,
or POST /_fake/config set {"flag": "<category>"} for every request. The other markers (status,
delay, malformed) work as on the other routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fakes.upstream.answers import _model, _new_id
from fakes.upstream.behaviour import CATEGORIES, FakeError, extract_markers

if TYPE_CHECKING:
    from fakes.upstream.views import FakeHandler

IMAGE_CATEGORIES = frozenset({"self-harm", "self-harm/intent", "self-harm/instructions",
                              "sexual", "violence", "violence/graphic"})
DEFAULT_MODEL = "omni-moderation-latest"


def _groups(value: Any) -> list[tuple[list[str], set[str]]]:
    """Split the input into results: (texts, input types) for each."""
    if isinstance(value, str):
        return [([value], {"text"})]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [([v], {"text"}) for v in value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        texts = [v["text"] for v in value if v.get("type") == "text" and isinstance(
            v.get("text"), str)]
        kinds = {"image" if v.get("type") == "image_url" else "text" for v in value}
        if all(v.get("type") in ("text", "image_url") for v in value):
            return [(texts, kinds)]
    raise FakeError(400, "'input' must be a string, an array of strings or of input parts")


def _result(flag: str | None, kinds: set[str]) -> dict[str, Any]:
    """Build one moderation result, flagged in `flag` (None: nothing flagged)."""
    applied = {
        name: sorted(kinds if name in IMAGE_CATEGORIES else kinds & {"text"})
        for name in CATEGORIES
    }
    return {
        "flagged": flag is not None,
        "categories": {name: name == flag for name in CATEGORIES},
        "category_scores": {name: 0.97 if name == flag else 0.0001 for name in CATEGORIES},
        "category_applied_input_types": applied,
    }


def answer_moderations(handler: FakeHandler, body: dict[str, Any]) -> None:
    """Answer POST /v1/moderations."""
    model = _model(body, DEFAULT_MODEL)
    groups, markers = [], {}
    for texts, kinds in _groups(body.get("input")):
        flags = set()
        for text in texts:
            _, found = extract_markers(text)
            markers.update(found)
            if "flag" in found:
                flags.add(found["flag"])
        groups.append((flags, kinds))
    behaviour = handler._behaviour(markers)
    if handler._apply(behaviour):
        return
    every = handler.server.state.config.get("flag")
    results = [_result(min(flags) if flags else every, kinds) for flags, kinds in groups]
    handler._send_json({"id": _new_id("modr"), "model": model, "results": results})
