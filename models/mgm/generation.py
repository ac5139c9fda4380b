"""Batched, streamed token-by-token decoding over a transformers causal LM fed with ``inputs_embeds``.

Every request is a row of one batch. A row's prompt arrives as embeddings (text and visual tokens already
merged), optionally after a KV prefix reused from an earlier turn. The batch is left-padded:

    row i:  [pad | cached prefix_i | pad | prompt_i] generated tokens...

with the attention mask zero on the pads and position ids counted over each row's real tokens only, so a row
decodes the same tokens batched as alone (up to float noise). Finished rows leave the batch. The KV cache is
allocated once for the whole generation (see ``_PreallocatedLayer``).

Choosing the next tokens (``_Sampler``) runs over the whole batch on the device of the logits: grammar masks,
temperature and top-p are tensor ops over ``[batch, vocab]``; only the chosen ids travel to the host, where
the text is assembled and the grammars advance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from llguidance.torch import allocate_token_bitmask
from transformers.cache_utils import Cache, DynamicLayer

from mgmflow.models.errors import InvalidInputError

# Per layer (keys, values), each [1, kv_heads, length, head_dim]: one row's KV cache.
PastKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]
FinishReason = Literal["stop", "length"]
OnToken = Callable[[int, str], None]


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded. ``temperature == 0`` is greedy; ``seed`` makes sampling reproducible."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")


class TokenConstraint(Protocol):
    """A grammar that decides, token by token, which tokens may come next (see ``constrained.py``)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None: ...  # int32 [B, ceil(V / 32)] on the host

    def consume(self, token_id: int) -> None: ...

    def is_stopped(self) -> bool: ...  # nothing but the end may come

    def is_accepting(self) -> bool: ...  # the output so far is complete (more may still come)


@dataclass
class Prompt:
    """One row's input: the embeddings to prefill, after an optional cached KV prefix."""

    embeds: torch.Tensor  # [T, H]
    past: PastKV | None = None

    @property
    def past_length(self) -> int:
        return 0 if self.past is None else self.past[0][0].shape[-2]


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    # KV of the prompt and of every generated token fed back (all but the last); set when asked for.
    past: PastKV | None = None


