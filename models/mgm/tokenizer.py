"""The tiny presets' tokenizer: a byte-level BPE whose vocabulary and merges are committed data.

``data/tiny_tokenizer.json`` was written once by ``scripts/build_tiny_tokenizer.py`` and is only ever loaded,
never retrained, so every process and machine gets the same ids. Every byte is in the vocabulary (no unknown
text), and each chat template's control tokens (``<start_of_turn>``, ``<|im_start|>``, ``<|eot_id|>``, ...)
are single special tokens. The BOS is added by the tokenizer, as each family's own tokenizer does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

VOCAB_FILE = Path(__file__).resolve().parent / "data" / "tiny_tokenizer.json"

# BOS / EOS of each family, as its real tokenizer names them.
FAMILY_SPECIAL_TOKENS = {
    "llama": {"bos_token": "<s>", "eos_token": "</s>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
}


def load_tiny_tokenizer(family: str = "llama") -> PreTrainedTokenizerFast:
    """The fixed tiny tokenizer with ``family``'s BOS/EOS; BOS is prepended to every encoded text."""
    if family not in FAMILY_SPECIAL_TOKENS:
        raise ValueError(f"unknown tokenizer family {family!r}; one of {sorted(FAMILY_SPECIAL_TOKENS)}")
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(VOCAB_FILE)),
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=2048,
        **FAMILY_SPECIAL_TOKENS[family],
    )


def vocabulary_sha256(tokenizer: PreTrainedTokenizerFast) -> str:
    """Hash of the vocabulary and merges a tokenizer encodes with (independent of its special-token roles)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    payload = {"vocab": model["vocab"], "merges": model["merges"], "added": sorted(tokenizer.get_added_vocab())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
