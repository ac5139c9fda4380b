"""``MGMEngine``: batched, streamed, cached and structured chat with a Mini-Gemini checkpoint.

One ``chat`` call runs its requests as one batch through four steps:

1. prompt: render each conversation with the checkpoint's template and tokenize it chunk-wise around images;
2. reuse: take the thread's KV prefix from the prefix cache (``cache_key``) and the images' visual tokens
   from the feature cache, encoding only images not seen before;
3. decode: one left-padded batch, each row with its own sampling, stops and grammar (JSON schema, regex,
   or the ``<GEN>`` protocol when an image prompt is required);
4. results: split ``<h>…</h>`` image prompts, store each thread's KV for its next turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from mgmflow.models.errors import ContextLengthError, InvalidInputError, ModelNotFoundError
from mgmflow.models.images import ImageSource, load_image
from mgmflow.models.mgm.cache import PrefixCache, PromptItem, VisualFeatureCache, image_digest
from mgmflow.models.mgm.constrained import GrammarCompiler
from mgmflow.models.mgm.conversation import (
    IMAGE_TOKEN_INDEX,
    ConversationTemplate,
    Turn,
    template_for_config,
)
from mgmflow.models.mgm.gen_protocol import GEN_SUFFIX, gen_grammar, split_image_prompt
from mgmflow.models.mgm.generation import OnToken, Prompt, SamplingParams, generate

Role = Literal["system", "user", "assistant"]
_ROLES = ("system", "user", "assistant")
# "allow": the official behaviour, the model may end with an <h>…</h> prompt or not; "require": it must.
ImageMode = Literal["allow", "require"]
_IMAGE_MODES = ("allow", "require")

DEFAULT_VISUAL_CACHE_BYTES = 512 * 2**20
DEFAULT_PREFIX_CACHE_BYTES = 2 * 2**30
DEFAULT_VISION_BATCH_BYTES = 2 * 2**30  # activations of one vision-encoding chunk (3 HD images, 14 at 768 px)


def vision_bytes_per_image(config, dtype: torch.dtype) -> int:
    """Estimated peak activation bytes of one image in the vision encoders, for sizing encoding chunks.

    The largest working sets: ConvNeXt's first stage at a quarter of the aux resolution, whose blocks widen
    4x (input, normalised, hidden, activated and residual tensors alive together: ~10x its width), and CLIP on
    each low-resolution view (MLP hidden states, and the attention scores of every head). Plus the pixels.
    """
    side = config.image_size_aux // 4
    convnext = 10 * config.aux_dims[0] * side * side
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    views = config.image_grid**2 + int(config.image_global)
    clip = views * 2 * tokens * (vision.intermediate_size + vision.num_attention_heads * tokens)
    pixels = 4 * 3 * (config.image_size_aux**2 + views * vision.image_size**2)  # float32 from the processor
    return dtype.itemsize * max(convnext, clip) + pixels


@dataclass
class Message:
    role: Role
    text: str
    images: list[ImageSource] = field(default_factory=list)  # PIL images, encoded bytes or paths

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise InvalidInputError(f"message role must be one of {', '.join(_ROLES)}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise InvalidInputError(f"message text must be a string, got {type(self.text).__name__}")


@dataclass
class ChatRequest:
    messages: list[Message]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    json_schema: dict | None = None
    regex: str | None = None
    generate_image: ImageMode | None = None  # ask for an image prompt: <GEN> in the user turn (see gen_protocol)
    cache_key: str | None = None  # the conversation thread: its next turn reuses this turn's KV prefix

    def __post_init__(self) -> None:
        if not self.messages:
            raise InvalidInputError("a chat request needs at least one message")
        if self.generate_image is not None and self.generate_image not in _IMAGE_MODES:
            raise InvalidInputError(f"generate_image must be 'allow', 'require' or None, got {self.generate_image!r}")
        if sum(x is not None for x in (self.json_schema, self.regex, self.generate_image)) > 1:
            raise InvalidInputError("json_schema, regex and generate_image exclude each other")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidInputError("stop must be a list of non-empty strings")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool):
            raise InvalidInputError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if not all(isinstance(x, (int, float)) for x in (self.temperature, self.top_p)):
            raise InvalidInputError("temperature and top_p must be numbers")
        self.sampling(self.max_new_tokens)  # validates the ranges

    def sampling(self, max_new_tokens: int, stop_strings: Sequence[str] = (), stop_token_ids=()) -> SamplingParams:
        """This request's decoding settings, with the template's stops added."""
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            stop_strings=(*self.stop, *stop_strings), stop_token_ids=tuple(stop_token_ids),
        )


@dataclass
class ChatResult:
    text: str
    image_prompt: str | None
    # "length": cut at max_new_tokens; a structured answer (json_schema, regex) is then incomplete, never valid.
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int  # visual tokens included
    completion_tokens: int


@dataclass
class _Prepared:
    """A request turned into prompt items, with its images decoded."""

    request: ChatRequest
    ids: list[int]  # token ids, IMAGE_TOKEN_INDEX for each image
    images: list[Image.Image]
    digests: list[str]

    def items(self) -> list[PromptItem]:
        digests = iter(self.digests)
        return [next(digests) if i == IMAGE_TOKEN_INDEX else i for i in self.ids]

    def item_lengths(self, n_visual: int) -> list[int]:
        """KV positions of each prompt item: 1 per token, ``n_visual`` per image."""
        return [n_visual if i == IMAGE_TOKEN_INDEX else 1 for i in self.ids]

    def images_after(self, matched: int) -> tuple[list[str], list[Image.Image]]:
        """(digests, images) of the images after the first ``matched`` items."""
        first = self.ids[:matched].count(IMAGE_TOKEN_INDEX)
        return self.digests[first:], self.images[first:]


class MGMEngine:
    """Chat with one loaded Mini-Gemini. Calls are serialised: one batch runs at a time."""

    def __init__(
        self,
        model,
        processor,
        *,
        model_id: str,
        template: str | None = None,
        visual_cache_bytes: int = DEFAULT_VISUAL_CACHE_BYTES,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        vision_batch_bytes: int = DEFAULT_VISION_BATCH_BYTES,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.tokenizer = processor.tokenizer
        if self.tokenizer is None:
            raise ModelNotFoundError(f"{model_id} has no tokenizer files; chat needs them")
        self.template: ConversationTemplate = template_for_config(model.config, template)
        self.context_length = model.config.tokenizer_model_max_length
        self.stop_token_ids = self._stop_token_ids()
        config = model.config
        geometry = (config.image_grid, config.image_global, config.image_size_aux)
        self.visual_cache = VisualFeatureCache(visual_cache_bytes, (model_id, geometry))
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.images_per_encoding = max(1, vision_batch_bytes // vision_bytes_per_image(config, model.dtype))
        self._grammars: GrammarCompiler | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device=None,
        dtype=None,
        device_map: str | dict | None = None,
        quantization: str | None = None,
        template: str | None = None,
        **budgets,
    ) -> MGMEngine:
        """Load a preset name (``tiny``, ``mgm-7b``…) or a checkpoint folder; ``device_map`` / ``quantization``
        (``"4bit"`` / ``"8bit"``) place the LLM as ``load_pretrained`` does."""
        from mgmflow.models.mgm import load_pretrained, presets

        model, processor = load_pretrained(
            presets.resolve(name_or_path), device=device, dtype=dtype, device_map=device_map, quantization=quantization
        )
        return cls(model, processor, model_id=str(name_or_path), template=template, **budgets)

    def compatibility_key(self, request: ChatRequest) -> Hashable:
        """Requests with equal keys batch well together.

        Any requests can share a batch; the number of images dominates the prompt length (hundreds of visual
        tokens each), so grouping by it keeps the left padding of a batch small.
        """
        return self.model_id, sum(len(m.images) for m in request.messages)

    def validate(self, request: ChatRequest) -> None:
        """Raise the ``InvalidInputError`` that ``chat`` would raise for this request, without running the model.

        A batcher calls it before queueing, so that one bad request never fails the batch it would have joined.
        It takes no lock: it can run while a batch decodes.
        """
        entry = self._prepare(request)
        length = sum(entry.item_lengths(self.model.num_visual_tokens))
        self._constraint(request, min(request.max_new_tokens, self.context_length - length))

    def chat(
        self,
        requests: Sequence[ChatRequest],
        *,
        on_token: OnToken | None = None,
        check: Callable[[], None] | None = None,
    ) -> list[ChatResult]:
        """Answer every request in one batch; ``on_token(i, text)`` streams request ``i``'s answer."""
        if not requests:
            return []
        with self._lock, torch.inference_mode():
            prepared = [self._prepare(request) for request in requests]
            lengths = [entry.item_lengths(self.model.num_visual_tokens) for entry in prepared]
            params = [
                entry.request.sampling(
                    min(entry.request.max_new_tokens, self.context_length - sum(positions)),
                    self.template.stop_strings, self.stop_token_ids,
                )
                for entry, positions in zip(prepared, lengths)
            ]
            # Grammars are checked before any heavy work: a bad schema fails fast.
            constraints = [self._constraint(entry.request, p.max_new_tokens) for entry, p in zip(prepared, params)]
            reused = [self._reusable_prefix(entry) for entry in prepared]
            # Every image after a reused prefix, across the batch, encoded together unless cached.
            features = self._visual_features(
                {d: image for entry, (matched, _) in zip(prepared, reused)
                 for d, image in zip(*entry.images_after(matched))}
            )
            prompts = [self._prompt(entry, *prefix, features) for entry, prefix in zip(prepared, reused)]
            generations = generate(
                self.model.language_model, self.tokenizer, prompts, params, constraints=constraints,
                keep_past=[entry.request.cache_key is not None for entry in prepared],
                on_token=on_token, check=check,
            )
            return [self._finish(*row) for row in zip(prepared, lengths, generations)]

    def _finish(self, entry: _Prepared, lengths: list[int], generation) -> ChatResult:
        """Keep the thread's KV for its next turn; split off the image prompt."""
        if entry.request.cache_key is not None:
            fed = generation.token_ids[:-1]  # the last token was never fed back
            self.prefix_cache.store(
                entry.request.cache_key, [*entry.items(), *fed], [*lengths, *[1] * len(fed)], generation.past
            )
        text, image_prompt = generation.text, None
        if entry.request.generate_image is not None:
            text, image_prompt = split_image_prompt(text)
        return ChatResult(text, image_prompt, generation.finish_reason, sum(lengths), len(generation.token_ids))

    def cache_stats(self) -> dict:
        return {"visual": self.visual_cache.stats(), "prefix": self.prefix_cache.stats()}

    # -- steps ---------------------------------------------------------------------------------------------------

    def _prepare(self, request: ChatRequest) -> _Prepared:
        """Render, tokenize, decode the images; refuse a prompt that cannot fit the context."""
        turns, images = [], []
        for index, message in enumerate(request.messages):
            text = message.text
            if request.generate_image is not None and index == len(request.messages) - 1:
                text += GEN_SUFFIX  # in the user turn, as the official CLI does
            turns.append(Turn(message.role, text, len(message.images)))
            images += [load_image(source) for source in message.images]
        ids = self.processor.tokenize(self.template.spans(turns))
        length = len(ids) + len(images) * (self.model.num_visual_tokens - 1)
        if length >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {length} tokens once images are expanded; this model's context is "
                f"{self.context_length} tokens, and the answer needs at least one more"
            )
        return _Prepared(request, ids, images, [image_digest(image) for image in images])

    def _reusable_prefix(self, entry: _Prepared):
        """(items covered, their KV) from the thread's last turn; (0, None) without a cache key or a match."""
        if entry.request.cache_key is None:
            return 0, None
        return self.prefix_cache.lookup(entry.request.cache_key, entry.items())

    def _prompt(self, entry: _Prepared, matched: int, past, features: dict[str, torch.Tensor]) -> Prompt:
        """The row's prompt: its reused KV prefix and the embeddings of everything after it."""
        digests, _ = entry.images_after(matched)
        images = torch.stack([features[d] for d in digests]) if digests else None
        embeds, _ = self.model.embed_multimodal(torch.tensor([entry.ids[matched:]]), images)
        return Prompt(embeds[0], past)

    def _visual_features(self, images: dict[str, Image.Image]) -> dict[str, torch.Tensor]:
        """Visual tokens [n_visual, H] per image digest, encoding only the images not cached, in chunks of
        ``images_per_encoding`` (the vision activations of a chunk fit ``vision_batch_bytes``)."""
        features = {digest: self.visual_cache.get(digest) for digest in images}
        missing = [digest for digest, value in features.items() if value is None]
        for start in range(0, len(missing), self.images_per_encoding):
            chunk = missing[start : start + self.images_per_encoding]
            encoded = self.model.encode_images(*self.processor.preprocess([images[d] for d in chunk]))
            for digest, row in zip(chunk, encoded):
                features[digest] = row
                self.visual_cache.put(digest, row)
        return features  # type: ignore[return-value]

    def _constraint(self, request: ChatRequest, max_new_tokens: int):
        if request.json_schema is not None:
            return self._grammar_compiler().json_schema(request.json_schema)
        if request.regex is not None:
            return self._grammar_compiler().regex(request.regex)
        if request.generate_image == "require":
            return self._grammar_compiler().lark(gen_grammar(max_new_tokens))
        return None  # "allow" decodes freely, as the official code does

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:  # built on first use: about a second for a large vocabulary
            self._grammars = GrammarCompiler(
                self.tokenizer, vocab_size=self.model.config.text_config.vocab_size, stop_token_ids=self.stop_token_ids
            )
        return self._grammars

    def _stop_token_ids(self) -> tuple[int, ...]:
        """EOS plus the template's end-of-turn tokens that the vocabulary has as single tokens."""
        ids = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        vocab = self.tokenizer.get_vocab()
        ids += [vocab[s] for s in self.template.stop_strings if s in vocab]
        return tuple(dict.fromkeys(ids))
