"""``visual_reasoning`` with no barrier between images (issue 15): each image goes look → crop → inspect as soon as
its own previous step finished, the groups' notes start with the plan, and the only join is the final answer. The
order steps finish in (a hook on the scripted client, not a timing) changes nothing a user reads; a crash anywhere
resumes every image where it was, each task submitted once, under one payload."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from test_story_graph import png
from wf_helpers import ScriptedClient, die_at_submission, drive, drive_on, scripted_context

from mgmflow.workflows import visual_reasoning as vr

MODELS = {"tiny": 1, "mgm-7b": 3}  # groups of three images: one on the tiny preset, one an image at 576 tokens


def script(store):
    """Regions and answers named by their step; the final answer repeats its request, so equal answers mean equal
    requests."""
    def answer(kind: str, payload: dict, step: str) -> dict:
        if step == "plan":
            return {"text": json.dumps({"goal": "g", "steps": ["look"], "prompt": "p"})}
        if step.startswith("look:"):
            image = int(step.split(":")[1])
            count = payload["json_schema"]["properties"]["regions"]["maxItems"]
            return {"text": json.dumps({"regions": [
                {"x0": 0.1 * n, "y0": 0.2 * image, "x1": 0.1 * n + 0.5, "y1": 0.2 * image + 0.3,
                 "question": f"what is at {image}.{n}?"} for n in range(count)]})}
        if step == "answer":
            (message,) = json.loads(store.get(payload["messages_artifact"], scope="test"))
            return {"text": message["text"]}
        return {"text": f"seen by {step}"}  # inspect, observe

    return answer


@pytest.fixture
def images(store) -> list[str]:
    """Three images of their own colours."""
    return [store.put(png((70 * n, 90, 200 - 60 * n), size=64), scope="test", media_type="image/png").id
            for n in range(3)]


def setup(store, images: list[str], model: str):
    """A run's input, and a client that notes the steps in the order they finish."""
    finished: list[str] = []
    scripted = script(store)
    client = ScriptedClient(lambda kind, payload, step: finished.append(step) or scripted(kind, payload, step),
                            hold=True)
    context = dataclasses.replace(scripted_context(client, store=store), settings=SimpleNamespace(vlm_model=model))
    state = vr.VisualReasoningInput(question="Which is the brightest?", images=images).model_dump(mode="json")
    return state, client, context, finished


def inspected(client: ScriptedClient, image: int) -> bool:
    """Every region of ``image`` has been answered."""
    ids = [task_id for task_id in client.records if f":inspect:{image}:" in task_id]
    return bool(ids) and all(client.records[task_id].status == "done" for task_id in ids)


def outcome(values: dict, store) -> dict:
    """What a user reads, each crop by its content (every run makes artifacts of its own)."""
    crop = lambda artifact: store.info(artifact, scope="test").sha256  # noqa: E731
    return {"plan": values["plan"], "answer": values["answer"], "notes": values["notes"],
            "regions": [{**region, "crop": crop(region["crop"])} for region in vr.evidence(values)],
            "lineage": sorted((ref["step"], ref["parent"], ref["prompt"], crop(ref["id"]))
                              for ref in values["artifacts"])}


