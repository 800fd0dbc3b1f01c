"""Run LiteLLM against the relay the way its users call it; print one JSON object of outcomes.

Run by tests/test_clients_litellm.py with LiteLLM's own interpreter:
`python litellm_calls.py BASE_URL KEY BROKE_KEY`. Each outcome is {"ok": value} or
{"error": class name, "status": HTTP status}.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("LITELLM_LOG", "ERROR")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import

import litellm  # noqa: E402

litellm.suppress_debug_info = True
base, key, broke = sys.argv[1:4]
kw: dict[str, Any] = {"api_base": base, "api_key": key, "num_retries": 0}
hi = [{"role": "user", "content": "hello relay"}]
tools = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
out: dict[str, Any] = {}


def run(name: str, call: Callable[[], Any]) -> None:
    try:
        out[name] = {"ok": call()}
    except Exception as exc:  # every failure is an outcome the test judges
        out[name] = {"error": type(exc).__name__, "status": getattr(exc, "status_code", None)}


def stream_chat() -> Any:
    chunks = list(litellm.completion(model="openai/gpt-3.5", messages=hi, stream=True,
                                     stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = getattr(chunks[-1], "usage", None)
    return {"text": text, "completion_tokens": usage.completion_tokens if usage else None}


def embedding_b64() -> Any:
    data = litellm.embedding(model="openai/text-embedding-3-small", input=["a"],
                             encoding_format="base64", **kw).data[0]["embedding"]
    return len(base64.b64decode(data)) // 4


def responses_chain() -> Any:
    first = litellm.responses(model="openai/gpt-4o", input="remember 7", instructions="brief", **kw)
    second = litellm.responses(model="openai/gpt-4o", input="which number?",
                               previous_response_id=first.id, **kw)
    return second.output[0].content[0].text


def responses_stream() -> Any:
    events = [str(getattr(e.type, "value", e.type))
              for e in litellm.responses(model="openai/gpt-4o", input="stream it", stream=True, **kw)]
    return events


run("chat", lambda: litellm.completion(model="openai/gpt-3.5", messages=hi, **kw)
    .choices[0].message.content)
run("chat_async", lambda: asyncio.run(litellm.acompletion(model="openai/gpt-4o", messages=hi, **kw))
    .choices[0].message.content)
run("chat_stream", stream_chat)
run("chat_tools", lambda: [c.function.name for c in litellm.completion(
    model="openai/gpt-4o", messages=hi, tools=tools, tool_choice="required",
    parallel_tool_calls=True, **kw).choices[0].message.tool_calls])
run("chat_params", lambda: len(litellm.completion(
    model="openai/gpt-4o", messages=hi, n=2, seed=7, stop=["END"], user="u-1", logprobs=True,
    top_logprobs=2, max_completion_tokens=20,
    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    **kw).choices))
run("text_completion", lambda: litellm.text_completion(
    model="openai/gpt-3.5-turbo-instruct", prompt="Say this", echo=True, logprobs=1, max_tokens=5,
    **kw).choices[0].text)
run("embedding_list", lambda: len(litellm.embedding(
    model="openai/text-embedding-3-small", input=["a", "b", "c"], **kw).data))
run("embedding_dims", lambda: len(litellm.embedding(
    model="openai/text-embedding-3-small", input=["a"], dimensions=8, **kw).data[0]["embedding"]))
run("embedding_tokens", lambda: len(litellm.embedding(
    model="openai/text-embedding-3-small", input=[[1, 2, 3], [4, 5]], **kw).data))
run("embedding_b64", embedding_b64)
run("aembedding", lambda: len(asyncio.run(litellm.aembedding(
    model="openai/text-embedding-ada-002", input=["a", "b"], **kw)).data))
# LiteLLM 1.7x+ refuses response_format for every openai/ image model itself (it takes them all
# for GPT image models; OpenAI's dall-e take it): extra_body sends it as OpenAI's SDK would.
run("image", lambda: sum(bool(d.b64_json) for d in litellm.image_generation(
    model="openai/dall-e-2", prompt="a cat", n=2, size="256x256",
    extra_body={"response_format": "b64_json"}, **kw).data))
run("image_url", lambda: litellm.image_generation(
    model="openai/dall-e-3", prompt="a cat", size="1024x1792", quality="hd", **kw).data[0].url)
run("responses_chain", responses_chain)
run("responses_stream", responses_stream)
run("bad_key", lambda: litellm.completion(model="openai/gpt-3.5", messages=hi, api_base=base,
                                          api_key="sk-not-a-real-key", num_retries=0))
run("empty_wallet", lambda: litellm.completion(model="openai/gpt-3.5", messages=hi, api_base=base,
                                               api_key=broke, num_retries=0))
run("unknown_model", lambda: litellm.completion(model="openai/gpt-99", messages=hi, **kw))
run("no_messages", lambda: litellm.completion(model="openai/gpt-3.5", messages=[], **kw))
print(json.dumps(out, default=str))