class TextAssembler:
    """Incremental detokenization with stop strings.

    Decoding token by token breaks multi-byte characters and SentencePiece spaces, so each step decodes the
    last two offsets' window and releases only the new, complete text. Text that could be the start of a stop
    string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop_strings = tuple(s for s in stop_strings if s)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._released = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text it releases (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        stop_at = min((i for i in (self.text.find(s) for s in self._stop_strings) if i >= 0), default=-1)
        if stop_at >= 0:
            self.text = self.text[:stop_at]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def finish(self) -> str:
        """Release whatever was held back, incomplete characters included: the row is done."""
        if not self.stopped:
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self.text += self._decode(self._ids[self._prefix_offset :])[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        return max(
            (k for s in self._stop_strings for k in range(min(len(s) - 1, len(self.text)), 0, -1)
             if self.text.endswith(s[:k])),
            default=0,
        )

    def _release(self, end: int) -> str:
        end = max(end, self._released)
        piece, self._released = self.text[self._released : end], end
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class _Row:
    """Decoding state of one request."""

    def __init__(self, index: int, params: SamplingParams, tokenizer, constraint: TokenConstraint | None):
        self.index = index
        self.params = params
        self.constraint = constraint
        # A grammar ends the row itself; stop strings would cut a structured answer in two.
        self.assembler = TextAssembler(tokenizer, () if constraint else params.stop_strings)
        self.stop_token_ids = set(params.stop_token_ids)
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        # One uniform per step, drawn up front from the row's own seed: the row samples the same tokens alone or
        # batched, on any device. Greedy rows never read theirs.
        self.uniforms = torch.zeros(params.max_new_tokens)
        if params.temperature > 0:
            generator = torch.Generator()
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
            self.uniforms = torch.rand(params.max_new_tokens, generator=generator)

    def accept(self, token_id: int) -> str:
        """Record the token, decide whether the row is finished; return the text released for streaming."""
        self.token_ids.append(token_id)
        if self.constraint is not None:
            self.constraint.consume(token_id)
        if token_id in self.stop_token_ids:
            self.finish_reason = "stop"
            return self.assembler.finish()
        piece = self.assembler.add(token_id)
        if self.assembler.stopped or (self.constraint is not None and self.constraint.is_stopped()):
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.params.max_new_tokens:
            # A structured answer is "stop" only if complete: "length" marks it as cut, never valid.
            complete = self.constraint is not None and self.constraint.is_accepting()
            self.finish_reason = "stop" if complete else "length"
        if self.finish_reason is not None:
            piece += self.assembler.finish()
        return piece


@torch.inference_mode()
def generate(
    language_model,
    tokenizer,
    prompts: Sequence[Prompt],
    params: Sequence[SamplingParams],
    *,
    constraints: Sequence[TokenConstraint | None] | None = None,
    keep_past: Sequence[bool] | bool = False,
    on_token: OnToken | None = None,
    check: Callable[[], None] | None = None,
) -> list[Generation]:
    """Decode every prompt as one batch; ``on_token(row, text)`` streams each row's new text.

    ``check`` runs before every forward pass and stops everything by raising (``Cancelled``,
    ``DeadlineExceeded``). Rows with ``keep_past`` get their KV cache back in the result, for the next turn.
    """
    constraints = constraints or [None] * len(prompts)
    if isinstance(keep_past, bool):
        keep_past = [keep_past] * len(prompts)
    rows = [_Row(i, p, tokenizer, c) for i, (p, c) in enumerate(zip(params, constraints, strict=True))]
    results: list[Generation | None] = [None] * len(rows)

    if check:
        check()
    cache, mask, positions, embeds = _prefill_batch(language_model, prompts, max(p.max_new_tokens for p in params))
    logits = language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    next_position = positions[:, -1] + 1
    active = list(rows)
    sampler = _Sampler(active, logits.shape[-1], logits.device)
    while True:
        tokens = sampler.choose(logits, active)  # [B], on the logits' device
        for row, token_id in zip(active, tokens.tolist()):
            piece = row.accept(token_id)
            if piece and on_token is not None:
                on_token(row.index, piece)

        keep = [slot for slot, row in enumerate(active) if row.finish_reason is None]
        for slot, row in enumerate(active):
            if row.finish_reason is not None:
                past = _row_past(cache, mask, slot) if keep_past[row.index] else None
                results[row.index] = Generation(row.token_ids, row.assembler.text, row.finish_reason, past)
        if not keep:
            return results  # type: ignore[return-value]
        if len(keep) < len(active):
            index = torch.tensor(keep)  # each tensor takes it to its own device (layers may sit on several)
            cache.batch_select_indices(index)
            mask, next_position = mask[index.to(mask.device)], next_position[index.to(mask.device)]
            tokens = tokens[index.to(tokens.device)]
            sampler.keep(index)
            active = [active[slot] for slot in keep]

        if check:
            check()
        input_ids = tokens.to(mask.device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        logits = language_model(
            input_ids=input_ids, attention_mask=mask, position_ids=next_position.unsqueeze(1), cache=cache,
            use_cache=True,
        ).logits[:, -1]
        next_position = next_position + 1


# Top-p looks for the nucleus among this many most likely tokens first; only rows whose nucleus is larger (flat
# distributions) sort their whole vocabulary, which costs ~10 ms a row on an idle CPU core at 128k tokens.
TOP_P_CANDIDATES = 1024
_BITS = torch.arange(32, dtype=torch.int32)


class _Sampler:
    """Chooses the next token of every active row at once, on the device of the logits.

    Per row: the grammar's mask, then greedy (``temperature == 0``) or sampling at the row's temperature from its
    top-p nucleus, by inverse CDF with the row's uniform of this step.
    """

    def __init__(self, rows: Sequence[_Row], vocab_size: int, device: torch.device) -> None:
        self.device = device
        temperatures = torch.tensor([row.params.temperature for row in rows])
        self.divisors = torch.where(temperatures > 0, temperatures, 1.0).to(device)[:, None]  # [B, 1]
        self.top_p = torch.tensor([row.params.top_p for row in rows]).to(device)  # [B]
        self.uniforms = torch.nn.utils.rnn.pad_sequence([row.uniforms for row in rows], batch_first=True).to(device)
        self.step = 0
        # llguidance fills the grammars' masks on the host, one int32 bit per token; built only if a row has one.
        has_grammar = any(row.constraint is not None for row in rows)
        self.bitmask = allocate_token_bitmask(len(rows), vocab_size) if has_grammar else None

    def choose(self, logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
        """Token ids [B] from the logits [B, V] of the rows ``rows``."""
        logits = logits.float()
        if self.bitmask is not None:
            logits = logits.masked_fill(~self._allowed(rows, logits.shape[-1]), float("-inf"))
        greedy = [slot for slot, row in enumerate(rows) if row.params.temperature == 0]
        tokens = logits.argmax(-1) if greedy else torch.empty(len(rows), dtype=torch.long, device=self.device)
        for nucleus in (False, True):  # the sampled rows without top-p, then those with it
            slots = [slot for slot, row in enumerate(rows)
                     if row.params.temperature > 0 and (row.params.top_p < 1) == nucleus]
            if slots:
                index = torch.tensor(slots, device=self.device)
                chosen = logits if len(slots) == len(rows) else logits[index]
                probs = torch.softmax(chosen / self.divisors[index], dim=-1)  # [b, V]
                uniforms = self.uniforms[index, self.step]
                tokens[index] = _top_p_draw(probs, uniforms, self.top_p[index]) if nucleus else _draw(probs, uniforms)
        self.step += 1
        return tokens

    def keep(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (in that order), as the batch does."""
        index = index.to(self.device)
        self.divisors, self.top_p, self.uniforms = self.divisors[index], self.top_p[index], self.uniforms[index]

    def _allowed(self, rows: Sequence[_Row], vocab_size: int) -> torch.Tensor:
        """Boolean mask [B, V] of the tokens each row's grammar accepts next (all for rows without one)."""
        bitmask = self.bitmask[: len(rows)]
        for slot, row in enumerate(rows):
            if row.constraint is None:
                bitmask[slot] = -1
            else:
                row.constraint.fill_bitmask(bitmask, slot)
        # Bit k of word w is token 32w + k. (llguidance.torch's apply helper is torch.compile'd: a minute to
        # compile on a CPU; these three ops cost about as much as one of its calls.)
        bits = (bitmask.to(self.device, non_blocking=True).unsqueeze(-1) >> _BITS.to(self.device)) & 1
        return bits.flatten(1)[:, :vocab_size].bool()


