"""The orchestrator never parses a structured answer that was cut at max_new_tokens."""

import pytest

from mgmflow.orchestrator.runtime import InvalidModelOutputError, answer_text


def test_a_cut_answer_is_a_typed_error_even_when_its_text_parses():
    with pytest.raises(InvalidModelOutputError, match="plan: .*max_new_tokens"):
        answer_text({"text": '{"title": "A"}', "finish_reason": "length"}, step="plan")
    assert answer_text({"text": '{"title": "A"}', "finish_reason": "stop"}) == '{"title": "A"}'
