"""Grammar-constrained decoding with llguidance: JSON schemas, regexes and Lark grammars.

The constraint acts while decoding, as in the serving engines: before each token the grammar's matcher marks
the tokens that keep the output valid, every other logit is set to -inf, and the chosen token advances the
matcher. When the grammar is complete the row stops, so the answer is valid by construction, never by retry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import llguidance
import llguidance.hf
import torch
from llguidance.torch import fill_next_token_bitmask

from mgmflow.models.errors import InvalidInputError

# Compact JSON: with flexible whitespace a weak model can emit blanks until it runs out of tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarConstraint:
    """One request's position in its grammar (the ``TokenConstraint`` of ``generation.py``)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write row ``row`` of ``bitmask`` (int32, host): bit k of word w allows token 32w + k next."""
        fill_next_token_bitmask(self._matcher, bitmask, row)

    def consume(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"grammar rejected token {token_id}: {self._matcher.get_error()}")

    def is_stopped(self) -> bool:
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()


class GrammarCompiler:
    """Builds constraints for one tokenizer. Building the llguidance tokenizer is costly: keep one per model."""

    def __init__(self, tokenizer, *, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        # The grammar ends the answer by allowing one of these tokens once the output is complete.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_token_ids))

    def json_schema(self, schema: dict) -> GrammarConstraint:
        if not isinstance(schema, dict):
            raise InvalidInputError("json_schema must be a JSON object (a dict)")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON_OPTIONS)
        except (TypeError, ValueError) as error:
            raise InvalidInputError(f"invalid JSON schema: {error}") from error
        return self._constraint(grammar, "JSON schema")

    def regex(self, pattern: str) -> GrammarConstraint:
        return self._constraint(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    def lark(self, grammar: str) -> GrammarConstraint:
        return self._constraint(llguidance.LLMatcher.grammar_from_lark(grammar), "grammar")

    def _constraint(self, grammar: str, kind: str) -> GrammarConstraint:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise InvalidInputError(f"invalid {kind}: {messages[0]}")
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidInputError(f"invalid {kind}: {matcher.get_error()}")
        return GrammarConstraint(matcher)
