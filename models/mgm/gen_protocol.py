"""The ``<GEN>`` protocol of Mini-Gemini's reasoning generation (mgm-official §7).

A request that wants an image appends ``" <GEN>"`` to the user's text (in the user turn, as the official CLI
does). The model answers with free text, then the diffusion prompt as ``<h>…</h>``, if it decides to draw.
Two modes: ``"allow"`` decodes freely, as the official code does, and takes the last complete block if there
is one; ``"require"`` decodes under a grammar that allows exactly that shape, so the answer always ends with
one complete block (for workflows that must draw). The split never invents a prompt the model did not write.
"""

from __future__ import annotations

from mgmflow.models.diffusion.defaults import NEGATIVE_PROMPT  # MGM's fixed negative prompt, kept in one place
from mgmflow.models.errors import InvalidInputError

__all__ = ["GEN_SUFFIX", "NEGATIVE_PROMPT", "gen_grammar", "split_image_prompt"]

GEN_SUFFIX = " <GEN>"
PROMPT_OPEN, PROMPT_CLOSE = "<h>", "</h>"

# The image prompt gets at most this many tokens (about a CLIP text window), and never more than half the
# budget; a few tokens are kept for the markers, which a byte-level vocabulary may spell in several pieces.
MAX_PROMPT_TOKENS = 96
_MARKER_TOKENS = 8
MIN_NEW_TOKENS = 16


def gen_grammar(max_new_tokens: int) -> str:
    """Lark grammar (llguidance dialect): free text, exactly one ``<h>prompt</h>``, then the end.

    Token budgets on the two parts make the block complete within ``max_new_tokens``. Control characters
    are excluded (newline and tab allowed in the text); the prompt is one non-blank line without ``<`` or ``>``.
    """
    if max_new_tokens < MIN_NEW_TOKENS:
        raise InvalidInputError(f"generate_image needs max_new_tokens >= {MIN_NEW_TOKENS}, got {max_new_tokens}")
    prompt_tokens = min(MAX_PROMPT_TOKENS, max_new_tokens // 2)
    text_tokens = max_new_tokens - prompt_tokens - _MARKER_TOKENS
    return rf"""
start: text "{PROMPT_OPEN}" prompt "{PROMPT_CLOSE}"
text[max_tokens={text_tokens}]: TEXT
prompt[max_tokens={prompt_tokens}]: PROMPT
TEXT: /[^\x00-\x08\x0b-\x1f\x7f]*/ & ~/(.|\n)*<h>(.|\n)*/
PROMPT: /[^<>\x00-\x1f\x7f]*[^<>\s\x00-\x1f\x7f][^<>\x00-\x1f\x7f]*/
"""


def split_image_prompt(answer: str) -> tuple[str, str | None]:
    """(text before the block, image prompt) from the last complete ``<h>…</h>``; (answer, None) without one."""
    close = answer.rfind(PROMPT_CLOSE)
    open_ = answer.rfind(PROMPT_OPEN, 0, close) if close >= 0 else -1
    if open_ < 0:
        return answer, None
    prompt = answer[open_ + len(PROMPT_OPEN) : close].strip()
    return answer[:open_].strip(), prompt or None
