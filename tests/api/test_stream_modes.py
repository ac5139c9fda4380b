"""The stream-mode translator on a run's stored events, where a live run is too slow to reach the case: a model
called inside a subgraph (the story's refine loop)."""

from __future__ import annotations

from types import SimpleNamespace

from mgmflow.orchestrator.api.stream_modes import ModeStream
from mgmflow.workers.events import Event

RUN = SimpleNamespace(run_id="r1", thread_id="t1")
NS = ["refine:6f1d"]
EVENTS = [
    Event("1000-0", "node", {"name": "critique", "phase": "parked", "path": ["refine"], "ns": NS, "task_id": "n1"}),
    Event("1000-1", "task.token", {"task_id": "r1:critique:0", "text": "Good"}),
    Event("1000-2", "node", {"name": "critique", "phase": "end", "path": ["refine"], "ns": NS, "task_id": "n1",
                             "update": {"score": 7}}),
]


def translated(modes, subgraphs):
    stream = ModeStream(RUN, modes, subgraphs)
    return [part for event in EVENTS for part in stream.translate(event)]


def test_tokens_of_a_model_called_in_a_subgraph_stream_without_stream_subgraphs():
    parts = translated(("messages-tuple", "updates"), subgraphs=False)
    ((name, (chunk, metadata)),) = parts  # the subgraph's update is left out; its tokens are not
    assert name == "messages" and chunk["content"] == "Good" and metadata["langgraph_node"] == "critique"
    assert metadata["langgraph_checkpoint_ns"] == "refine:6f1d"
    names = [name for name, _ in translated(("messages-tuple", "updates"), subgraphs=True)]
    assert names == ["messages|refine:6f1d", "updates|refine:6f1d"]


def test_an_approval_point_is_an_interrupt_as_langgraph_shows_it():
    from langgraph.types import Interrupt

    stream = ModeStream(RUN, ("updates", "values"), subgraphs=False)
    stream.translate(Event("1000-0", "checkpoint", {"ns": [], "step": 3, "checkpoint_id": "c3",
                                                    "parent_checkpoint_id": "c2", "values": {"pages": 2},
                                                    "next": ["draw"]}))
    parts = stream.translate(Event("1000-1", "run", {"status": "interrupted",
                                                     "interrupt": [{"kind": "approval", "prompt": "a fox"}]}))
    (_, update), (_, values) = parts
    (interrupt,) = [Interrupt(**item) for item in update["__interrupt__"]]  # what RemoteGraph raises with
    assert interrupt.value == {"kind": "approval", "prompt": "a fox"}
    assert values == {"pages": 2, "__interrupt__": update["__interrupt__"]}
