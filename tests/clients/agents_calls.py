"""Drive the OpenAI Agents SDK against the relay: argv base_url, key, api ("responses" or
"chat_completions"). Prints one JSON line: {scenario: {"ok": result} or {"error": name}}.

Run by tests/test_clients_agents.py with an interpreter that has `openai-agents`. The fake
upstream calls a tool only when one is forced, so the agents force theirs (the SDK resets
tool_choice after a call, so each loop ends).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from agents import (
    Agent,
    ModelSettings,
    Runner,
    SQLiteSession,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from pydantic import BaseModel

BASE, KEY, API = sys.argv[1], sys.argv[2], sys.argv[3]
MODEL = "gpt-4o-mini"
set_tracing_disabled(True)
set_default_openai_client(AsyncOpenAI(api_key=KEY, base_url=BASE, max_retries=0),
                          use_for_tracing=False)
set_default_openai_api(API)  # type: ignore[arg-type]


@function_tool
def get_weather(city: str) -> str:
    """Return the weather of a city."""
    return f"{city} is sunny"


@function_tool
def get_time(tz: str) -> str:
    """Return the time in a time zone."""
    return f"12:00 in {tz}"


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]


PLAIN = Agent(name="plain", instructions="只用中文回答。", model=MODEL)
TOOLS = Agent(name="tools", model=MODEL, tools=[get_weather, get_time],
              model_settings=ModelSettings(tool_choice="required"))
BILLING = Agent(name="billing", model=MODEL, handoff_description="billing questions")
TRIAGE = Agent(name="triage", model=MODEL, handoffs=[BILLING],
               model_settings=ModelSettings(tool_choice="transfer_to_billing"))
STRUCTURED = Agent(name="structured", model=MODEL, output_type=Person)


def kinds(result: Any) -> list[str]:
    return [type(item).__name__ for item in result.new_items]


def outputs(result: Any) -> list[Any]:
    return [item.output for item in result.new_items if type(item).__name__ == "ToolCallOutputItem"]


async def streamed(agent: Agent[Any], text: str, **kw: Any) -> tuple[Any, list[str]]:
    run = Runner.run_streamed(agent, text, **kw)
    seen = [e.data.type async for e in run.stream_events() if e.type == "raw_response_event"]
    return run, seen


async def scenarios() -> dict[str, Any]:
    out: dict[str, Any] = {}
    run = await Runner.run(PLAIN, "hello relay")
    out["plain"] = run.final_output
    run, seen = await streamed(PLAIN, "stream it")
    out["streamed"] = [run.final_output, seen[0], seen[-1]]
    run = await Runner.run(TOOLS, "Oslo", max_turns=4)
    out["tools"] = [kinds(run), outputs(run), run.final_output]
    run, _ = await streamed(TOOLS, "Rome [[fake:parallel]]", max_turns=4)
    out["tools_parallel_streamed"] = [kinds(run), outputs(run)]
    run = await Runner.run(TRIAGE, "I want a refund", max_turns=4)
    out["handoff"] = [run.last_agent.name, kinds(run), run.final_output]
    run, _ = await streamed(TRIAGE, "refund please", max_turns=4)
    out["handoff_streamed"] = [run.last_agent.name, run.final_output]
    run = await Runner.run(STRUCTURED, "Bob is 30")
    out["structured"] = run.final_output.model_dump()
    run, _ = await streamed(STRUCTURED, "Ann is 20")
    out["structured_streamed"] = run.final_output.model_dump()
    session = SQLiteSession("s-" + API)
    await Runner.run(TOOLS, "Berlin", session=session, max_turns=4)
    run = await Runner.run(PLAIN, "what did I ask?", session=session)
    out["session"] = [run.final_output, len(await session.get_items())]
    if API == "responses":
        first = await Runner.run(TOOLS, "Lima", max_turns=4)
        run, _ = await streamed(PLAIN, "and then?", previous_response_id=first.last_response_id)
        out["previous_response_id"] = run.final_output
        run = await Runner.run(TOOLS, "Quito", max_turns=4, auto_previous_response_id=True)
        out["auto_previous_response_id"] = run.final_output
    return out


def main() -> None:
    result: dict[str, Any] = {}
    try:
        result = {name: {"ok": value} for name, value in asyncio.run(scenarios()).items()}
    except Exception as exc:  # noqa: BLE001 - reported to the test, which shows it
        result["failed"] = {"error": type(exc).__name__, "message": str(exc)[:1000]}
    print(json.dumps(result, ensure_ascii=False))


main()
