"""The model beyond the single-image oracle: several images (normal and HD), batches, placeholders, caches."""

import pytest
import torch
from PIL import Image

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.mgm import IMAGE_TOKEN_INDEX


def picture(seed: int, size=(120, 90)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def prompt_ids(n_images: int, text_len: int = 5) -> torch.Tensor:
    ids = []
    for i in range(n_images):
        ids += [10 + i, 11, IMAGE_TOKEN_INDEX]
    return torch.tensor([[1, *ids, *range(20, 20 + text_len)]])


@pytest.mark.parametrize("mgm", ["tiny_mgm", "tiny_hd_mgm"])
@torch.inference_mode()
def test_two_images_in_one_request(mgm, request):
    """Each image keeps its own tokens (batched encoding = one by one) and the counts add up; HD included."""
    model, processor = request.getfixturevalue(mgm)
    images, images_aux = processor.preprocess([picture(1), picture(2, (60, 140))])
    features = model.encode_images(images, images_aux)
    assert features.shape == (2, model.num_visual_tokens, model.config.hidden_size)
    for i in range(2):
        alone = model.encode_images(images[i : i + 1], images_aux[i : i + 1])
        torch.testing.assert_close(features[i : i + 1], alone, atol=1e-5, rtol=1e-5)

    ids = prompt_ids(2)
    output = model(input_ids=ids, images=images, images_aux=images_aux)
    assert output.logits.shape[1] == ids.shape[1] - 2 + 2 * model.num_visual_tokens
    inputs_embeds, _ = model.embed_multimodal(ids, features)
    scale = getattr(model.language_model.get_input_embeddings(), "embed_scale", 1.0)
    second_image = slice(3 + model.num_visual_tokens + 2, 3 + 2 * model.num_visual_tokens + 2)
    torch.testing.assert_close(inputs_embeds[0, second_image], features[1] * scale)


def test_hd_token_layout(tiny_hd_mgm):
    model, processor = tiny_hd_mgm
    images, images_aux = processor.preprocess([picture(3)])
    assert images.shape == (1, 5, 3, 84, 84) and images_aux.shape == (1, 3, 384, 384)
    assert model.num_visual_tokens == 5 * 36  # [global, 4 crops] x 36


@pytest.mark.parametrize(("n_placeholders", "n_images"), [(1, 2), (2, 1), (0, 1), (1, 0)])
def test_placeholder_and_image_counts_must_match(tiny_mgm, n_placeholders, n_images):
    model, processor = tiny_mgm
    ids = prompt_ids(n_placeholders)
    images = processor.preprocess([picture(i) for i in range(n_images)]) if n_images else (None, None)
    message = f"{n_placeholders} image placeholder.*{n_images} image"
    with pytest.raises(InvalidInputError, match=message), torch.inference_mode():
        model(input_ids=ids, images=images[0], images_aux=images[1])


def test_wrong_number_of_views_is_refused(tiny_hd_mgm):
    model, _ = tiny_hd_mgm
    with pytest.raises(InvalidInputError, match="view"), torch.inference_mode():
        model.encode_images(torch.zeros(1, 3, 84, 84), torch.zeros(1, 3, 384, 384))  # normal views for an HD model


def test_prompt_longer_than_context(tiny_mgm):
    model, processor = tiny_mgm
    too_long = torch.ones(1, model.config.tokenizer_model_max_length + 1, dtype=torch.long)
    with pytest.raises(InvalidInputError, match="context"), torch.inference_mode():
        model(input_ids=too_long, images=torch.zeros(0, 3, 84, 84), images_aux=torch.zeros(0, 3, 192, 192))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@torch.inference_mode()
def test_batch_consumes_images_in_order_and_repads(tiny_mgm, padding_side):
    model, processor = tiny_mgm
    images, images_aux = processor.preprocess([picture(4), picture(5)])
    features = model.encode_images(images, images_aux)
    short, long = [1, IMAGE_TOKEN_INDEX, 7], [1, 8, 9, IMAGE_TOKEN_INDEX, 7, 6]
    ids = torch.tensor([short + [0, 0, 0], long])  # right-padded input
    mask = torch.tensor([[1] * 3 + [0] * 3, [1] * 6])
    embeds, new_mask = model.embed_multimodal(ids, features, mask, padding_side=padding_side)
    n = model.num_visual_tokens
    assert embeds.shape[:2] == new_mask.shape == (2, 5 + n)
    assert new_mask.sum(1).tolist() == [2 + n, 5 + n]
    first_image_at = 1 if padding_side == "right" else 3 + 1
    scale = getattr(model.language_model.get_input_embeddings(), "embed_scale", 1.0)
    torch.testing.assert_close(embeds[0, first_image_at : first_image_at + n], features[0] * scale)
    torch.testing.assert_close(embeds[1, 3 : 3 + n], features[1] * scale)
    pad = new_mask[0] == 0
    assert pad[:3].all() if padding_side == "left" else pad[-3:].all()

    # Each row's last real position gives the same logits as that request alone.
    logits = model(inputs_embeds=embeds, attention_mask=new_mask).logits
    alone = model(input_ids=torch.tensor([short]), images=images[:1], images_aux=images_aux[:1]).logits
    last = -1 if padding_side == "left" else 2 + n - 1
    torch.testing.assert_close(logits[0, last], alone[0, -1], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_cache_continues_the_multimodal_prefix(tiny_mgm):
    """Prefill with images and use_cache, then one token on the cache = the full forward's last logits."""
    model, processor = tiny_mgm
    images, images_aux = processor.preprocess([picture(6)])
    ids = prompt_ids(1)
    prefill = model(input_ids=ids, images=images, images_aux=images_aux, use_cache=True)
    next_id = prefill.logits[:, -1:].argmax(-1)
    step = model(input_ids=next_id, past_key_values=prefill.past_key_values, use_cache=True)
    full = model(input_ids=torch.cat([ids, next_id], 1), images=images, images_aux=images_aux)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_text_only_forward_is_the_plain_llm(tiny_mgm):
    model, _ = tiny_mgm
    ids = torch.tensor([[1, 30, 31, 32]])
    assert torch.equal(model(input_ids=ids).logits, model.language_model(input_ids=ids).logits)


@torch.inference_mode()
def test_processor_call_feeds_the_model(tiny_mgm):
    model, processor = tiny_mgm
    inputs = processor("USER: <image>\nWhat is this? ASSISTANT:", [picture(7)])
    assert (inputs["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    logits = model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 1 + model.num_visual_tokens
