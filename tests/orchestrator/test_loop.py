"""The reason-then-generate loop with scripted model outputs: routing, rounds, lineage, seeds, approval."""

from __future__ import annotations

import json

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from orch_helpers import ScriptedClient, die_at_submission, drive, drive_on, scripted_context

from mgmflow.orchestrator.loop import build_refine_loop, decide
from mgmflow.orchestrator.seeds import derive_seed


def critic(scores: dict[tuple[str, int, int], tuple[int, str]]):
    """A script: plans and prompts are canned; critiques come from ``scores[(item, round, draft)]``."""

    def script(kind: str, payload: dict, step: str) -> dict:
        parts = step.split(":")  # refine:<item>:r<round>:d<draft>[:critique]
        if kind == "vlm.write_prompt":
            return {"text": "", "image_prompt": f"{parts[1]} prompt {parts[2]}"}
        if kind == "vlm.chat" and step.endswith(":plan"):
            return {"text": json.dumps({"goal": "g", "steps": ["s"], "prompt": "planned"})}
        if kind == "vlm.chat":
            item, round_, draft = parts[1], int(parts[2][1:]), int(parts[3][1:])
            score, verdict = scores.get((item, round_, draft), (1, "refine"))
            return {"text": json.dumps({"score": score, "verdict": verdict, "feedback": f"fix {item} {round_}"})}
        return {"images": [{"artifact": f"img-{step}", "seed": payload["seeds"][0]}], "model": "tiny"}

    return script


def run_loop(scores, *, items=("a",), budget=3, drafts=2, **options):
    client = ScriptedClient(critic(scores))
    state = {"items": [{"key": key, "request": f"draw {key}"} for key in items], "seed": 7, "budget": budget}
    values = drive(build_refine_loop(drafts=drafts), state, client, **options)
    return values, client


@pytest.mark.parametrize(
    ("critiques", "round_", "expected"),
    [
        ([{"score": 9, "verdict": "refine"}], 1, "accept"),
        ([{"score": 5, "verdict": "accept"}], 1, "accept"),
        ([{"score": 4, "verdict": "accept"}], 1, "refine"),  # a weak "accept" is not trusted
        ([{"score": 6, "verdict": "edit"}, {"score": 2, "verdict": "refine"}], 1, "edit"),
        ([{"score": 3, "verdict": "edit"}], 1, "refine"),  # too far off to edit
        ([{"score": 3, "verdict": "refine"}], 3, "exhausted"),
        ([{"score": 8, "verdict": "refine"}], 3, "accept"),  # the last round may still accept
    ],
)
def test_decide(critiques, round_, expected):
    assert decide(critiques, round=round_, budget=3, accept_score=7, edit_score=5) == expected


def test_accept_at_round_one():
    values, client = run_loop({("a", 0, 0): (4, "refine"), ("a", 0, 1): (9, "accept")})
    (item,) = values["items"]
    assert item["status"] == "accepted" and item["round"] == 1
    assert values["chosen"] == {"a": "img-refine:a:r0:d1"}
    kinds = [kind for _, kind, _ in client.submitted]
    assert kinds.count("diffusion.text2img") == 2 and kinds.count("vlm.write_prompt") == 1
    assert values["scores"] == [{"item": "a", "round": 1, "route": "accept", "best": "img-refine:a:r0:d1",
                                 "scores": {"img-refine:a:r0:d0": 4, "img-refine:a:r0:d1": 9}}]


