"""The README's agent recipe with LangGraph's prebuilt agent: MGMChatModel bound to every task tool (their schemas
travel by reference), a made-up artifact id answered as a tool error the model reads, and ``response_format``
asked of a conversation that ends with the agent's own message.

A tiny random model answers noise, so the model is driven by a grammar (``tool_choice`` names a tool) and the
tests assert the shapes and error paths, not the model's judgement."""

from __future__ import annotations

import pytest
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, create_react_agent
from pydantic import BaseModel, Field
from tool_helpers import png

from mgmflow.models.errors import InvalidInputError
from mgmflow.tools.chat_model import MGMChatModel
from mgmflow.tools.tasks import make_tools

SCOPE = "agent-test"


class Verdict(BaseModel):
    found: bool
    stars: int = Field(ge=0, le=5)


@pytest.fixture
def tools(client):
    return make_tools(client, scope=SCOPE, run_id="agent-test", timeout=240)


@pytest.fixture
def model(client):
    return MGMChatModel(client=client, scope=SCOPE, max_new_tokens=160, seed=1)


@pytest.mark.timeout(300)
def test_bind_tools_with_every_task_tool_decodes_a_call(model, tools):
    # Nine tool schemas (~6 KB) would not fit a 4 KB task message inline: they travel as an artifact. "any":
    # the grammar lets the model call any of them (the tiny model picks one at random) and nothing else.
    roomy = model.model_copy(update={"max_new_tokens": 1600})  # a random model fills text arguments to their bound
    call = roomy.bind_tools(tools, tool_choice="any").invoke("Draw a fox.")
    (tool_call,) = call.tool_calls
    (called,) = [tool for tool in tools if tool.name == tool_call["name"]]
    called.args_schema.model_validate(tool_call["args"])
    # Many more tools still fit: the task message carries references only.
    specs = [convert_to_openai_tool(tool)["function"] for tool in tools]
    many = [{**spec, "name": f"{spec['name']}_{n}"} for n in range(4) for spec in specs]
    payload = model.to_payload([HumanMessage("hi")], tools=many, tool_choice="auto")
    assert "json_schema_artifact" in payload and "messages_artifact" in payload


@pytest.mark.timeout(300)
def test_a_made_up_artifact_id_is_a_tool_error_the_agent_reads(model, tools):
    call = AIMessage("", tool_calls=[{"name": "describe_image", "args": {"image": "made-up-id"}, "id": "call_1",
                                      "type": "tool_call"}])
    graph = StateGraph(MessagesState)
    graph.add_node("tools", ToolNode(tools))  # LangGraph's defaults: only a tool's own error handling applies
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    (reply,) = graph.compile().invoke({"messages": [HumanMessage("Describe it."), call]})["messages"][2:]
    assert isinstance(reply, ToolMessage) and reply.status == "error" and reply.tool_call_id == "call_1"
    assert "image: no artifact 'made-up-id'" in reply.content
    # Arguments outside the schema come back the same way, naming the field.
    bad = AIMessage("", tool_calls=[{"name": "generate_image", "args": {"prompt": "a fox", "width": 100},
                                     "id": "call_2", "type": "tool_call"}])
    reply = graph.compile().invoke({"messages": [HumanMessage("Draw."), bad]})["messages"][-1]
    assert reply.status == "error" and "width" in reply.content and "multiple of 8" in reply.content
    # Texts the schema allows that are too long together for a task message (a non-ASCII character takes up to
    # six bytes in JSON): the model is told to shorten them.
    long = AIMessage("", tool_calls=[{"name": "generate_image", "args": {"prompt": "é" * 1000, "negative_prompt":
                                      "ü" * 1000}, "id": "call_3", "type": "tool_call"}])
    reply = graph.compile().invoke({"messages": [HumanMessage("Draw."), long]})["messages"][-1]
    assert reply.status == "error" and "shorten the texts" in reply.content
    # Code that wants exceptions keeps the typed error.
    (strict,) = [t for t in make_tools(model.client, scope=SCOPE, handle_errors=False) if t.name == "describe_image"]
    with pytest.raises(InvalidInputError, match="no artifact"):
        strict.invoke({"image": "made-up-id"})


@pytest.mark.timeout(300)
def test_the_prebuilt_agent_survives_a_bad_call_and_gives_a_structured_response(model, tools):
    # The README's recipe. The grammar makes the model call describe_image with an id it made up; the tool's
    # error goes back to the model, which then answers in text ("none": no more calls); response_format then asks
    # the model for a Verdict of a conversation that ends with the agent's own answer.
    roomy = model.model_copy(update={"max_new_tokens": 1600})  # room for the arguments a random model writes

    def choose(state, runtime):
        tried = any(isinstance(message, ToolMessage) for message in state["messages"])
        return roomy.bind_tools(tools, tool_choice="none" if tried else "describe_image")

    agent = create_react_agent(choose, tools, response_format=Verdict)
    state = agent.invoke({"messages": [HumanMessage("Describe my picture.")]})
    call, error, answer = state["messages"][1:]
    assert call.tool_calls[0]["name"] == "describe_image"
    assert isinstance(error, ToolMessage) and error.status == "error"
    assert error.content == f"image: no artifact {call.tool_calls[0]['args']['image']!r} in this scope"
    assert isinstance(answer, AIMessage) and not answer.tool_calls
    assert isinstance(state["structured_response"], Verdict)


def _calls(*ids: str) -> list[dict]:
    return [{"name": "describe_image", "args": {"image": id_}, "id": id_, "type": "tool_call"} for id_ in ids]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ending", [
    [AIMessage("It is a fox.")],  # response_format's last call: the agent's own answer
    [AIMessage("", tool_calls=_calls("c1", "c2")), ToolMessage("a fox", tool_call_id="c1"),
     ToolMessage("an owl", tool_call_id="c2")],  # parallel tool calls: two results in a row
    [AIMessage("Let me look."), AIMessage("", tool_calls=_calls("c3")), ToolMessage("a fox", tool_call_id="c3"),
     HumanMessage("And the colour?"), HumanMessage("Be brief.")],  # consecutive messages of one role
], ids=["assistant", "tools", "runs"])
def test_a_conversation_may_end_with_an_assistant_or_tool_message(model, ending):
    messages = [SystemMessage("You look at pictures."), HumanMessage("What is it?"), *ending]
    reply = model.invoke(messages)
    assert isinstance(reply, AIMessage) and reply.response_metadata["completion_tokens"] > 0
    # A random model fills strings to their bound: room for the whole JSON, else it is a typed error (issue 11).
    verdict = model.model_copy(update={"max_new_tokens": 1600}).with_structured_output(Verdict).invoke(messages)
    assert isinstance(verdict, Verdict)


@pytest.mark.timeout(300)
def test_the_models_own_pictures_go_back_into_the_conversation(model, client):
    # LangChain hands the model's replies back as they came, generated image blocks included; MGM sees images in
    # user turns only, so the picture opens the next user turn (its visual tokens are in the prompt).
    picture = client.store.put(png(), scope=SCOPE, media_type="image/png", metadata={}).id
    drawn = [{"type": "text", "text": "Here it is."}, {"type": "image", "file_id": picture, "mime_type": "image/png"}]
    asked = model.invoke([HumanMessage("Draw a dog."), AIMessage(drawn), HumanMessage("What colour is it?")])
    told = model.invoke([HumanMessage("Draw a dog."), AIMessage("Here it is."), HumanMessage("What colour is it?")])
    assert asked.response_metadata["prompt_tokens"] > told.response_metadata["prompt_tokens"] + 1
