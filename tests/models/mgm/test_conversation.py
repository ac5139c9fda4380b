"""Templates reproduce the released prompts exactly (mgm-official §6), and the right one is chosen per checkpoint."""

from types import SimpleNamespace

import pytest

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.mgm.conversation import (
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    Turn,
    get_template,
    template_for_config,
)
from mgmflow.models.mgm.tokenizer import PromptTokenizer

Q = "What is in the picture?"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)

SINGLE_TURN = {
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\n{Q} ASSISTANT:",
    "mistral_instruct": f"[INST] <image>\n{Q} [/INST]",
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        f"<|im_start|>user\n<image>\n{Q}<|im_end|><|im_start|>assistant\n"
    ),
    "gemma": f"<start_of_turn>user\n<image>\n{Q}<end_of_turn>\n<start_of_turn>model\n",
    "llama_3": (
        f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYSTEM}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{Q}<|eot_id|>"
        "<|start_header_id|>system<|end_header_id|>\n\n"
    ),
}

# Second turn after the answer "A cat." (no image in the second question).
SECOND_TURN_TAIL = {
    "vicuna_v1": " A cat.</s>USER: And the colour? ASSISTANT:",
    "mistral_instruct": " A cat. </s><s>[INST] And the colour? [/INST]",
    "chatml_direct": "A cat.<|im_end|><|im_start|>user\nAnd the colour?<|im_end|><|im_start|>assistant\n",
    "gemma": "A cat.<end_of_turn>\n<eos><start_of_turn>user\nAnd the colour?<end_of_turn>\n<start_of_turn>model\n",
    "llama_3": (
        "A cat.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd the colour?<|eot_id|>"
        "<|start_header_id|>system<|end_header_id|>\n\n"
    ),
}


@pytest.mark.parametrize("name", sorted(SINGLE_TURN))
def test_single_turn_prompt_is_exact(name):
    assert get_template(name).render([Turn("user", Q, 1)]) == SINGLE_TURN[name]


@pytest.mark.parametrize("name", sorted(SECOND_TURN_TAIL))
def test_multi_turn_prompt_is_exact(name):
    turns = [Turn("user", Q, 1), Turn("assistant", "A cat."), Turn("user", "And the colour?")]
    assert get_template(name).render(turns) == SINGLE_TURN[name] + SECOND_TURN_TAIL[name]


def test_several_images_are_numbered_in_the_user_turn():
    prompt = get_template("vicuna_v1").render([Turn("user", Q, 2)])
    assert prompt.endswith(f"USER: Image 1:<image>\nImage 2:<image>\n{Q} ASSISTANT:")


def test_system_message_replaces_the_default_system_prompt():
    turns = [Turn("system", "Be brief."), Turn("user", Q)]
    assert get_template("vicuna_v1").render(turns) == f"Be brief. USER: {Q} ASSISTANT:"
    assert get_template("chatml_direct").render(turns).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_stop_strings_per_template():
    assert {n: t.stop_strings for n, t in TEMPLATES.items()} == {
        "vicuna_v1": ("</s>",),
        "mistral_instruct": ("</s>",),
        "chatml_direct": ("<|im_end|>",),
        "gemma": ("<end_of_turn>",),
        "llama_3": ("<|eot_id|>",),
    }


@pytest.mark.parametrize(
    "turns",
    [
        [Turn("assistant", "hi")],
        [Turn("user", "a"), Turn("user", "b")],
        [Turn("user", "a"), Turn("assistant", "b")],
        [],
        [Turn("user", "a"), Turn("assistant", "b", 1), Turn("user", "c")],
    ],
)
def test_malformed_conversations_are_refused(turns):
    with pytest.raises(InvalidInputError):
        get_template("vicuna_v1").render(turns)


def _config(backbone, vocab_size, **extra):
    return SimpleNamespace(backbone=backbone, text_config=SimpleNamespace(vocab_size=vocab_size), extra=extra)


@pytest.mark.parametrize(
    ("backbone", "vocab_size", "expected"),
    [
        ("gemma", 256000, "gemma"),  # MGM-2B
        ("mixtral", 32000, "mistral_instruct"),  # MGM-8x7B
        ("llama", 128256, "llama_3"),  # MGM-8B
        ("llama", 64000, "chatml_direct"),  # MGM-34B (Yi)
        ("llama", 32000, "vicuna_v1"),  # MGM-7B / 13B
    ],
)
def test_template_follows_the_checkpoint_config(backbone, vocab_size, expected):
    assert template_for_config(_config(backbone, vocab_size)).name == expected


def test_template_override_by_config_key_and_by_argument():
    assert template_for_config(_config("llama", 32000, mgmflow_template="llama_3")).name == "llama_3"
    assert template_for_config(_config("llama", 32000), "gemma").name == "gemma"
    with pytest.raises(InvalidInputError, match="unknown conversation template"):
        template_for_config(_config("llama", 32000), "alpaca")


def test_chunks_are_tokenized_separately_keeping_only_the_first_bos(tiny_tokenizer):
    prompt = get_template("vicuna_v1").render([Turn("user", Q, 2)])
    ids = PromptTokenizer.from_fast(tiny_tokenizer).encode(prompt)
    chunks = prompt.split("<image>")
    encoded = [tiny_tokenizer(chunk).input_ids for chunk in chunks]
    bos = tiny_tokenizer.bos_token_id
    assert all(chunk[0] == bos for chunk in encoded)
    assert ids == encoded[0] + [IMAGE_TOKEN_INDEX] + encoded[1][1:] + [IMAGE_TOKEN_INDEX] + encoded[2][1:]
    assert ids.count(bos) == 1


def test_images_are_numbered_over_the_whole_conversation():
    # The official CLI names every image "Image k:" once the prompt holds two or more, counting across turns.
    turns = [Turn("user", "a", 1), Turn("assistant", "b"), Turn("user", "c", 1)]
    assert get_template("vicuna_v1").render(turns).endswith(
        "USER: Image 1:<image>\na ASSISTANT: b</s>USER: Image 2:<image>\nc ASSISTANT:"
    )
    one_image = [Turn("user", "a", 1), Turn("assistant", "b"), Turn("user", "c")]
    assert "Image" not in get_template("vicuna_v1").render(one_image)
