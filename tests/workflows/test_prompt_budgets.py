"""Stories of every length fit the model: every prompt the story builds, at 64 pages with texts filled to their
schema bounds, fits the VLM's context with room for its answer, on the tiny presets and the released geometries
(issue 14). The tiny preset's prompts are also measured by its real engine and tokenizer."""

from __future__ import annotations

import io
import json

import pytest
from wf_helpers import ScriptedClient, drive, scripted_context
from test_story_graph import png

from mgmflow.models.mgm.conversation import TEMPLATES, Turn
from mgmflow.models.mgm.gen_protocol import GEN_SUFFIX
from mgmflow.orchestrator.budget import TEMPLATE_TOKENS, PromptBudget, budget_for, fit
from mgmflow.orchestrator.schemas import LONG, SHORT
from mgmflow.workflows import story

GEOMETRIES = ["tiny", "tiny-hd", "small", "mgm-2b", "mgm-7b", "mgm-7b-hd", "mgm-8x7b-hd", "mgm-34b-hd"]
WORKER_DEFAULT_TOKENS = 256  # a VLM payload without max_new_tokens gets the worker's default


def filled(text: str, limit: int) -> str:
    """A random model's answer: the field filled to its bound, with two-byte characters."""
    return (text + " " + "é" * limit)[:limit]


def worst_case_script(store):
    """Every VLM answer filled to its schema's bounds (distinct characters on every page); critiques send pages
    round the loop again (odd pages edited, even pages re-prompted); each draft is a PNG of its own."""
    def script(kind: str, payload: dict, step: str) -> dict:
        if step.startswith("scenes:"):
            first, last = map(int, step.split(":")[1].split("-"))
            scenes = [{"title": filled(f"Scene {n}", SHORT), "description": filled(f"page {n}", LONG),
                       "characters": [filled(f"Hero {n}.{c}", SHORT) for c in range(4)]}
                      for n in range(first, last + 1)]
            return {"text": json.dumps({"scenes": scenes})}
        if step == "sheet":
            characters = [{"name": filled(f"Hero {c}", SHORT), "description": filled("looks", LONG)} for c in range(6)]
            return {"text": json.dumps({"characters": characters, "style": filled("style", LONG)})}
        if kind == "vlm.write_prompt":
            return {"text": "", "image_prompt": filled(step, 1000)}
        if kind == "vlm.chat":  # a critique: pages:<key>:r<round>:d<draft>:critique
            page = int(step.split(":")[1].split("-")[1])
            verdict = ("edit", 6) if page % 2 else ("refine", 2)
            return {"text": json.dumps({"score": verdict[1], "verdict": verdict[0], "feedback": filled("fix", LONG)})}
        image = store.put(png((len(step) % 256, 20, 30)), scope="test", media_type="image/png", metadata={"step": step})
        return {"images": [{"artifact": image.id, "seed": payload["seeds"][0]}], "model": "tiny"}

    return script


def vlm_prompts(client: ScriptedClient, store) -> list[tuple[str, list[str], int, int]]:
    """(step, texts, images, max_new_tokens) of every VLM task the run submitted."""
    prompts = []
    for task_id, kind, payload in client.submitted:
        if not kind.startswith("vlm."):
            continue
        if kind == "vlm.write_prompt":
            texts, images = [payload["request"]], payload["images"]
        else:
            messages = (json.loads(store.get(payload["messages_artifact"], scope="test"))
                        if "messages_artifact" in payload else payload["messages"])
            texts = [message["text"] for message in messages]
            images = [image for message in messages for image in message["images"]]
        prompts.append((task_id.split(":", 1)[1], texts, images, payload.get("max_new_tokens", WORKER_DEFAULT_TOKENS)))
    return prompts


@pytest.fixture(scope="module")
def longest_premise():
    sentence = "A fox with a lantern crosses the frozen lake, où la neige tombe, toward the lights of home. "
    return (sentence * 200).encode()[: story.MAX_PREMISE_BYTES].decode(errors="ignore").strip()