@pytest.mark.parametrize("model", MODELS)
def test_each_image_goes_on_as_soon_as_its_own_step_finishes(model, store, images):
    """Image 0 is looked at, cropped and inspected while image 1's look is still running (held until then); then the
    other way round; every image's regions, crops and answers and the final answer are the same either way, and as
    when every step finishes in lockstep."""
    state, client, context, finished = setup(store, images, model)
    first = drive(vr.build_graph(), state, client, context=context,
                  releasing=lambda task_id: not task_id.endswith(":look:1") or inspected(client, 0))
    assert finished.index("look:1") > max(finished.index(step) for step in finished if step.startswith("inspect:0:"))
    groups = len(first["groups"])
    assert groups == MODELS[model]
    if groups > 1:  # the groups' notes need no plan: they are asked with it
        assert set(finished[:groups + 1]) == {"plan", *(f"observe:{group}" for group in range(groups))}

    state, client, context, finished = setup(store, images, model)
    second = drive(vr.build_graph(), state, client, context=context,
                   releasing=lambda task_id: not task_id.endswith(":look:0") or inspected(client, 1))
    assert finished.index("look:0") > max(finished.index(step) for step in finished if step.startswith("inspect:1:"))

    state, client, context, _ = setup(store, images, model)
    client.hold = False
    lockstep = drive(vr.build_graph(), state, client, context=context)
    assert outcome(first, store) == outcome(second, store) == outcome(lockstep, store)
    shares = [sum(region["image"] == image for region in first["regions"]) for image in first["images"]]
    assert sum(shares) <= vr.MAX_REGIONS and shares == sorted(shares, reverse=True) and min(shares) >= 1
    assert all("seen by inspect:" in region["answer"] for region in first["regions"])


def crop_dies(store):
    """The second crop of image 0 cannot be stored (the process dies while the crop node runs)."""
    put, crops = store.put, []

    def dying_put(data, *, metadata=None, **options):
        if (metadata or {}).get("tool") == "zoom":
            crops.append(metadata)
            if len(crops) == 2:
                raise SystemError("the process died")
        return put(data, metadata=metadata, **options)

    store.put = dying_put


@pytest.mark.parametrize(("crash", "image_0_was"), [("crop", "crop"), ("inspect submission", "inspect")])
def test_a_crash_resumes_every_image_where_it_was(crash, image_0_was, store, images):
    """The process dies while image 0 moves on and the looks at images 1 and 2 still run: driven again from the last
    checkpoint, as the driver does, every image and group goes on from where it was, each task is submitted once
    and never under another payload (an inspection always sees the crop the state records), and the result is the
    one of a run without a crash."""
    state, client, context, _ = setup(store, images, "mgm-7b")
    payloads: dict[str, set[str]] = {}  # every submission, repeats included
    submit = client.submit

    def noting_submit(kind, payload, *, task_id, **options):
        payloads.setdefault(task_id, set()).add(json.dumps(payload, sort_keys=True))
        return submit(kind, payload, task_id=task_id, **options)

    client.submit = noting_submit
    if crash == "crop":
        crop_dies(store)
    else:
        die_at_submission(client, ":inspect:0:1")  # after image 0's first inspection was submitted
    graph = vr.build_graph().compile(checkpointer=InMemorySaver())
    config, command = {"configurable": {"thread_id": "t"}}, state
    with pytest.raises(SystemError):
        for _ in range(20):
            graph.invoke(command, config, context=context)
            client.release(lambda task_id: not task_id.endswith((":look:1", ":look:2")))
            command = Command(resume={pending.id: {} for pending in graph.get_state(config).interrupts})
    items = graph.get_state(config).values["items"]
    assert [item["stage"] for item in items] == [image_0_was, "look", "look", "done", "done", "done"]

    values = drive_on(graph, config, context, client)
    assert values["answer"]
    assert all(len(sent) == 1 for sent in payloads.values()), "a task was sent again under another payload"
    submitted = {task_id: payload for task_id, _, payload in client.submitted}
    for image, item in enumerate(values["items"][:3]):
        for number, region in enumerate(item["regions"]):
            assert submitted[f"run-1:inspect:{image}:{number}"]["messages"][0]["images"] == [region["crop"]]

    undisturbed_state, undisturbed, undisturbed_context, _ = setup(store, images, "mgm-7b")
    undisturbed.hold = False
    lockstep = drive(vr.build_graph(), undisturbed_state, undisturbed, context=undisturbed_context)
    assert sorted(task_id for task_id, _, _ in client.submitted) == sorted(t for t, _, _ in undisturbed.submitted)
    assert outcome(values, store) == outcome(lockstep, store)
