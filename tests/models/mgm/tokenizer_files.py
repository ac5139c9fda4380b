"""Real tokenizer files, made here: SentencePiece models trained in about a second, and the released vocabularies
that PyPI packages ship (Mistral-7B / Mixtral-8x7B's SentencePiece model in mistral-common, LLaMA-3's tiktoken BPE
in llama-models, both dev dependencies). Nothing is downloaded."""

from __future__ import annotations

import io
import json
import shutil
from importlib import resources
from pathlib import Path

import sentencepiece

WORDS = (
    "the a cat dog picture image colour red blue green what is in on of and describe compare them it mat sky "
    "sun over under house tree running jumps quickly slowly brief answer question assistant user system hello "
    "world number 0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ( ) - ' \""
).split()


def _corpus(lines: int = 3000) -> list[str]:
    """Deterministic sentences over a small vocabulary, with runs of spaces and newlines."""
    sentences = []
    for i in range(lines):
        words = [WORDS[(i * 7 + k * 13 + (i * k) % 11) % len(WORDS)] for k in range(4 + i % 9)]
        joiner = ("  " if i % 17 == 0 else " ") if i % 5 else "\n"
        sentences.append(joiner.join(words).capitalize())
    return sentences


def train_sentencepiece(family: str) -> bytes:
    """A small BPE SentencePiece model with the settings of ``family``'s released one (``llama``, ``yi``, ``gemma``)."""
    settings = {
        # LLaMA / Vicuna / Yi: dummy prefix, <unk> <s> </s> at 0 1 2.
        "llama": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True),
        "yi": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
                   user_defined_symbols=["<|im_start|>", "<|im_end|>"]),
        # Gemma: no dummy prefix, <pad> <eos> <bos> <unk> at 0 1 2 3, turn markers as user-defined pieces.
        "gemma": dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False, pad_piece="<pad>",
                      bos_piece="<bos>", eos_piece="<eos>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"]),
    }[family]  # fmt: skip
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe", vocab_size=600,
        byte_fallback=True, split_digits=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", character_coverage=1.0, num_threads=1, minloglevel=2, **settings,
    )  # fmt: skip
    return model.getvalue()


TOKENIZER_CONFIGS = {
    "llama": {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "yi": {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    },
    "gemma": {
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
        "pad_token": "<pad>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
    },
}  # fmt: skip


def sentencepiece_folder(folder: Path, family: str, model: bytes | None = None, **config) -> Path:
    """``tokenizer.model`` (trained for ``family`` unless given) and ``tokenizer_config.json``; no tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model if model is not None else train_sentencepiece(family))
    (folder / "tokenizer_config.json").write_text(json.dumps({**TOKENIZER_CONFIGS[family], **config}))
    return folder


def mistral_model() -> bytes:
    """Mistral-7B-v0.1 / Mixtral-8x7B's SentencePiece model (32000 pieces), as mistral-common ships it."""
    return (resources.files("mistral_common") / "data" / "tokenizer.model.v1").read_bytes()


def llama3_tiktoken_file() -> Path:
    """Meta's LLaMA-3 tiktoken BPE (128000 ranks), as llama-models ships it."""
    return Path(str(resources.files("llama_models") / "llama3" / "tokenizer.model"))


def llama3_reference():
    """Meta's own LLaMA-3 tokenizer (tiktoken), the reference the converted tokenizer.json must agree with."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(llama3_tiktoken_file())


def llama3_folder(folder: Path) -> Path:
    """What a released MGM-8B folder carries: LLaMA-3's ``tokenizer.json`` (byte-level BPE, 256 special tokens,
    BOS added by its post-processor) and a ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    reference = llama3_reference()
    specials = sorted(reference.special_tokens, key=reference.special_tokens.get)
    converter = TikTokenConverter(vocab_file=str(llama3_tiktoken_file()), pattern=reference.pat_str,
                                  extra_special_tokens=specials)  # fmt: skip
    tokenizer = converter.converted()
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, reference.special_tokens[bos])]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|end_of_text|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def replace_tokenizer(checkpoint: Path, source: Path) -> Path:
    """``checkpoint``'s tokenizer files replaced by ``source``'s."""
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (checkpoint / name).unlink(missing_ok=True)
    for file in source.iterdir():
        shutil.copy(file, checkpoint / file.name)
    return checkpoint


def gemma_json_folder(folder: Path) -> Path:
    """What a released MGM-2B folder carries: Gemma's ``tokenizer.model`` and the ``tokenizer.json`` made from it."""
    from transformers import AutoTokenizer

    sentencepiece_folder(folder, "gemma")
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    return folder