def _top_p_draw(probs: torch.Tensor, uniforms: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Tokens [b] drawn from each row's nucleus: its most likely tokens whose mass first reaches ``top_p``."""
    candidates = min(TOP_P_CANDIDATES, probs.shape[-1])
    values, ids = probs.topk(candidates, dim=-1)  # sorted, [b, k]
    tokens = _nucleus_draw(values, ids, top_p, uniforms)
    flat = (values.sum(-1) < top_p).nonzero().squeeze(-1)  # rows whose nucleus is not among the candidates
    if candidates < probs.shape[-1] and len(flat):
        values, ids = probs[flat].sort(dim=-1, descending=True)
        tokens[flat] = _nucleus_draw(values, ids, top_p[flat], uniforms[flat])
    return tokens


def _nucleus_draw(values: torch.Tensor, ids: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor):
    """Sample among sorted candidates ``values`` [b, k] (token ids ``ids``), keeping the nucleus only."""
    inside = values.cumsum(-1) - values < top_p[:, None]  # the first candidate always stays
    return ids.gather(-1, _draw(values * inside, uniforms)[:, None]).squeeze(-1)


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index [b] drawn in proportion to ``weights`` [b, n] by inverse CDF with ``uniforms`` [b] in [0, 1)."""
    cdf = weights.cumsum(-1)
    index = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)
    return index.squeeze(-1).clamp_max(weights.shape[-1] - 1)


class _PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes each step's keys and values into buffers sized for the whole generation.

    ``DynamicLayer`` concatenates at every step, copying the whole KV cache once per token: for a batch of
    multimodal prompts (hundreds of visual tokens each) that copy moves as many bytes as the weights do.
    ``keys`` / ``values`` stay what transformers expects, views [B, kv_heads, length, head_dim] of the buffers.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            # First call, or a generation longer than planned: (re)allocate, keeping what is there.
            length = max(end, self.capacity)
            self._key_buffer = self._reallocate(self.keys if start else None, key_states, length)
            self._value_buffer = self._reallocate(self.values if start else None, value_states, length)
            self.device, self.is_initialized = key_states.device, True
        self._key_buffer[..., start:end, :] = key_states
        self._value_buffer[..., start:end, :] = value_states
        self.keys, self.values = self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]
        return self.keys, self.values

    @staticmethod
    def _reallocate(kept: torch.Tensor | None, states: torch.Tensor, length: int) -> torch.Tensor:
        buffer = states.new_empty(*states.shape[:-2], length, states.shape[-1])
        if kept is not None:
            buffer[..., : kept.shape[-2], :] = kept
        return buffer

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices``, with their room to grow."""
        if self._key_buffer is not None:
            end = self.get_seq_length()
            indices = indices.to(self._key_buffer.device)  # this layer's device: a model may span several
            self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
            self.keys, self.values = self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]


