"""MGMChatModel in LangChain calls: an image content block in, text and a generated image out, streaming,
structured output, tool calls run by LangGraph's ToolNode, bad image blocks refused."""

from __future__ import annotations

import base64

import pytest
from tool_helpers import png
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from pydantic import BaseModel, Field

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.images import load_image
from mgmflow.tools.chat_model import MGMChatModel

SCOPE = "chat-test"


def question() -> list:
    image = base64.b64encode(png()).decode()
    return [SystemMessage(content="You are helpful."),
            HumanMessage(content=[{"type": "text", "text": "What is this? Then draw it."},
                                  {"type": "image", "base64": image, "mime_type": "image/png"}])]


@pytest.mark.timeout(300)
def test_invoke_with_an_image_block_returns_text_and_a_generated_image(client):
    model = MGMChatModel(client=client, scope=SCOPE, max_new_tokens=24, generate_images=True, image_size=64,
                         image_steps=2, seed=3)
    reply = model.invoke(question())
    text, *images = reply.content if isinstance(reply.content, list) else [{"type": "text", "text": reply.content}]
    assert text["type"] == "text" and text["text"]
    # The tiny random model writes an <h>…</h> block under generate_image; its prompt was drawn.
    assert reply.response_metadata["image_prompt"]
    (image,) = images
    assert image["type"] == "image" and client.store.info(image["file_id"], scope=SCOPE).media_type == "image/png"
    assert load_image(base64.b64decode(image["base64"])).size == (64, 64)


@pytest.mark.timeout(300)
def test_streaming_yields_the_worker_tokens(client):
    model = MGMChatModel(client=client, scope=SCOPE, max_new_tokens=16)
    chunks = list((ChatPromptTemplate.from_messages([("human", "{q}")]) | model).stream({"q": "Say hello."}))
    tokens = [chunk.content for chunk in chunks if chunk.content]
    assert len(tokens) >= 2  # token by token, not one final blob
    assert "".join(tokens) == model.invoke("Say hello.").content  # greedy: the same text either way


class Caption(BaseModel):
    title: str = Field(max_length=20)
    stars: int = Field(ge=0, le=5)


@pytest.mark.timeout(300)
def test_structured_output_is_schema_constrained_and_validated(client):
    # The schema allows extra keys, and the random model writes ~230 tokens of one: at 96 its JSON was cut (and
    # "repaired" by LangChain's partial-JSON parser); now a cut answer is an error, so it gets room to finish.
    model = MGMChatModel(client=client, scope=SCOPE, max_new_tokens=400)
    caption = model.with_structured_output(Caption).invoke("Caption a picture of a fox, in JSON.")
    assert isinstance(caption, Caption) and 0 <= caption.stars <= 5
    raw = model.with_structured_output(Caption, include_raw=True).invoke("Again.")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Caption)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"type": "image", "base64": "not base64!!", "mime_type": "image/png"}, "base64"),
        ({"type": "image", "base64": base64.b64encode(b"not an image").decode(), "mime_type": "image/png"},
         "not a readable image"),
        ({"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}, "not fetched"),
        ({"type": "image", "file_id": "no-such-artifact-id"}, "no artifact"),
        ({"type": "audio", "base64": "AAAA"}, "unsupported content block"),
    ],
)
def test_bad_image_blocks_are_refused(client, block, message):
    model = MGMChatModel(client=client, scope=SCOPE)
    with pytest.raises(InvalidInputError, match=message):
        model.invoke([HumanMessage(content=[{"type": "text", "text": "hi"}, block])])


class AddArgs(BaseModel):
    a: int = Field(ge=0, le=9)
    b: int = Field(ge=0, le=9)


@tool(args_schema=AddArgs)
def add(a: int, b: int) -> int:
    """Add two digits."""
    return a + b


@pytest.mark.timeout(300)
def test_tool_calls_run_in_a_langgraph_tool_node(client):
    model = MGMChatModel(client=client, scope=SCOPE, max_new_tokens=96)
    call = model.bind_tools([add], tool_choice="add").invoke("What is 2 + 3? Use the tool.")
    (tool_call,) = call.tool_calls
    assert tool_call["name"] == "add" and AddArgs.model_validate(tool_call["args"])
    # The agent's next step: LangGraph's ToolNode runs the call; the model reads its result back.
    graph = StateGraph(MessagesState)
    graph.add_node("tools", ToolNode([add]))
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    result = graph.compile().invoke({"messages": [HumanMessage("What is 2 + 3?"), call]})["messages"][-1]
    assert result.content == str(tool_call["args"]["a"] + tool_call["args"]["b"])
    roomy = model.model_copy(update={"max_new_tokens": 1600})  # a random model fills a text answer to its bound
    free = roomy.bind_tools([add]).invoke([HumanMessage("What is 2 + 3?"), call, result])
    assert free.tool_calls or isinstance(free.content, str)  # "auto": a call or an answer, both well-formed
    with pytest.raises(ValueError, match="tool_choice"):
        model.bind_tools([add], tool_choice="subtract")
