"""The agent frameworks' own loops, chat-completions side, against a live server and an adapter.

Each runs its real loop: tools offered with automatic choice, a call (or a replayed one when the tiny
model answers in text), the result carried back as the next turn, structured output where the
framework has it. A tiny random-ish adapter answers poorly, so a framework may give up (too many turns,
output it cannot validate); that is the model's quality. An HTTP error from us never is: each test
fails on one. instructor pins an older openai than ours: it runs in its own venv (`.venv-instructor`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import openai
import pytest
from pydantic import BaseModel, Field

ADAPTER = "qv8"
QUESTION = "What is the weather in Paris? Use the tool."


class Weather(BaseModel):
    """The weather report for a city."""

    city: str = Field(max_length=30)
    summary: str = Field(max_length=60)


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"18 C and sunny in {city}"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_langchain_bind_tools_auto_and_a_tool_message_round_trip(real_server):
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    weather = tool(get_weather)
    llm = ChatOpenAI(
        model=ADAPTER, base_url=real_server.v1, api_key="unused", max_tokens=48, max_retries=0, seed=0
    )
    messages = [HumanMessage(QUESTION)]
    answer = llm.bind_tools([weather]).invoke(messages)  # tool_choice: LangChain's default, auto
    assert isinstance(answer, AIMessage)
    calls = answer.tool_calls or [{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_0"}]
    messages.append(AIMessage(content=answer.content if answer.tool_calls else "", tool_calls=calls))
    messages += [ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"]) for call in calls]
    final = llm.bind_tools([weather]).invoke(messages)
    assert isinstance(final, AIMessage)


def test_litellm_with_tools(real_server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network for its price list
    litellm = pytest.importorskip("litellm")
    messages = [{"role": "user", "content": QUESTION}]
    common = dict(
        model=f"openai/{ADAPTER}",
        api_base=real_server.v1,
        api_key="unused",
        tools=[WEATHER_TOOL],
        max_tokens=48,
    )
    response = litellm.completion(messages=messages, **common)
    message = response.choices[0].message
    calls = message.tool_calls or []
    replay = [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.function.name, "arguments": c.function.arguments},
        }
        for c in calls
    ] or [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    messages.append({"role": "assistant", "content": None, "tool_calls": replay})
    messages += [{"role": "tool", "tool_call_id": c["id"], "content": "18 C"} for c in replay]
    final = litellm.completion(messages=messages, **common)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_pydantic_ai_tool_and_output_type(real_server):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.exceptions import ModelHTTPError, UnexpectedModelBehavior, UsageLimitExceeded
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    provider = OpenAIProvider(base_url=real_server.v1, api_key="unused")
    agent = Agent(
        OpenAIChatModel(ADAPTER, provider=provider),
        output_type=Weather,
        tools=[get_weather],
        model_settings={"max_tokens": 80, "seed": 0},
        retries=2,
    )
    try:
        result = agent.run_sync(QUESTION, usage_limits=UsageLimits(request_limit=6))
    except ModelHTTPError as exc:  # ours: never acceptable
        pytest.fail(f"HTTP {exc.status_code}: {exc.body}")
    except (UnexpectedModelBehavior, UsageLimitExceeded):
        return  # the tiny model did not converge: its quality, not our API
    assert isinstance(result.output, Weather)


def test_openai_agents_chat_completions_model_tool_and_output_type(real_server):
    pytest.importorskip("agents")
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from agents.exceptions import MaxTurnsExceeded, ModelBehaviorError

    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=real_server.v1, api_key="unused", max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer with the weather, using the tool.",
        tools=[function_tool(get_weather)],
        output_type=Weather,
        model=OpenAIChatCompletionsModel(model=ADAPTER, openai_client=client),
        model_settings=ModelSettings(max_tokens=80, temperature=0.7),
    )
    try:
        result = asyncio.run(Runner.run(agent, QUESTION, max_turns=4))
    except openai.APIStatusError as exc:
        pytest.fail(f"HTTP {exc.status_code}: {exc.message}")
    except (MaxTurnsExceeded, ModelBehaviorError):
        return  # the tiny model did not converge
    assert isinstance(result.final_output, Weather)


INSTRUCTOR_PYTHON = Path(__file__).resolve().parents[3] / ".venv-instructor" / "bin" / "python"


@pytest.mark.skipif(not INSTRUCTOR_PYTHON.exists(), reason="instructor's venv: `make install` builds it")
def test_instructor_tools_mode_with_retries(real_server):
    """instructor in its own venv (it pins an older openai): TOOLS mode with retries, so a failed
    validation goes back to the server as a tool-call round trip."""
    script = Path(__file__).parent / "frameworks" / "instructor_tools.py"
    done = subprocess.run(
        [str(INSTRUCTOR_PYTHON), str(script), real_server.v1, ADAPTER],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