def test_refine_twice_then_accept_keeps_every_round():
    values, client = run_loop({("a", 0, 0): (3, "refine"), ("a", 1, 1): (5, "refine"), ("a", 2, 0): (8, "accept")})
    (item,) = values["items"]
    assert item["status"] == "accepted" and item["round"] == 3
    assert [entry["route"] for entry in values["scores"]] == ["refine", "refine", "accept"]
    assert [max(entry["scores"].values()) for entry in values["scores"]] == [3, 5, 8]
    # each refine rewrote the prompt from the critic's feedback
    prompts = [payload for _, kind, payload in client.submitted if kind == "vlm.write_prompt"]
    assert len(prompts) == 3
    assert "fix a 0" in prompts[1]["request"] and "fix a 1" in prompts[2]["request"]
    assert values["chosen"]["a"] == "img-refine:a:r2:d0"
    # seeds come from (seed, item, round, draft), never from arrival order
    seeds = [payload["seeds"][0] for _, kind, payload in client.submitted if kind == "diffusion.text2img"]
    assert seeds == [derive_seed(7, 0, round_, draft) for round_ in range(3) for draft in range(2)]
    assert len(values["artifacts"]) == 6 and len(values["critiques"]) == 6


def test_edit_the_best_draft():
    values, client = run_loop({("a", 0, 1): (6, "edit"), ("a", 1, 0): (9, "accept")})
    edits = [(task_id, payload) for task_id, kind, payload in client.submitted if kind == "edit.instruct"]
    assert len(edits) == 2  # one per draft of round 2
    assert all(payload["image"] == "img-refine:a:r0:d1" for _, payload in edits)
    assert edits[0][1]["prompts"] == ["fix a 0"]
    # an edit round writes no new prompt
    assert [kind for _, kind, _ in client.submitted].count("vlm.write_prompt") == 1
    chosen = values["chosen"]["a"]
    by_id = {ref["id"]: ref for ref in values["artifacts"]}
    assert by_id[chosen]["parent"] == "img-refine:a:r0:d1" and by_id[chosen]["tool"] == "edit.instruct"


def test_budget_exhausted_keeps_the_best_of_all_rounds():
    values, _ = run_loop({("a", 0, 0): (6, "refine"), ("a", 1, 0): (2, "refine")}, budget=2)
    (item,) = values["items"]
    assert item["status"] == "exhausted" and item["round"] == 2
    assert values["chosen"]["a"] == "img-refine:a:r0:d0"  # round 1's draft beat round 2's
    assert values["scores"][-1]["route"] == "exhausted"


def test_items_share_each_stage_and_finish_independently():
    client = ScriptedClient(critic({("p1", 0, 0): (9, "accept"), ("p2", 1, 0): (8, "accept")}), hold=True)
    state = {"items": [{"key": "p1", "request": "one"}, {"key": "p2", "request": "two"}], "seed": 1, "budget": 3}
    values = drive(build_refine_loop(drafts=1), state, client)
    assert values["chosen"] == {"p1": "img-refine:p1:r0:d0", "p2": "img-refine:p2:r1:d0"}
    # one join per stage: both items' first drafts were submitted together, before either was released
    first_generation = [task for task, kind, _ in client.submitted if kind == "diffusion.text2img"][:2]
    assert first_generation == ["run-1:refine:p1:r0:d0", "run-1:refine:p2:r0:d0"]
    progress = [data for kind, data in client.events if kind == "progress"]
    assert [entry["done"] for entry in progress] == [1, 2]


