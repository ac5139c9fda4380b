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

from models.errors import InvalidInputError

# Compact JSON: with flexible whitespace a weak model can emit blanks until it runs out of tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}
_BITS = torch.arange(32, dtype=torch.int32)


class GrammarConstraint:
    """One request's position in its grammar (the ``TokenConstraint`` of ``generation.py``)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._bitmask = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        """Boolean mask [vocab_size] of the tokens the grammar accepts next."""
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        bits = (self._bitmask.unsqueeze(-1) >> _BITS) & 1  # [words, 32], bit k of word w is token 32w+k
        return bits.reshape(-1)[:vocab_size].bool()

    def consume(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"grammar rejected token {token_id}: {self._matcher.get_error()}")

    def is_stopped(self) -> bool:
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Builds constraints for one tokenizer. Building the llguidance tokenizer is costly: keep one per model."""

    def __init__(self, tokenizer, *, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        # The grammar ends the answer by allowing one of these tokens once the output is complete.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_token_ids))
        self._vocab_size = vocab_size

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
        return GrammarConstraint(matcher, self._vocab_size)
