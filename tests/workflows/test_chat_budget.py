"""A chat thread of any length fits the model (issue 14): every turn's prompt carries the newest message and the
most recent whole exchanges that fit beside the reply, pictures counted at their visual tokens, on the tiny presets
and the released geometries; what is left out is counted in the run's state and output; the real tiny engine
accepts every prompt; a message that cannot fit even alone is refused at admission."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from prompt_checks import engine_length, upper_bound, vlm_requests
from test_prompt_budgets import GEOMETRIES, filled
from test_story_graph import png
from wf_helpers import TINY, ScriptedClient, drive, finish, scripted_context

from mgmflow.models.errors import ContextLengthError
from mgmflow.orchestrator.budget import IMAGE_LABEL_TOKENS, TURN_TOKENS, budget_for
from mgmflow.orchestrator.workflow import get_workflow
from mgmflow.workflows import chat

TURNS = 14
FILLER = "la neige tombe sur le lac gelé, et le renard marche vers les lumières du village. "


def turn_input(store, turn: int) -> dict:
    """Every third turn sends a picture; every fourth asks for a drawing (the reply then carries a picture)."""
    message = f"Draw a kite, number {turn}." if turn % 4 == 3 else f"Turn {turn}: " + (FILLER * 4)[:300]
    images = ([store.put(png((turn * 20 % 256, 40, 90)), scope="test", media_type="image/png").id]
              if turn % 3 == 1 else [])
    return chat.ChatInput(message=message, images=images, seed=turn).model_dump(mode="json")


def chat_script(store):
    """Replies of 400 characters, nearly all of two bytes; asked to draw, an image prompt and a PNG."""
    def script(kind: str, payload: dict, step: str) -> dict:
        if kind == "vlm.chat":
            drawn = "a red kite" if payload.get("generate_image") else None
            return {"text": filled("A long reply", 400), "image_prompt": drawn}
        image = store.put(png((200, 30, 30)), scope="test", media_type="image/png")
        return {"images": [{"artifact": image.id, "seed": payload["seeds"][0]}], "model": "tiny"}

    return script


def run_thread(store, model: str):
    """Every turn of one thread: (the turn's prompt messages, its payload, the thread's values after it)."""
    client, saver, values = ScriptedClient(chat_script(store)), InMemorySaver(), []
    for turn in range(TURNS):
        context = dataclasses.replace(scripted_context(client, store=store, run_id=f"turn-{turn}"),
                                      settings=SimpleNamespace(vlm_model=model))
        values.append(drive(chat.build_graph(), turn_input(store, turn), client, context=context, checkpointer=saver))
    replies = [(messages, payload) for step, messages, payload in vlm_requests(client, store) if step == "respond"]
    assert len(replies) == TURNS  # one reply per turn (no turn was an edit)
    return [(*reply, turn_values) for reply, turn_values in zip(replies, values)]


@pytest.mark.parametrize("model", GEOMETRIES)
def test_every_turn_of_a_long_thread_fits_the_context(model, store):
    budget = budget_for(model)
    kept_earlier = []
    for messages, payload, values in run_thread(store, model):
        bound = upper_bound(messages, budget.image_tokens, generate=bool(payload.get("generate_image")))
        assert bound + payload["max_new_tokens"] <= budget.context_tokens, (model, bound, payload["max_new_tokens"])
        assert payload["max_new_tokens"] >= chat.LEAST_REPLY_TOKENS
        # The most recent whole exchanges: a suffix of the thread (before this turn's reply), from a user message.
        thread = [{key: m[key] for key in ("role", "text", "images")} for m in values["messages"][:-1]]
        assert messages == thread[len(thread) - len(messages):] and messages[0]["role"] == "user"
        assert values["history_dropped"] == len(thread) - len(messages)
        kept_earlier.append(len(messages) - 1)
    assert values["history_dropped"] > 0  # the thread outgrew the context, and it goes on
    assert max(kept_earlier) >= 2  # while earlier exchanges fit, the reply sees them


def test_the_tiny_engine_accepts_every_turn_of_a_long_thread(mgmflow_home, store):
    from mgmflow.models.mgm.engine import MGMEngine

    engine = MGMEngine.from_pretrained("tiny")
    for messages, payload, _ in run_thread(store, "tiny"):
        length = engine_length(engine, messages, payload, store)
        assert length + payload["max_new_tokens"] <= engine.context_length, length


def test_the_reserves_of_a_message_cover_every_template():
    """What each message adds (role markers, separators) and each of its images (the "Image 12:" label and line
    break; the placeholder is one of its visual tokens), measured on every template, within TURN_TOKENS and
    IMAGE_LABEL_TOKENS: the bound of a conversation of empty messages grows by no more than they say."""
    def conversation(exchanges: int, images: int = 0) -> list[dict]:
        """Empty exchanges, the newest user message with ``images`` images."""
        earlier = [{"role": role, "text": "", "images": []}
                   for _ in range(exchanges - 1) for role in ("user", "assistant")]
        return [*earlier, {"role": "user", "text": "", "images": ["a" * 22] * images}]

    one = upper_bound(conversation(1), image_tokens=1)
    assert upper_bound(conversation(40), image_tokens=1) - one <= 78 * TURN_TOKENS
    assert upper_bound(conversation(1, images=16), image_tokens=1) - one <= 16 * (1 + IMAGE_LABEL_TOKENS)


@pytest.mark.parametrize(("model", "message", "images"), [
    ("tiny", "x" * 3000, 0),  # 3,000 tokens at worst: longer than the 2,048-token context
    ("mgm-7b", "Compare these.", 4),  # four images of 576 tokens in 2,048
    ("mgm-7b-hd", "Compare these.", 2),  # two of 2,880 in 4,096
])
def test_a_message_that_cannot_fit_alone_is_refused_at_admission(model, message, images):
    with pytest.raises(ContextLengthError, match="context is"):
        get_workflow("chat").validate_input({"message": message, "images": ["a" * 22] * images}, budget_for(model))
    get_workflow("chat").validate_input({"message": message[:200], "images": ["a" * 22] * min(images, 1)},
                                        budget_for(model))


@pytest.mark.timeout(600)
def test_a_long_thread_with_pictures_keeps_completing_on_the_tiny_model(embedded, tmp_path):
    """Each turn's long message and random 256-token reply soon outgrow the 2,048-token context: every turn still
    completes (the real engine refuses a prompt that overflows), and the reply says what it left out."""
    from mgmflow.orchestrator.references import store_file

    picture = tmp_path / "picture.png"
    picture.write_bytes(png((30, 160, 60), size=48))
    thread = embedded.create_thread()["thread_id"]
    for turn in range(10):
        images = [store_file(embedded.orchestrator.store, picture, scope="default")] if turn % 3 == 1 else []
        run = finish(embedded, embedded.create_run(
            "chat", {"message": f"Turn {turn}: " + FILLER * 14, "images": images, "seed": turn, **TINY},
            thread_id=thread))
    values = embedded.output_values(run)
    assert len(values["messages"]) == 20 and values["history_dropped"] > 0
    report = get_workflow("chat").write_output(values, tmp_path / "out", embedded.context(run))
    assert json.loads((tmp_path / "out" / "reply.json").read_text())["history_dropped"] == values["history_dropped"]
    assert "oldest messages" in get_workflow("chat").describe_output(report, tmp_path / "out")