def test_each_item_moves_on_as_soon_as_its_own_step_finishes():
    """No join across items: while p2's first step is still running (held: a hook, not a timing), p1 goes through
    two rounds to its chosen image, and the stream reports it finished before p2 has drawn anything. Then p2 goes
    on, and both end exactly as when every step finishes in lockstep."""
    scores = {("p1", 0, 0): (3, "refine"), ("p1", 1, 0): (9, "accept"), ("p2", 0, 0): (8, "accept")}
    state = {"items": [{"key": "p1", "request": "one"}, {"key": "p2", "request": "two"}], "seed": 1, "budget": 3}
    client = ScriptedClient(critic(scores), hold=True)
    published = client.publish
    submitted_when = {}  # event number -> the tasks submitted by then

    def publish(run_id, type, data):
        submitted_when[len(client.events)] = [task for task, _, _ in client.submitted]
        published(run_id, type, data)

    client.publish = publish
    p1_done = lambda: any(kind == "item" for kind, _ in client.events)  # noqa: E731
    values = drive(build_refine_loop(drafts=1), state, client, releasing=lambda task: ":p1:" in task or p1_done())

    first = next(number for number, (kind, _) in enumerate(client.events) if kind == "item")
    assert client.events[first][1] | {"index": 0} == {
        "stage": "refine", "key": "p1", "index": 0, "status": "accepted", "artifact": "img-refine:p1:r1:d0",
        "score": 9, "rounds": 2, "scores": [3, 9]}
    assert [task for task in submitted_when[first] if ":p2:" in task] == ["run-1:refine:p2:plan"]
    assert [data["key"] for kind, data in client.events if kind == "item"] == ["p1", "p2"]

    lockstep = drive(build_refine_loop(drafts=1), state, ScriptedClient(critic(scores)))
    assert values["chosen"] == lockstep["chosen"] == {"p1": "img-refine:p1:r1:d0", "p2": "img-refine:p2:r0:d0"}
    for name in ("scores", "critiques", "artifacts"):
        assert sorted(map(repr, values[name])) == sorted(map(repr, lockstep[name]))


def test_a_crash_in_the_middle_of_a_move_resumes_every_item_where_it_was():
    """The process dies while moving p1 on (its draft's submission fails) and p2 still waits for its prompt: driven
    again from the last checkpoint, as the driver does, both items go on from where they were, no task is sent
    under two payloads, and the result is the same as without the crash."""
    scores = {("p1", 0, 0): (9, "accept"), ("p2", 0, 0): (3, "refine"), ("p2", 1, 0): (8, "accept")}
    state = {"items": [{"key": "p1", "request": "one"}, {"key": "p2", "request": "two"}], "seed": 1, "budget": 3}
    client = ScriptedClient(critic(scores), hold=True)
    crashed = die_at_submission(client, ":p1:r0:d0")
    graph = build_refine_loop(drafts=1).compile(checkpointer=InMemorySaver())
    config, context = {"configurable": {"thread_id": "t"}}, scripted_context(client)
    graph.invoke(state, config, context=context)  # both plans submitted; parked
    client.release()
    graph.invoke(Command(resume={i.id: {} for i in graph.get_state(config).interrupts}), config, context=context)
    client.release(lambda task: ":p1:" in task)  # p1's prompt finishes; p2's stays running
    with pytest.raises(SystemError):
        graph.invoke(Command(resume={i.id: {} for i in graph.get_state(config).interrupts}), config,
                     context=context)
    stages = {item["key"]: item["stage"] for item in graph.get_state(config).values["items"]}
    assert stages == {"p1": "prompt", "p2": "prompt"} and crashed  # the move was not checkpointed

    values = drive_on(graph, config, context, client)
    undisturbed = ScriptedClient(critic(scores))
    lockstep = drive(build_refine_loop(drafts=1), state, undisturbed)
    assert values["chosen"] == lockstep["chosen"] == {"p1": "img-refine:p1:r0:d0", "p2": "img-refine:p2:r1:d0"}
    assert sorted(map(repr, values["scores"])) == sorted(map(repr, lockstep["scores"]))
    assert sorted(client.submitted, key=repr) == sorted(undisturbed.submitted, key=repr)  # each once, same payload


def test_approval_with_an_edited_prompt():
    values, client = run_loop({("a", 0, 0): (9, "accept")}, approve=True,
                              answers=[{"approved": True, "prompt": "a red fox, watercolor"}])
    generated = [payload["prompts"] for _, kind, payload in client.submitted if kind == "diffusion.text2img"]
    assert generated == [["a red fox, watercolor"]] * 2
    assert values["items"][0]["status"] == "accepted"


def test_rejected_approval_generates_nothing():
    values, client = run_loop({}, approve=True, answers=[{"approved": False}])
    assert values["items"][0]["status"] == "rejected" and values.get("chosen") == {}
    assert not [kind for _, kind, _ in client.submitted if kind == "diffusion.text2img"]
