"""Tokenizers: the released folders' (SentencePiece, LLaMA-3's and Gemma's) and the tiny presets' fixed one.

The ids must be the official ones (mgm-official §6.2): each chunk between ``<image>`` placeholders tokenized on
its own by transformers 4.36, with the slow SentencePiece ``LlamaTokenizer`` for the LLaMA backbones (Vicuna,
Yi; ``use_fast=False``) and the fast tokenizer, ``tokenizer.json`` as it is, for Gemma and Mixtral (and for
LLaMA-3, whose folder has no slow tokenizer). transformers 5 tokenizes differently: it converts every
``tokenizer.model`` into a ``tokenizers`` BPE, which segments runs of spaces unlike SentencePiece
(``" hello  world"``: ``▁▁`` becomes one piece), and under ``legacy: true`` it drops the ``▁`` that 4.36's
SentencePiece adds after a special token (``"</s> x"``). So :class:`PromptTokenizer` computes the prompt ids
itself: with sentencepiece, following 4.36's slow algorithm including its ``legacy`` flag, or with the
``tokenizers`` library on the folder's ``tokenizer.json``. The transformers tokenizer is kept for decoding and
for the grammar engine's vocabulary.

Only template text may produce control tokens: message text is tokenized as plain text (see ``Span``).

The tiny presets' tokenizer is a byte-level BPE whose vocabulary and merges are committed data:
``data/tiny_tokenizer.json`` was written once by ``scripts/build_tiny_tokenizer.py`` and is only ever loaded,
never retrained, so every process and machine gets the same ids. Every byte is in the vocabulary (no unknown
text), and each chat template's control tokens (``<start_of_turn>``, ``<|im_start|>``, ``<|eot_id|>``, ...)
are single special tokens. The BOS is added by the tokenizer, as each family's own tokenizer does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mgmflow.models.errors import ModelNotFoundError
from mgmflow.models.mgm.conversation import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, Span
from mgmflow.models.mgm.hf_logging import quiet_transformers

SPIECE_UNDERLINE = "▁"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# The official loader asks for the slow tokenizer except for these backbones (MGM-2B, MGM-8x7B).
FAST_TOKENIZER_BACKBONES = ("gemma", "mixtral", "mistral")

# Where a plain-text run sits in its chunk: at its start, right after a control token, or inside message text
# cut at a control string (see ``PromptTokenizer._content_items``).
Position = Literal["start", "control", "break"]


class PlainText(Protocol):
    """Plain text -> ids, never parsing control tokens (one per tokenizer kind)."""

    def encode(self, text: str, position: Position, next_control: str | None) -> list[int]: ...


class TokenizersText:
    """A ``tokenizer.json`` through the ``tokenizers`` library, as transformers' fast tokenizers run it.

    Added tokens marked special are not matched (``encode_special_tokens``); the few a plain encoding can still
    produce (non-special added tokens) are cut by the caller. Its normalizer and pre-tokenizer act on each
    piece between control tokens, as in a whole-string encoding.
    """

    def __init__(self, backend: Tokenizer):
        self._backend = backend  # its own: the flag below is the tokenizer's state
        self._backend.encode_special_tokens = True

    def encode(self, text: str, position: Position, next_control: str | None) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids if text else []


class SentencePieceText:
    """A ``tokenizer.model`` through sentencepiece, as transformers 4.36's slow ``LlamaTokenizer`` encodes it.

    ``legacy: true`` (4.36's default when the config does not say): every piece between special tokens is
    encoded by the model as it is, so with LLaMA's dummy prefix each one starts with ``▁``. ``legacy: false``
    (Vicuna v1.5's config): the model's dummy prefix is switched off, a ``▁`` is put before the whole text only,
    and a piece after a special token that starts with a space is encoded behind ``<unk>`` (then dropped) so
    that the space stays one ``▁``.
    """

    def __init__(self, model_file: Path, *, legacy: bool, unk_token: str, added: dict[str, int], specials: set):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(model_file.read_bytes())
        self._model = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        proto.normalizer_spec.add_dummy_prefix = False
        self._no_prefix = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._legacy = legacy
        self._unk_token = unk_token
        self._unk_length = len(self._no_prefix.encode(unk_token, out_type=str))
        self._added = added  # 4.36 looks pieces up among the added tokens first
        self._specials = specials

    def encode(self, text: str, position: Position, next_control: str | None) -> list[int]:
        if self._legacy:
            pieces = (self._no_prefix if position == "break" else self._model).encode(text, out_type=str)
        else:
            text = text.replace(SPIECE_UNDERLINE, " ")
            if position == "start":
                if not text and (next_control is None or next_control in self._specials):
                    return []  # an empty chunk; or 4.36 drops the lone "▁" before a special token
                text = SPIECE_UNDERLINE + text
            pieces = self._pieces_without_prefix(text)
        return [self._added.get(piece, self._model.piece_to_id(piece)) for piece in pieces]

    def _pieces_without_prefix(self, text: str) -> list[str]:
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return self._no_prefix.encode(text, out_type=str)
        pieces = self._no_prefix.encode(self._unk_token + text, out_type=str)
        return pieces[self._unk_length :] if len(pieces) >= self._unk_length else pieces


class PromptTokenizer:
    """Ids of a rendered prompt, chunk-wise around the template's ``<image>`` placeholders (-200 for each).

    ``tokenizer`` is the transformers tokenizer of the same vocabulary (special tokens, BOS/EOS, decoding);
    ``text`` encodes the plain text between control tokens.
    """

    def __init__(self, tokenizer, text: PlainText, wrapping: tuple[list[int], list[int]]):
        self.tokenizer = tokenizer
        self._text = text
        self._prefix, self._suffix = wrapping  # what the tokenizer puts around a text: BOS, maybe EOS
        self._controls: dict[str, int] = dict(tokenizer.get_added_vocab())
        self._control_names = {id_: name for name, id_ in self._controls.items()}
        # Longest first: the leftmost, longest control string wins, as in transformers' and tokenizers' matching.
        self._control_pattern = _alternation(self._controls)
        # Control strings that plain encoding would still turn into a control id (a SentencePiece user-defined
        # piece like Gemma's <start_of_turn>, a non-special added token): message text is cut inside them.
        control_ids = set(self._controls.values())
        self._forgeable = _alternation(
            [s for s in self._controls if control_ids & set(text.encode(s, "start", None))]
        )

    @classmethod
    def from_fast(cls, tokenizer: PreTrainedTokenizerFast) -> PromptTokenizer:
        """For a transformers fast tokenizer built in memory (the tiny presets, tests)."""
        wrapping = _wrapping(tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids)
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy, not the shared one
        return cls(tokenizer, TokenizersText(backend), wrapping)

    def encode(self, prompt: str | Sequence[Span]) -> list[int]:
        """Ids of ``prompt`` with ``IMAGE_TOKEN_INDEX`` (-200) for each placeholder (mgm-official §6.2).

        A plain string is all template (a prompt written by hand, as the official code takes it). Each chunk
        between placeholders is tokenized on its own, as in training; when the tokenizer adds a BOS, only the
        first chunk keeps it. Tokenizing the whole string would differ after an image.
        """
        spans = [Span(prompt)] if isinstance(prompt, str) else list(prompt)
        chunks: list[list[Span]] = [[]]
        for span in spans:
            if span.content:
                chunks[-1].append(span)
                continue
            first, *rest = span.text.split(IMAGE_TOKEN)
            chunks[-1].append(Span(first))
            chunks += [[Span(text)] for text in rest]
        encoded = [self._prefix + self._chunk_ids(chunk) + self._suffix for chunk in chunks]
        bos = self.tokenizer.bos_token_id
        offset = 1 if bos is not None and encoded[0][:1] == [bos] else 0
        ids = list(encoded[0])
        for chunk in encoded[1:]:
            ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[offset:])
        return ids

    def _chunk_ids(self, spans: list[Span]) -> list[int]:
        """One chunk as ``tokenizer(chunk, add_special_tokens=False)`` would encode it, controls from templates only.

        Text of adjacent spans is encoded together (the official tokenizer sees one string), so span edges
        tokenize as they did in training.
        """
        items: list[str | int | None] = []  # text, a control id, or None where message text was cut
        for span in spans:
            items += self._content_items(span.text) if span.content else self._template_items(span.text)
        runs: list[tuple[str, Position] | int] = []  # text runs (with where each starts) and control ids
        pending: Position | None = "start"  # where the next text starts; None: it continues the last run
        for item in items:
            if isinstance(item, str):
                if pending is None:
                    runs[-1] = (runs[-1][0] + item, runs[-1][1])
                else:
                    runs.append((item, pending))
                    pending = None
            elif item is None:
                pending = "break"
            else:
                runs.append(item)
                pending = "control"
        ids: list[int] = []
        for index, run in enumerate(runs):  # a chunk starts with text, "" before a leading control token
            if isinstance(run, int):
                ids.append(run)
                continue
            following = runs[index + 1] if index + 1 < len(runs) else None
            ids += self._text.encode(*run, self._control_names.get(following) if isinstance(following, int) else None)
        return ids

    def _template_items(self, text: str) -> list[str | int]:
        if self._control_pattern is None:
            return [text]
        items: list[str | int] = []
        last = 0
        for match in self._control_pattern.finditer(text):
            items += [text[last : match.start()], self._controls[match.group()]]
            last = match.end()
        return [*items, text[last:]]

    def _content_items(self, text: str) -> list[str | None]:
        if self._forgeable is None:
            return [text]
        cuts = [match.start() + 1 for match in self._forgeable.finditer(text)]
        items: list[str | None] = []
        for start, end in zip([0, *cuts], [*cuts, len(text)]):
            items += [None, text[start:end]] if start else [text[start:end]]
        return items


def load_tokenizer(folder: Path, backbone: str) -> PromptTokenizer | None:
    """The tokenizer of a checkpoint folder, checked before any weight is read; None when it ships none.

    ``tokenizer.model`` must be a SentencePiece model (LLaMA/Vicuna, Yi, Mixtral, Gemma); ``tokenizer.json`` is
    read as it is (LLaMA-3, Gemma, Mixtral). The official loader's choice is kept: the slow SentencePiece
    tokenizer for LLaMA backbones, ``tokenizer.json`` first for Gemma and Mixtral.
    """
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None  # e.g. the parity fixtures: the model still runs on ids
    model_file, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
    tiktoken = model_file.is_file() and _is_tiktoken(model_file)
    if tiktoken and not json_file.is_file():
        raise ModelNotFoundError(
            f"{model_file} is a tiktoken BPE file (LLaMA-3's original format), which mgmflow does not read: "
            "put the tokenizer.json and tokenizer_config.json of the released checkpoint beside it"
        )
    official_slow = backbone not in FAST_TOKENIZER_BACKBONES or not json_file.is_file()
    sentencepiece = model_file.is_file() and not tiktoken and official_slow
    if sentencepiece:
        _check_sentencepiece_model(model_file)
    elif not json_file.is_file():
        raise ModelNotFoundError(
            f"{folder} has tokenizer_config.json but neither tokenizer.model (SentencePiece) nor tokenizer.json: "
            "copy the tokenizer files of the released checkpoint into it"
        )
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ImportError) as error:
        raise ModelNotFoundError(f"the tokenizer in {folder} could not be loaded: {error}") from error
    if not sentencepiece:
        backend = Tokenizer.from_file(str(json_file))  # its own post-processor adds BOS/EOS, as in 4.36
        wrapping = _wrapping(backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids)
        return PromptTokenizer(tokenizer, TokenizersText(backend), wrapping)
    settings = _tokenizer_config(folder)
    legacy = settings.get("legacy")
    # 4.36's slow tokenizers add BOS and not EOS unless the config says otherwise (transformers 5 differs).
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    wrapping = ([bos] if settings.get("add_bos_token", True) and bos is not None else [],
                [eos] if settings.get("add_eos_token", False) and eos is not None else [])  # fmt: skip
    text = SentencePieceText(
        model_file,
        legacy=True if legacy is None else bool(legacy),  # 4.36: an unset legacy means legacy
        unk_token=tokenizer.unk_token or "<unk>",
        added=dict(tokenizer.get_added_vocab()),
        specials=set(tokenizer.all_special_tokens),
    )
    return PromptTokenizer(tokenizer, text, wrapping)


def _wrapping(plain: list[int], full: list[int]) -> tuple[list[int], list[int]]:
    """(ids before, ids after) a text, from its ids encoded without and with the special tokens added."""
    start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
    return full[:start], full[start + len(plain) :]


def _is_tiktoken(model_file: Path) -> bool:
    """A tiktoken file is text lines ``<base64 token> <rank>``; a SentencePiece model is a binary protobuf."""
    with model_file.open("rb") as f:
        return re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", f.read(256)) is not None


def _check_sentencepiece_model(model_file: Path) -> None:
    """A clear error where transformers would report "tiktoken is required", after the weights had loaded."""
    missing = [name for name, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
               if importlib.util.find_spec(module) is None]  # fmt: skip
    if missing:
        raise ModelNotFoundError(
            f"{model_file} is a SentencePiece tokenizer: reading it needs {' and '.join(missing)} "
            f"(pip install {' '.join(missing)})"
        )
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    try:
        proto = sentencepiece_model_pb2.ModelProto.FromString(model_file.read_bytes())
    except DecodeError as error:
        raise ModelNotFoundError(f"{model_file} is not a SentencePiece model: {error}") from error
    if not proto.pieces:
        raise ModelNotFoundError(f"{model_file} is not a SentencePiece model: it has no pieces")


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"{path} is not valid JSON: {error}") from error


def _alternation(strings) -> re.Pattern | None:
    strings = sorted(strings, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None

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