def _prefill_batch(language_model, prompts: Sequence[Prompt], max_new_tokens: int):
    """Left-pad the rows' cached prefixes and their prompts into one batch (see the module docstring).

    Returns (cache, attention mask [B, P+S], position ids [B, S], embeds [B, S, H]); the cache has room for
    ``max_new_tokens`` more positions.
    """
    past_len = max(p.past_length for p in prompts)
    new_len = max(p.embeds.shape[0] for p in prompts)
    if new_len == 0:
        raise InvalidInputError("empty prompt")
    first = prompts[0].embeds
    batch = len(prompts)
    embeds = first.new_zeros(batch, new_len, first.shape[-1])
    mask = torch.zeros(batch, past_len + new_len, dtype=torch.long, device=first.device)
    positions = torch.zeros(batch, new_len, dtype=torch.long, device=first.device)
    for b, prompt in enumerate(prompts):
        n, p = prompt.embeds.shape[0], prompt.past_length
        embeds[b, new_len - n :] = prompt.embeds
        mask[b, past_len - p : past_len] = 1
        mask[b, past_len + new_len - n :] = 1
        positions[b, new_len - n :] = torch.arange(p, p + n, device=first.device)
    n_layers = language_model.config.get_text_config().num_hidden_layers
    cache = Cache(layers=[_PreallocatedLayer(past_len + new_len + max_new_tokens) for _ in range(n_layers)])
    if past_len == 0:
        return cache, mask, positions, embeds
    reference = next(p.past for p in prompts if p.past is not None)
    for index, (ref_keys, ref_values) in enumerate(reference):
        keys = ref_keys.new_zeros(batch, ref_keys.shape[1], past_len, ref_keys.shape[-1])
        values = ref_values.new_zeros(batch, ref_values.shape[1], past_len, ref_values.shape[-1])
        for b, prompt in enumerate(prompts):
            if prompt.past is not None:
                keys[b, :, past_len - prompt.past_length :] = prompt.past[index][0][0]
                values[b, :, past_len - prompt.past_length :] = prompt.past[index][1][0]
        cache.layers[index].update(keys, values)
    return cache, mask, positions, embeds


def _row_past(cache: Cache, mask: torch.Tensor, slot: int) -> PastKV:
    """One row's KV over its real (unmasked) positions, detached from the batch."""
    real = mask[slot].nonzero().squeeze(-1)  # [length] positions, moved to each layer's device
    return tuple(
        (layer.keys[slot : slot + 1].index_select(2, real.to(layer.keys.device)),  # a copy: owns its memory
         layer.values[slot : slot + 1].index_select(2, real.to(layer.values.device)))
        for layer in cache.layers
    )