def run_worst_case(store, budget: PromptBudget, premise: str, pages: int = 64):
    client = ScriptedClient(worst_case_script(store))
    state = {**story.StoryInput(premise=premise, pages=pages, seed=3, rounds=2).model_dump(mode="json"),
             "prompt_budget": budget.to_state()}
    values = drive(story.build_graph(), state, client, context=scripted_context(client, store=store), max_parks=400)
    return values, vlm_prompts(client, store)


@pytest.mark.parametrize("model", GEOMETRIES)
def test_every_story_prompt_fits_the_context_with_room_for_its_answer(model, store, longest_premise):
    budget = budget_for(model)
    values, prompts = run_worst_case(store, budget, longest_premise)
    assert len(values["chosen"]) == 64 and len(values["scenes"]) == 64
    # Scenes, sheet, and per page: two prompts, two critiques (edit rounds write no prompt).
    assert {step.split(":")[0] for step, *_ in prompts} == {"scenes", "sheet", "pages"}
    for step, texts, images, max_new_tokens in prompts:
        # A token covers at least one UTF-8 byte with every MGM tokenizer: this bounds the prompt from above.
        upper = TEMPLATE_TOKENS + sum(len(text.encode()) for text in texts) + len(images) * budget.image_tokens
        assert upper + max_new_tokens <= budget.context_tokens, (model, step, upper, max_new_tokens)
        assert max_new_tokens >= 96, (model, step)  # and the answer keeps a useful room
    # The long premise reached the scene requests in page-sized chunks: the last chunk tells the story's end.
    scene_texts = [texts[0] for step, texts, *_ in prompts if step.startswith("scenes:")]
    assert "home." in scene_texts[-1].split("Write the scenes")[0]


def test_the_template_reserve_covers_every_template():
    """TEMPLATE_TOKENS bounds what the chat template adds around the text (four images' placeholders, <GEN>): its
    control tokens are one token each, any other byte at most one."""
    from mgmflow.models.mgm.tokenizer import load_tiny_tokenizer

    controls = sorted([*load_tiny_tokenizer().get_added_vocab(), "<image>"], key=len, reverse=True)
    for template in TEMPLATES.values():
        rendered = template.render([Turn("user", GEN_SUFFIX, 4)])
        for control in controls:
            rendered = rendered.replace(control, "\0")
        assert len(rendered.encode()) + 2 <= TEMPLATE_TOKENS, template.name  # + BOS and the answer's first token


def test_the_tiny_engine_accepts_every_prompt_of_a_64_page_story(mgmflow_home, store, longest_premise):
    """The real tiny engine's own check (the one that refused the 32-page story's sheet) on every prompt."""
    from PIL import Image

    from mgmflow.models.mgm.engine import ChatRequest, Message, MGMEngine

    engine = MGMEngine.from_pretrained("tiny")
    _, prompts = run_worst_case(store, budget_for("tiny"), longest_premise)
    decoded: dict[str, Image.Image] = {}
    for step, texts, images, max_new_tokens in prompts:
        pictures = [decoded.setdefault(i, Image.open(io.BytesIO(store.get(i, scope="test"))))
                    for i in images]
        request = ChatRequest([Message("user", "\n".join(texts), pictures)], max_new_tokens=max_new_tokens)
        engine.validate(request)
        length = sum(engine._prepare(request).item_lengths(engine.model.num_visual_tokens))
        assert length + max_new_tokens <= engine.context_length, (step, length, max_new_tokens)


def test_fit_cuts_the_longest_texts_first():
    short, long_ = "a" * 10, "b" * 1000
    kept, cut = fit([short, long_], 200)
    assert kept == short and cut.endswith("…")
    assert sum(len(json.dumps(text)) for text in (kept, cut)) <= 200
    assert fit(["x", "y"], 100) == ["x", "y"]
