"""OpenAI tool calling against the server, with the official ``openai`` client and LangChain's ``ChatOpenAI``: calls
are decoded under the tools' schemas, so every call names an offered tool with valid arguments."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import BadRequestError, OpenAI, UnprocessableEntityError

pytestmark = pytest.mark.timeout(300)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ZOOM = {"type": "function", "function": {
    "name": "zoom", "description": "Look closer at a region of the image.",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 100},
                                                    "y": {"type": "integer", "minimum": 0, "maximum": 100}},
                   "required": ["x", "y"]}}}
TOOLS = {tool["function"]["name"]: tool["function"] for tool in (WEATHER, ZOOM)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def openai_client(live_server):
    return OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=240)


def _model(openai_client) -> str:
    return openai_client.models.list().data[0].id


def _check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in TOOLS
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, TOOLS[call.function.name]["parameters"])
    assert set(arguments) <= set(TOOLS[call.function.name]["parameters"]["properties"])
    return arguments


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_tool_choice_always_gives_a_valid_call(openai_client, seed):
    completion = openai_client.chat.completions.create(
        model=_model(openai_client), messages=ASK, tools=[WEATHER, ZOOM], tool_choice="required", max_tokens=256,
        seed=seed, temperature=1.0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    _check_call(call)


def test_a_named_tool_choice_calls_that_tool_and_none_answers_in_text(openai_client):
    named = openai_client.chat.completions.create(
        model=_model(openai_client), messages=ASK, tools=[WEATHER, ZOOM], max_tokens=256, seed=4,
        tool_choice={"type": "function", "function": {"name": "zoom"}})
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "zoom" and _check_call(call)

    text = openai_client.chat.completions.create(
        model=_model(openai_client), messages=ASK, tools=[WEATHER, ZOOM], tool_choice="none", max_tokens=8, seed=4)
    assert text.choices[0].message.tool_calls is None and isinstance(text.choices[0].message.content, str)
    assert text.choices[0].finish_reason in ("stop", "length")


def test_a_conversation_with_tool_results_goes_on(openai_client):
    first = openai_client.chat.completions.create(
        model=_model(openai_client), messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=256, seed=5)
    [call] = first.choices[0].message.tool_calls
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    # The history holds the call and its result, and may end on the tool message.
    second = openai_client.chat.completions.create(
        model=_model(openai_client), messages=history, tools=[WEATHER, ZOOM], tool_choice="required",
        max_tokens=256, seed=5)
    [again] = second.choices[0].message.tool_calls
    _check_call(again)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result reached the model
    with pytest.raises(BadRequestError, match="matches no tool call"):
        openai_client.chat.completions.create(
            model=_model(openai_client), max_tokens=8,
            messages=[*ASK, {"role": "tool", "tool_call_id": "call_unknown", "content": "21"}])


def test_a_streamed_tool_call_assembles_to_a_valid_call(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model=_model(openai_client), messages=ASK, tools=[WEATHER, ZOOM], tool_choice="required", max_tokens=256,
        seed=6, stream=True))
    deltas = [delta for chunk in chunks if chunk.choices for delta in chunk.choices[0].delta.tool_calls or []]
    assert deltas and {delta.index for delta in deltas} == {0}
    name = "".join(delta.function.name or "" for delta in deltas)
    arguments = json.loads("".join(delta.function.arguments or "" for delta in deltas))
    jsonschema.validate(arguments, TOOLS[name]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    whole = openai_client.chat.completions.create(
        model=_model(openai_client), messages=ASK, tools=[WEATHER, ZOOM], tool_choice="required", max_tokens=256,
        seed=6)
    assert (name, arguments) == (whole.choices[0].message.tool_calls[0].function.name,
                                 json.loads(whole.choices[0].message.tool_calls[0].function.arguments))


@pytest.mark.parametrize(("extra", "named"), [
    ({"stop": ["\n"]}, "stop"), ({"logprobs": True}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"), ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"functions": [WEATHER["function"]]}, "functions"), ({"not_an_openai_field": 1}, "not_an_openai_field"),
])
def test_unsupported_parameters_are_refused_by_name(openai_client, extra, named):
    with pytest.raises(UnprocessableEntityError) as refused:  # the API's status for a request it cannot take
        openai_client.chat.completions.create(model=_model(openai_client), messages=ASK, max_tokens=4,
                                              extra_body=extra)
    assert named in str(refused.value)


def test_bad_tool_choices_are_refused(openai_client):
    for choice in ("required", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(BadRequestError, match="tool_choice"):
            openai_client.chat.completions.create(model=_model(openai_client), messages=ASK, max_tokens=4,
                                                  tools=[WEATHER] if isinstance(choice, dict) else None,
                                                  tool_choice=choice)


def test_langchain_chat_openai_calls_tools_on_this_server(live_server, openai_client):
    """ChatOpenAI.bind_tools pointed at this server gets real tool calls; a ReAct agent over it runs its tools."""
    from typing import Literal

    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent
    from pydantic import BaseModel, Field

    calls = []

    class City(BaseModel):
        city: str = Field(max_length=12)  # bounded: the tiny random model would otherwise write until max_tokens
        unit: Literal["celsius", "fahrenheit"]

    @tool(args_schema=City)
    def get_weather(city: str, unit: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"21 degrees {unit} in {city}"

    model = ChatOpenAI(base_url=f"{live_server.url}/v1", api_key="unused", model=_model(openai_client),
                       max_tokens=256, seed=7, max_retries=0, timeout=240)
    reply = model.bind_tools([get_weather], tool_choice="required").invoke("Weather in Rome?")
    [call] = reply.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}

    # A ReAct agent over the server: the forced call runs the tool, its result goes back to the model, which calls
    # again until the agent's step budget ends the loop.
    agent = create_react_agent(model.bind_tools([get_weather], tool_choice="get_weather"), [get_weather])
    messages = agent.invoke({"messages": [("user", "Weather in Rome?")]}, {"recursion_limit": 6})["messages"]
    results = [message for message in messages if message.type == "tool"]
    assert len(results) >= 2 and all(result.content.startswith("21 degrees") for result in results)
    assert len(calls) == len(results)
