"""Run the legacy `openai` 0.28 SDK against the relay the way its users call it (module-level
api_base/api_key, ChatCompletion.create, `engine=`); print one JSON object of outcomes.

Run by tests/test_clients_legacy.py with an interpreter that has openai 0.28:
`python openai028_calls.py BASE_URL KEY BROKE_KEY`. Each outcome is {"ok": value} or
{"error": "module.Class", "status": HTTP status, "code": error.code from the body}.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import openai

openai.api_base, openai.api_key, broke = sys.argv[1:4]
hi = [{"role": "user", "content": "hello relay"}]
out: dict[str, Any] = {}


def run(name: str, call: Callable[[], Any]) -> None:
    try:
        out[name] = {"ok": call()}
    except Exception as exc:  # every failure is an outcome the test judges
        err = getattr(exc, "error", None)
        out[name] = {"error": f"{type(exc).__module__}.{type(exc).__name__}",
                     "status": getattr(exc, "http_status", None),
                     "code": getattr(err, "code", None) if err is not None else None,
                     "message": getattr(exc, "user_message", str(exc))}


def chat_stream() -> Any:
    chunks = list(openai.ChatCompletion.create(model="gpt-3.5", messages=hi, stream=True))
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def embedding_default() -> Any:
    try:
        import numpy  # noqa: F401  (0.28 decodes its default base64 with numpy)
    except ImportError:
        return "no numpy"
    vec = openai.Embedding.create(model="text-embedding-ada-002", input="hi").data[0].embedding
    return [len(vec), type(vec[0]).__name__]


async def both_async() -> Any:
    done = await openai.ChatCompletion.acreate(model="gpt-3.5", messages=hi)
    text = ""
    async for c in await openai.ChatCompletion.acreate(model="gpt-4o", messages=hi, stream=True):
        text += c["choices"][0]["delta"].get("content", "") if c["choices"] else ""
    return [done.choices[0].message.content, text]


run("chat", lambda: openai.ChatCompletion.create(
    model="gpt-3.5-turbo", messages=hi, temperature=0.7).choices[0].message.content)
run("chat_stream", chat_stream)
run("chat_async", lambda: asyncio.run(both_async()))
run("functions", lambda: (lambda c: [c.finish_reason, c.message.function_call.name,
                                     json.loads(c.message.function_call.arguments)])(
    openai.ChatCompletion.create(model="gpt-3.5-turbo", messages=hi, functions=[{
        "name": "get_weather", "parameters": {"type": "object", "properties": {}}}],
        function_call={"name": "get_weather"}).choices[0]))
run("completion", lambda: openai.Completion.create(
    model="text-davinci-003", prompt="Say this", max_tokens=7).choices[0].text)
run("completion_engine", lambda: (lambda c: [c.model, c.choices[0].text])(openai.Completion.create(
    engine="text-davinci-003", prompt="Say this", max_tokens=7)))
run("chat_engine", lambda: openai.ChatCompletion.create(
    engine="gpt-4o", messages=hi).model)
run("embedding_engine", lambda: [len(d.embedding) for d in openai.Embedding.create(
    engine="text-embedding-ada-002", input=[[1, 2, 3], [4]], encoding_format="float").data])
run("embedding_default", embedding_default)
run("image", lambda: [bool(d.b64_json) for d in openai.Image.create(
    prompt="a cat", n=2, size="256x256", response_format="b64_json").data])
run("models", lambda: [m.id for m in openai.Model.list().data])
run("model", lambda: openai.Model.retrieve("gpt-3.5").id)
run("bad_key", lambda: openai.ChatCompletion.create(model="gpt-3.5", messages=hi, api_key="sk-bad"))
run("empty_wallet", lambda: openai.ChatCompletion.create(model="gpt-3.5", messages=hi,
                                                         api_key=broke))
run("unknown_model", lambda: openai.ChatCompletion.create(model="gpt-99", messages=hi))
run("unknown_engine", lambda: openai.Completion.create(engine="gpt-99", prompt="x"))
run("no_messages", lambda: openai.ChatCompletion.create(model="gpt-3.5", messages=[]))
run("stream_broken", lambda: list(openai.ChatCompletion.create(
    model="gpt-3.5", messages=[{"role": "user", "content": "hi [[fake:stream_error=2]]"}],
    stream=True)))
run("timeout", lambda: openai.ChatCompletion.create(
    model="gpt-3.5", messages=[{"role": "user", "content": "hi [[fake:delay=3]]"}],
    request_timeout=0.5))
run("no_v1", lambda: openai.ChatCompletion.create(  # api_base without /v1: a common slip
    model="gpt-3.5", messages=hi, api_base=openai.api_base.removesuffix("/v1")))
print(json.dumps(out, default=str))
