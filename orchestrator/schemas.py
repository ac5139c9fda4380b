"""Everything the graph asks of the VLM as structure, as pydantic models.

Each model gives the JSON schema the VLM decodes under (``json_schema()``: bounded strings and lists, refs
inlined, so constrained decoding terminates even with a tiny random model) and validates the answer, so the loop
behaves the same with a tiny random model and a real one.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Bounds keep constrained decoding short: a random model fills every string to its maximum length.
SHORT = 120
LONG = 400
ShortText = Annotated[str, Field(max_length=SHORT)]


class VLMSchema(BaseModel):
    """Base of the structured answers: strict fields, a schema fit for constrained decoding."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def json_schema(cls, **list_sizes: int) -> dict[str, Any]:
        """The JSON schema with ``$defs`` inlined and titles dropped; ``name=n`` pins list ``name`` to n items."""
        schema = _inline(cls.model_json_schema())
        for name, size in list_sizes.items():
            field = schema["properties"][name]
            field["minItems"] = field["maxItems"] = size
        return schema


class Plan(VLMSchema):
    """How to satisfy a request: the goal, the steps, a first image prompt."""

    goal: str = Field(max_length=LONG)
    steps: list[ShortText] = Field(min_length=1, max_length=6)
    prompt: str = Field(max_length=LONG)


class Scene(VLMSchema):
    title: str = Field(max_length=SHORT)
    description: str = Field(max_length=LONG)
    characters: list[ShortText] = Field(max_length=4)


class SceneList(VLMSchema):
    """A story cut into scenes, one per page."""

    scenes: list[Scene] = Field(min_length=1, max_length=64)


class Character(VLMSchema):
    name: str = Field(max_length=SHORT)
    description: str = Field(max_length=LONG)


class CharacterSheet(VLMSchema):
    """The characters and the visual style shared by every page."""

    characters: list[Character] = Field(max_length=6)
    style: str = Field(max_length=LONG)


class Critique(VLMSchema):
    """A verdict on one image against its intent: a 0-10 score, what to do next, and why."""

    score: int = Field(ge=0, le=10)
    verdict: Literal["accept", "refine", "edit"]
    feedback: str = Field(max_length=LONG)


# A coordinate of a box: three decimals at most in the decoding grammar (a weak model otherwise repeats digits
# until it runs out of tokens); the answer's own value is not checked against it.
Coordinate = Annotated[float, Field(ge=0.0, le=1.0, json_schema_extra={"multipleOf": 0.001})]


class Region(VLMSchema):
    """A box in relative coordinates (0-1) worth a closer look, and what to ask about it."""

    x0: Coordinate
    y0: Coordinate
    x1: Coordinate
    y1: Coordinate
    question: str = Field(max_length=SHORT)

    # Smallest side of a zoom box: a degenerate box from a weak model still yields a usable crop.
    MIN_SIDE: ClassVar[float] = 0.05

    @model_validator(mode="after")
    def _ordered_and_not_empty(self) -> Region:
        x0, x1 = sorted((self.x0, self.x1))
        y0, y1 = sorted((self.y0, self.y1))
        x0, x1 = _widen(x0, x1, self.MIN_SIDE)
        y0, y1 = _widen(y0, y1, self.MIN_SIDE)
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1
        return self


class Regions(VLMSchema):
    """Regions of an image to zoom into."""

    regions: list[Region] = Field(min_length=1, max_length=4)


def _widen(low: float, high: float, side: float) -> tuple[float, float]:
    if high - low >= side:
        return low, high
    center = min(max((low + high) / 2, side / 2), 1 - side / 2)
    return center - side / 2, center + side / 2


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """Resolve local ``$ref``s into their ``$defs`` and drop ``title`` keys (noise for the decoder)."""
    definitions = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(copy.deepcopy(definitions[node["$ref"].rsplit("/", 1)[-1]]))
            return {
                key: resolve(value)
                for key, value in node.items()
                if key != "$defs" and not (key == "title" and isinstance(value, str))  # a *field* may be "title"
            }
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)
